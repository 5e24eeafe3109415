"""Mixed precision: ``LossScaleOptimizer(FloraAdam())`` and ``mixed_*`` policies."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from flora_keras import FloraAdafactor, FloraAdam
from keras_testing import BACKEND, data, mlp, slot, weights


@pytest.mark.usefixtures("float32_policy")
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("cls", [FloraAdam, FloraAdafactor], ids=lambda c: c.__name__)
def test_fit_under_a_mixed_policy_keeps_float32_state(policy, cls):
    keras.config.set_dtype_policy(policy)
    model, (x, y) = mlp(), data()
    inner = cls(1e-2, kappa=2, factored=True)
    optimizer = keras.optimizers.LossScaleOptimizer(inner)
    model.compile(optimizer=optimizer, loss="mse")
    before = weights(model)
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert model.layers[0].compute_dtype == policy.split("_")[1]
    kernel = model.layers[0].kernel
    assert kernel.dtype == "float32"
    assert all(v.dtype == "float32" for v in inner._slots[0].values())
    assert tuple(slot(inner, kernel, "mu").shape) == (10, 48)
    assert int(keras.ops.convert_to_numpy(inner.iterations)) == 8
    after = weights(model)
    assert all(
        np.any(a != b) and np.all(np.isfinite(b))
        for a, b in zip(before, after, strict=True)
    )


def apply(optimizer, grads, variables):
    """``optimizer.apply``; on JAX through ``stateless_apply`` as the JAX trainer
    does (Keras' stateful LossScaleOptimizer.apply leaks tracers there)."""
    if BACKEND != "jax":
        optimizer.apply(grads, variables)
        return
    values, state = optimizer.stateless_apply(
        [v.value for v in optimizer.variables], grads, [v.value for v in variables]
    )
    for variable, value in zip(variables, values, strict=True):
        variable.assign(value)
    for variable, value in zip(optimizer.variables, state, strict=True):
        variable.assign(value)


def test_loss_scale_optimizer_skips_non_finite_steps():
    """An overflowing step leaves weights, Flora state and the counter untouched and
    halves the loss scale; the next finite step applies."""
    variable = keras.Variable(np.ones((64, 48), "float32"))
    inner = FloraAdam(1e-2)
    optimizer = keras.optimizers.LossScaleOptimizer(inner, initial_scale=8.0)
    optimizer.build([variable])
    grad = np.full((64, 48), 8.0, "float32")
    bad = grad.copy()
    bad[0, 0] = np.inf
    apply(optimizer, [bad], [variable])
    assert float(keras.ops.convert_to_numpy(optimizer.dynamic_scale)) == 4.0
    assert int(keras.ops.convert_to_numpy(inner.iterations)) == 0
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), 1.0)
    assert not np.any(keras.ops.convert_to_numpy(inner._slots[0]["mu"]))
    apply(optimizer, [grad], [variable])
    assert int(keras.ops.convert_to_numpy(inner.iterations)) == 1
    assert np.all(keras.ops.convert_to_numpy(variable) != 1.0)
