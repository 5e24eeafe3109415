"""Projections are stateless functions of the iteration counter, on every backend.

A ``SeedGenerator`` inside an optimizer does not advance under JAX's stateless
``fit``; Flora derives each projection from ``(seed, param_index, count)``, so the
projection must change at every resample under ``fit`` on every backend.
"""

from __future__ import annotations

import array_api_compat.numpy as np_xp
import keras
import numpy as np
import pytest
from flora_keras import FloraAdam
from keras_testing import BACKEND, linear_loss

from conformance.adapters_keras import make_step
from flora_core import policy, rules
from flora_core.projection import compress, projection

KAPPA = 2


def test_projection_changes_at_each_resample_under_fit():
    """With ``beta_1 = 0`` the momentum slot after update ``t`` is exactly
    ``compress(G, A_{t // kappa})`` of the (constant) gradient ``G``: equal within a
    resample interval, different across, and equal to the core's projection."""
    rs = np.random.default_rng(0)
    x = rs.standard_normal((64, 40)).astype("float32")
    target = rs.standard_normal((64, 48)).astype("float32")
    keras.utils.set_random_seed(0)
    layer = keras.layers.Dense(48, use_bias=False)
    model = keras.Sequential([keras.Input((40,)), layer])
    opt = FloraAdam(1e-3, beta_1=0.0, kappa=KAPPA, rank=4, seed=7)
    model.compile(optimizer=opt, loss=linear_loss)
    gradient = (x.astype(np.float64).T @ target / len(x)).astype(np.float32)
    plan = policy.plan((40, 48), 0, rank=4, seed=7)
    assert plan.axis == 0 and plan.state_shape == (4, 48)
    moments = []
    for _ in range(3 * KAPPA):
        model.fit(x, target, batch_size=64, epochs=1, verbose=0, shuffle=False)
        moments.append(keras.ops.convert_to_numpy(opt._slots[0]["mu"]))
    for t, mu in enumerate(moments):
        a = projection(plan, t // KAPPA, policy.ROLE_MOMENTUM, xp=np_xp)
        np.testing.assert_allclose(
            mu, compress(gradient, a, plan.axis, xp=np_xp), rtol=1e-4, atol=1e-5
        )
    for t in range(1, len(moments)):
        same_interval = t % KAPPA != 0
        assert np.array_equal(moments[t], moments[t - 1]) == same_interval, t


def test_counters_survive_int32():
    """Keras makes int variables int32 under JAX (and torch): counts near 2**31 - 1
    still give the core's numbers, across a resample boundary."""
    start = 2**31 - 4  # three updates end at 2**31 - 1, the int32 maximum
    assert start % 3 == 1  # with kappa = 3 the second update starts an interval
    shape = (48, 40)
    opt = FloraAdam(0.02, kappa=3, rank=6, seed=11, epsilon=1e-8)
    variable = keras.Variable(
        np.random.default_rng(0).standard_normal(shape).astype("float32")
    )
    opt.build([variable])
    if BACKEND == "jax":
        assert opt.iterations.dtype == "int32"
    opt.iterations.assign(start)
    step = make_step(opt, [variable])
    plan = policy.plan(shape, 0, rank=6, seed=11)
    config = rules.AdamConfig(eps=1e-8, kappa=3)
    state = rules.flora_adam_init(plan, config, xp=np_xp)
    state["count"] = start
    param = keras.ops.convert_to_numpy(variable).copy()
    rs = np.random.default_rng(1)
    for _ in range(3):
        grad = rs.choice([-1.0, 1.0], size=shape).astype("float32")
        got = step([grad])[0]
        update, state = rules.flora_adam(
            grad, state, param, plan=plan, config=config, lr=0.02, xp=np_xp
        )
        param = param + update
        np.testing.assert_allclose(got, param, rtol=1e-4, atol=1e-5)
    assert state["count"] == 2**31 - 1


@pytest.mark.parametrize("seed", [0, 2**63 + 5])
def test_two_optimizers_with_one_seed_draw_the_same_projections(seed):
    """Same seed, same variable order: bit-identical states after an update."""
    moments = []
    for _ in range(2):
        variable = keras.Variable(np.ones((64, 48), "float32"))
        opt = FloraAdam(seed=seed)
        opt.apply_gradients([(np.full((64, 48), 0.5, "float32"), variable)])
        moments.append(keras.ops.convert_to_numpy(opt._slots[0]["mu"]))
    np.testing.assert_array_equal(moments[0], moments[1])
    assert moments[0].shape == (64, 12)
