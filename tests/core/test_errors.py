"""Every bad input of the core is a clear error that names the bad value."""

from __future__ import annotations

import array_api_compat.numpy as xp
import numpy as np
import pytest

from flora_core import policy, rules, validation


@pytest.mark.parametrize("rank", [0, -3, 2.5, "8", True])
def test_bad_rank(rank):
    with pytest.raises((TypeError, ValueError), match=f"rank: {rank!r}|rank: {rank}"):
        policy.plan((64, 64), 0, rank=rank)


@pytest.mark.parametrize(
    "field,value",
    [
        ("kappa", 0),
        ("kappa", 1.5),
        ("b1", 1.0),
        ("b1", -0.1),
        ("b2", 1.2),
        ("eps", -1e-8),
        ("weight_decay", -0.1),
    ],
)
def test_bad_adam_hyperparameters(field, value):
    with pytest.raises(ValueError, match=f"{field}: {value!r}"):
        rules.AdamConfig(**{field: value})


def test_bad_eps_before_bias_correction():
    with pytest.raises(TypeError, match="eps_before_bias_correction: 'yes'"):
        rules.AdamConfig(eps_before_bias_correction="yes")


@pytest.mark.parametrize(
    "field,value",
    [("kappa", 0), ("momentum", 1.0), ("eps", -1.0), ("clipping_threshold", 0.0)],
)
def test_bad_adafactor_hyperparameters(field, value):
    with pytest.raises(ValueError, match=field):
        rules.AdafactorConfig(**{field: value})


@pytest.mark.parametrize("lr", [-1e-3, float("nan"), float("inf")])
def test_bad_learning_rate(lr):
    with pytest.raises(ValueError, match="learning rate"):
        validation.check_lr(lr)


@pytest.mark.parametrize("seed", [-1, 2**64, 0.5])
def test_bad_seed(seed):
    with pytest.raises((TypeError, ValueError), match="seed"):
        policy.plan((64, 64), 0, seed=seed)


def test_duplicate_streams():
    plans = [policy.plan((8, 8), 0), policy.plan((8, 8), 1), policy.plan((4, 4), 0)]
    with pytest.raises(ValueError, match="same stream.*param_index=0"):
        policy.check_unique_streams(plans)


def test_unknown_distribution():
    with pytest.raises(ValueError, match="'cauchy'"):
        policy.plan((64, 64), 0, distribution="cauchy")


@pytest.mark.parametrize("axis", [0, 1])
def test_forced_axis_with_rank_too_large(axis):
    with pytest.raises(ValueError, match=f"rank 16 for axis {axis}.*\\(16\\)"):
        policy.plan((16, 16), 0, rank=16, axis=axis)


def test_bad_axis():
    with pytest.raises(ValueError, match="axis: 2"):
        policy.plan((16, 16), 0, rank=4, axis=2)


@pytest.mark.parametrize(
    "dtype,match", [(np.complex64, "Complex"), (np.int32, "floating")]
)
def test_bad_gradient_dtype(dtype, match):
    plan = policy.plan((8, 8), 0, rank=2)
    state = rules.flora_adam_init(plan, rules.AdamConfig(), xp=xp)
    grad = np.ones((8, 8), dtype=dtype)
    with pytest.raises(TypeError, match=match):
        rules.flora_adam(
            grad,
            state,
            np.ones((8, 8), np.float32),
            plan=plan,
            config=rules.AdamConfig(),
            lr=0.1,
            xp=xp,
        )


def test_non_finite_gradients_propagate():
    """Documented choice: the core does not inspect values (no host sync); NaN flows
    into the state like torch Adam / optax, and the host's skip tools handle it."""
    plan = policy.plan((8, 8), 0, rank=2)
    config = rules.AdamConfig()
    state = rules.flora_adam_init(plan, config, xp=xp)
    grad = np.ones((8, 8), np.float32)
    grad[0, 0] = np.nan
    update, new = rules.flora_adam(
        grad,
        state,
        np.ones((8, 8), np.float32),
        plan=plan,
        config=config,
        lr=0.1,
        xp=xp,
    )
    assert np.isnan(update).any() and np.isnan(new["nu"][0, 0])
