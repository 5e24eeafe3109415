"""Bad inputs raise clear errors: hyper-parameters when the transformation is built,
shape- and dtype-dependent ones at init / update."""

from __future__ import annotations

import math
from typing import Any

import flora_optax
import jax.numpy as jnp
import optax
import pytest

BUILDERS = {
    "adam": lambda **kw: flora_optax.flora_adam(kw.pop("learning_rate", 1e-3), **kw),
    "adafactor": lambda **kw: flora_optax.flora_adafactor(**kw),
    "momentum": lambda **kw: flora_optax.scale_by_flora_momentum(**kw),
    "multi_steps": lambda **kw: flora_optax.flora_multi_steps(optax.sgd(0.1), 2, **kw),
}
COMMON = [  # (argument, bad value, what the message must name)
    ("rank", 0, "Invalid rank: 0"),
    ("rank", -2, "Invalid rank: -2"),
    ("rank", 2.5, "Invalid rank: 2.5"),
    ("rank", "big", "Invalid rank: 'big'"),
    ("rank", True, "Invalid rank: True"),
    ("seed", -1, "Invalid seed: -1"),
    ("seed", 2**64, "Invalid seed"),
    ("seed", 1.5, "Invalid seed: 1.5"),
    ("projection", "normal", "'normal'"),
    ("axis", 2, "Invalid axis: 2"),
    ("param_indices", [0, 3, 0], "Duplicate param index 0"),
    ("param_indices", [0, -1], "Invalid param index: -1"),
]
SPECIFIC = {
    "adam": [
        ("learning_rate", -1.0, "Invalid learning rate: -1.0"),
        ("learning_rate", math.nan, "Invalid learning rate: nan"),
        ("learning_rate", "1e-3", "Invalid learning rate: '1e-3'"),
        ("b1", 1.0, "Invalid b1: 1.0"),
        ("b1", -0.1, "Invalid b1: -0.1"),
        ("b2", 1.5, "Invalid b2: 1.5"),
        ("eps", -1e-8, "Invalid eps: -1e-08"),
        ("weight_decay", -0.1, "Invalid weight_decay: -0.1"),
        ("kappa", 0, "Invalid kappa: 0"),
        ("kappa", 2.5, "Invalid kappa: 2.5"),
        ("second_moment", "raw", "Invalid second_moment: 'raw'"),
    ],
    "adafactor": [
        ("learning_rate", -1.0, "Invalid learning rate: -1.0"),
        ("momentum", 1.0, "Invalid momentum: 1.0"),
        ("decay_rate", -0.8, "Invalid decay_rate: -0.8"),
        ("clipping_threshold", 0.0, "Invalid clipping_threshold: 0.0"),
        ("weight_decay_rate", -1.0, "Invalid weight_decay_rate: -1.0"),
        ("eps", -1.0, "Invalid eps: -1.0"),
        ("kappa", -3, "Invalid kappa: -3"),
    ],
    "momentum": [("b1", 1.0, "Invalid b1: 1.0"), ("kappa", 0, "Invalid kappa: 0")],
    "multi_steps": [],
}
CASES = [
    (builder, arg, value, message)
    for builder in sorted(BUILDERS)
    for arg, value, message in COMMON + SPECIFIC[builder]
]


@pytest.mark.parametrize(("builder", "arg", "value", "message"), CASES)
def test_bad_hyperparameter_raises_when_built(builder: str, arg: str, value: Any,
                                              message: str) -> None:  # fmt: skip
    with pytest.raises((TypeError, ValueError), match=message.replace("(", r"\(")):
        BUILDERS[builder](**{arg: value})


@pytest.mark.parametrize("builder", sorted(BUILDERS))
def test_integer_params_raise_at_init(builder: str) -> None:
    with pytest.raises(TypeError, match="parameter must be floating point"):
        BUILDERS[builder]().init({"w": jnp.ones((8, 8), jnp.int32)})


@pytest.mark.parametrize("builder", sorted(BUILDERS))
@pytest.mark.parametrize(
    ("dtype", "message"), [(jnp.complex64, "Complex"), (jnp.int32, "floating point")]
)
def test_complex_or_integer_gradients_raise(
    builder: str, dtype: Any, message: str
) -> None:
    params = {"w": jnp.ones((40, 36))}
    tx = BUILDERS[builder](rank=4)
    with pytest.raises(TypeError, match=message):
        tx.update({"w": jnp.ones((40, 36), dtype)}, tx.init(params), params)


def test_shape_dependent_errors_at_init() -> None:
    params = {"a": jnp.ones((40, 36)), "b": jnp.ones((40, 36))}
    with pytest.raises(ValueError, match="Duplicate param index 5"):
        flora_optax.flora_adam(1e-3, param_indices={"a": 5, "b": 5}).init(params)
    with pytest.raises(ValueError, match="param_indices must be"):
        flora_optax.flora_adam(1e-3, param_indices=[0, 1, 2]).init(params)
    with pytest.raises(ValueError, match="Invalid rank 36 for axis 1"):
        flora_optax.flora_adam(1e-3, rank=36, axis=1).init(params)


def test_update_needs_params_for_weight_decay() -> None:
    params = {"w": jnp.ones((40, 36))}
    tx = flora_optax.flora_adam(1e-3, weight_decay=0.1)
    with pytest.raises(ValueError, match="needs the params"):
        tx.update(params, tx.init(params))
    no_decay = flora_optax.flora_adam(1e-3)
    updates, _ = no_decay.update(params, no_decay.init(params))  # params not needed
    assert updates["w"].shape == (40, 36)
