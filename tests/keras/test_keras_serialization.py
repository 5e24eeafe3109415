"""``model.save`` / ``load_model`` and the portable state continue the trajectory."""

from __future__ import annotations

import flora_keras
import keras
import numpy as np
import pytest
from flora_keras import FloraAdafactor, FloraAdam
from keras_testing import data, mlp, weights

N, M = 3, 3  # with accumulation_steps=2 the save falls inside a cycle
OPTIMIZERS = {
    "adam": lambda: FloraAdam(
        1e-2, factored=True, kappa=2, accumulation_steps=2, seed=3
    ),
    "adafactor": lambda: FloraAdafactor(1e-2, kappa=2, min_dim_size_to_factor=16),
}


def train(model, x, y, batches):
    for rows in batches:
        model.train_on_batch(x[rows], y[rows])


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_save_load_continues_the_same_trajectory(optimizer, tmp_path):
    """Train N, save, load; the loaded and the original model then train M more
    batches in step (the original is the uninterrupted N + M reference)."""
    (x, y), batches = (
        data(samples=8 * (N + M)),
        [slice(8 * i, 8 * i + 8) for i in range(N + M)],
    )
    model = mlp()
    model.compile(optimizer=OPTIMIZERS[optimizer](), loss="mse")
    train(model, x, y, batches[:N])
    model.save(tmp_path / "model.keras")
    restored = keras.models.load_model(tmp_path / "model.keras")
    opt = restored.optimizer
    assert type(opt) is type(model.optimizer)
    assert opt.get_config() == model.optimizer.get_config()
    assert int(keras.ops.convert_to_numpy(opt._iterations)) == N
    assert int(keras.ops.convert_to_numpy(opt.iterations)) == (
        N // 2 if optimizer == "adam" else N
    )
    for saved, loaded in zip(model.optimizer.variables, opt.variables, strict=True):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(loaded), keras.ops.convert_to_numpy(saved)
        )
    at_save = weights(model)
    train(restored, x, y, batches[N:])
    train(model, x, y, batches[N:])
    for got, want, before in zip(
        weights(restored), weights(model), at_save, strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        assert np.any(got != before)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_exported_state_loads_into_a_new_optimizer_and_continues(suffix, tmp_path):
    (x, y), batches = (
        data(samples=8 * (N + M)),
        [slice(8 * i, 8 * i + 8) for i in range(N + M)],
    )
    model = mlp()
    model.compile(optimizer=OPTIMIZERS["adam"](), loss="mse")
    train(model, x, y, batches[:N])
    flat = flora_keras.export_state(model.optimizer, tmp_path / f"opt{suffix}")
    assert (
        int(flat["param.0.count"]) == N // 2
        and int(flat["param.0.micro_step"]) == N % 2
    )
    assert flat["param.0.mu"].shape == flat["param.0.acc"].shape == (10, 48)
    assert np.any(flat["param.0.acc"] != 0)  # saved inside an accumulation cycle
    fresh = mlp()
    fresh.set_weights(model.get_weights())
    fresh.compile(optimizer=OPTIMIZERS["adam"](), loss="mse")
    fresh.optimizer.build(fresh.trainable_variables)
    flora_keras.import_state(fresh.optimizer, tmp_path / f"opt{suffix}")
    train(fresh, x, y, batches[N:])
    train(model, x, y, batches[N:])
    for got, want in zip(weights(fresh), weights(model), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_import_state_names_what_does_not_fit():
    variable = keras.Variable(np.ones((64, 48), "float32"))
    source = FloraAdam(seed=1)
    source.apply_gradients([(np.ones((64, 48), "float32"), variable)])
    flat = flora_keras.export_state(source)
    other_seed = FloraAdam(seed=2)
    other_seed.build([variable])
    with pytest.raises(ValueError, match="seed"):
        flora_keras.import_state(other_seed, flat)
    factored = FloraAdam(seed=1, factored=True)
    factored.build([variable])
    with pytest.raises(ValueError, match="factored: file False, optimizer True"):
        flora_keras.import_state(factored, flat)
    with pytest.raises(ValueError, match="not built"):
        flora_keras.export_state(FloraAdam())
