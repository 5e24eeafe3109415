"""Construction-time validation, configs and registration of the Flora optimizers."""

from __future__ import annotations

import keras
import pytest
from flora_keras import FloraAdafactor, FloraAdam

BAD_ADAM = [
    ({"learning_rate": -1.0}, ValueError, "learning rate: -1.0"),
    ({"beta_1": 1.0}, ValueError, "beta_1: 1.0"),
    ({"beta_2": -0.1}, ValueError, "beta_2: -0.1"),
    ({"epsilon": -1e-8}, ValueError, "epsilon: -1e-08"),
    ({"kappa": 0}, ValueError, "kappa: 0"),
    ({"kappa": 2.5}, ValueError, "kappa: 2.5"),
    ({"rank": 0}, ValueError, "rank: 0"),
    ({"rank": "big"}, TypeError, "rank: 'big'"),
    ({"seed": -1}, ValueError, "seed: -1"),
    ({"seed": 2**64}, ValueError, "seed: 18446744073709551616"),
    ({"projection": "uniform"}, ValueError, "'uniform'"),
    ({"accumulation_steps": 0}, ValueError, "accumulation_steps: 0"),
    ({"weight_decay": -0.1}, ValueError, "weight_decay: -0.1"),
    ({"factored": "yes"}, TypeError, "factored: 'yes'"),
    ({"second_moment": "raw"}, ValueError, "second_moment: 'raw'"),
    ({"gradient_accumulation_steps": 4}, ValueError, "accumulation_steps=4 instead"),
]
BAD_ADAFACTOR = [
    ({"momentum": 1.0}, ValueError, "momentum: 1.0"),
    ({"decay_rate": -0.8}, ValueError, "decay_rate: -0.8"),
    ({"clipping_threshold": 0.0}, ValueError, "clipping_threshold: 0.0"),
    ({"min_dim_size_to_factor": 0}, ValueError, "min_dim_size_to_factor: 0"),
    ({"eps": -1.0}, ValueError, "eps: -1.0"),
    ({"multiply_by_parameter_scale": 1}, TypeError, "multiply_by_parameter_scale"),
    ({"decay_offset": 0.5}, ValueError, "decay_offset: 0.5"),
    ({"decay_offset": -1}, ValueError, "decay_offset: -1"),
    ({"weight_decay": 0.1}, ValueError, "weight_decay_rate"),
    ({"weight_decay_rate": -1.0}, ValueError, "weight_decay_rate: -1.0"),
    ({"kappa": -3}, ValueError, "kappa: -3"),
    ({"gradient_accumulation_steps": 2}, ValueError, "accumulation_steps=2 instead"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_ADAM)
def test_flora_adam_rejects_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(".", r"\.")):
        FloraAdam(**kwargs)


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_ADAFACTOR)
def test_flora_adafactor_rejects_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message.replace(".", r"\.")):
        FloraAdafactor(**kwargs)


NON_DEFAULT = {
    FloraAdam: {
        "learning_rate": 0.01,
        "beta_1": 0.8,
        "beta_2": 0.99,
        "epsilon": 1e-6,
        "rank": 8,
        "kappa": 7,
        "seed": 2**40 + 3,
        "factored": True,
        "second_moment": "gradient",
        "projection": "rademacher",
        "accumulation_steps": 4,
        "weight_decay": 0.05,
        "clipnorm": 1.0,
        "name": "my_flora_adam",
    },
    FloraAdafactor: {
        "learning_rate": 0.02,
        "momentum": None,
        "decay_rate": 0.7,
        "decay_offset": 3,
        "min_dim_size_to_factor": 16,
        "clipping_threshold": None,
        "multiply_by_parameter_scale": False,
        "weight_decay_rate": 1e-4,
        "eps": 1e-20,
        "factored": False,
        "rank": None,
        "kappa": 11,
        "seed": 5,
        "projection": "identity",
        "accumulation_steps": 2,
        "use_ema": True,
        "name": "my_flora_adafactor",
    },
}


@pytest.mark.parametrize("cls", [FloraAdam, FloraAdafactor], ids=lambda c: c.__name__)
def test_config_round_trips_every_argument(cls):
    kwargs = NON_DEFAULT[cls]
    config = cls(**kwargs).get_config()
    for name, value in kwargs.items():
        # Keras stores a float learning rate in a float32 variable.
        expected = pytest.approx(value, rel=1e-7) if name == "learning_rate" else value
        assert config[name] == expected, name
    clone = cls.from_config(dict(config))
    assert type(clone) is cls
    assert clone.get_config() == config


@pytest.mark.parametrize("cls", [FloraAdam, FloraAdafactor], ids=lambda c: c.__name__)
def test_registered_as_keras_serializable(cls):
    name = f"flora_keras>{cls.__name__}"
    assert keras.saving.get_registered_name(cls) == name
    restored = keras.optimizers.deserialize(
        keras.optimizers.serialize(cls(**NON_DEFAULT[cls]))
    )
    assert type(restored) is cls
    assert restored.get_config() == cls(**NON_DEFAULT[cls]).get_config()


def test_defaults_match_the_issue_signature():
    opt = FloraAdam()
    expected = {
        "learning_rate": 0.001,
        "beta_1": 0.9,
        "beta_2": 0.999,
        "epsilon": 1e-7,
        "rank": "auto",
        "kappa": 1000,
        "seed": 0,
        "factored": False,
        "second_moment": "projected",
        "projection": "gaussian",
        "accumulation_steps": None,
        "weight_decay": None,
    }
    config = opt.get_config()
    assert {k: config[k] for k in expected} == pytest.approx(expected)
