"""Projections, compress / decompress / transfer (docs/spec.md §3) and Algorithms 1-2."""

from __future__ import annotations

import numpy as np
import pytest

from flora_core import accumulation, momentum, policy, projection

ATOL = 1e-5


def test_projection_is_scaled_draw(backend):
    plan = policy.plan((40, 96), 3, rank=8, seed=5)
    a = backend.to_numpy(projection.projection(plan, 2, 0, xp=backend.xp))
    z = projection.rng.gaussian(5, 2, plan.stream(0), (8, 40), xp=np)
    assert a.shape == (8, 40) and plan.axis == 0  # the smaller axis is compressed
    np.testing.assert_array_equal(a, z * np.float32(1 / np.sqrt(8)))


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_expected_gram_is_identity(distribution):
    """E[AᵀA] = I_d: the mean over resamples of AᵀA converges to I at rate 1/sqrt(N·r)."""
    import array_api_compat.numpy as xp

    plan = policy.plan((64, 24), 0, rank=16, seed=1, distribution=distribution)
    draws = 400
    gram = (
        sum(
            (lambda a: a.T @ a)(
                projection.projection(plan, i, 0, xp=xp).astype(np.float64)
            )
            for i in range(draws)
        )
        / draws
    )
    off = gram - np.eye(24)
    assert np.abs(np.diag(off)).max() < 6 * np.sqrt(2 / (draws * 16))
    assert np.abs(off).max() < 6 * np.sqrt(1 / (draws * 16)) + 6 * np.sqrt(
        2 / (draws * 16)
    )


@pytest.mark.parametrize("axis", [0, 1])
def test_compress_decompress_transfer_follow_the_table(backend, axis):
    xp = backend.xp
    shape = (30, 20) if axis == 1 else (20, 30)
    plan = policy.plan(shape, 1, rank=5, seed=9, axis=axis)
    rs = np.random.default_rng(0)
    g = rs.standard_normal(shape).astype(np.float32)
    a0 = projection.projection(plan, 0, 0, xp=xp)
    a1 = projection.projection(plan, 1, 0, xp=xp)
    n0, n1 = backend.to_numpy(a0), backend.to_numpy(a1)
    c = projection.compress(backend.asarray(g), a0, axis, xp=xp)
    want_c = g @ n0.T if axis == 1 else n0 @ g
    np.testing.assert_allclose(backend.to_numpy(c), want_c, atol=ATOL, rtol=1e-5)
    assert tuple(c.shape) == plan.state_shape
    d = projection.decompress(c, a0, axis, xp=xp)
    want_d = want_c @ n0 if axis == 1 else n0.T @ want_c
    np.testing.assert_allclose(backend.to_numpy(d), want_d, atol=ATOL, rtol=1e-5)
    moved = projection.transfer(c, a0, a1, axis, xp=xp)
    want_m = want_c @ (n0 @ n1.T) if axis == 1 else (n1 @ n0.T) @ want_c
    np.testing.assert_allclose(backend.to_numpy(moved), want_m, atol=ATOL, rtol=1e-5)
    # Transfer equals re-projecting the decompressed state (it only avoids full size).
    reproj = want_d @ n1.T if axis == 1 else n1 @ want_d
    np.testing.assert_allclose(backend.to_numpy(moved), reproj, atol=1e-4, rtol=1e-4)


def test_projection_column_block_is_slice(backend):
    plan = policy.plan((50, 77), 2, rank=6, seed=3, axis=1)
    full = backend.to_numpy(projection.projection(plan, 4, 1, xp=backend.xp))
    block = projection.projection(plan, 4, 1, xp=backend.xp, cols=(13, 41))
    np.testing.assert_array_equal(backend.to_numpy(block), full[:, 13:41])


def test_identity_projection_is_passthrough(backend):
    plan = policy.plan((12, 10), 0, rank=3, distribution="identity")
    assert projection.projection(plan, 0, 0, xp=backend.xp) is None
    g = backend.asarray(np.ones((12, 10), np.float32))
    assert projection.compress(g, None, 1, xp=backend.xp) is g
    assert plan.state_shape == (12, 10)


def test_momentum_transfers_exactly_at_interval_starts(backend):
    xp = backend.xp
    plan = policy.plan((24, 16), 0, rank=4, seed=2)
    kappa, beta = 3, 0.9
    rs = np.random.default_rng(1)
    mu = xp.zeros(plan.state_shape, dtype=xp.float32)
    mu_np = np.zeros(plan.state_shape, np.float32)
    for t in range(8):
        u = rs.standard_normal((24, 16)).astype(np.float32)
        a = backend.to_numpy(projection.projection(plan, t // kappa, 0, xp=xp))
        if t > 0 and t % kappa == 0:
            a_old = backend.to_numpy(
                projection.projection(plan, t // kappa - 1, 0, xp=xp)
            )
            mu_np = mu_np @ (a_old @ a.T)
        mu_np = beta * mu_np + (1 - beta) * (u @ a.T)
        mu, direction = momentum.momentum_update(
            mu, backend.asarray(u), t, beta=beta, kappa=kappa, plan=plan, xp=xp
        )
        np.testing.assert_allclose(backend.to_numpy(mu), mu_np, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(
            backend.to_numpy(direction), mu_np @ a, atol=1e-5, rtol=1e-5
        )


def test_traced_count_equals_python_count(backend):
    xp = backend.xp
    plan = policy.plan((24, 16), 0, rank=4, seed=2)
    rs = np.random.default_rng(3)
    mu_a = mu_b = xp.zeros(plan.state_shape, dtype=xp.float32)
    for t in range(7):
        u = backend.asarray(rs.standard_normal((24, 16)).astype(np.float32))
        mu_a, _ = momentum.momentum_update(
            mu_a, u, t, beta=0.8, kappa=2, plan=plan, xp=xp
        )
        count = backend.asarray(np.int32(t))
        mu_b, _ = momentum.momentum_update(
            mu_b, u, count, beta=0.8, kappa=2, plan=plan, xp=xp
        )
        np.testing.assert_allclose(
            backend.to_numpy(mu_a), backend.to_numpy(mu_b), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("distribution", ["identity", "gaussian"])
def test_accumulation_mean(backend, distribution):
    """Identity: exactly the mean of the gradients; gaussian: decompress of the sum."""
    xp = backend.xp
    plan = policy.plan((20, 36), 0, rank=5, seed=4, distribution=distribution)
    rs = np.random.default_rng(2)
    grads = [rs.standard_normal((20, 36)).astype(np.float32) for _ in range(4)]
    acc = xp.zeros(accumulation.accumulator_shape(plan), dtype=xp.float32)
    for g in grads:
        acc = accumulation.accumulate(acc, backend.asarray(g), 7, plan=plan, xp=xp)
    mean = backend.to_numpy(
        accumulation.accumulated_gradient(acc, 7, 4, plan=plan, xp=xp)
    )
    if distribution == "identity":
        np.testing.assert_allclose(mean, np.mean(grads, axis=0), atol=1e-6)
    else:
        a = backend.to_numpy(projection.projection(plan, 7, 1, xp=xp))
        want = (
            (np.mean(grads, axis=0) @ a.T) @ a
            if plan.axis == 1
            else a.T @ (a @ np.mean(grads, axis=0))
        )
        np.testing.assert_allclose(mean, want, atol=1e-4, rtol=1e-4)
        assert tuple(acc.shape) == plan.state_shape
