"""flora_core.velora on numpy: grouping, rank-1 projections, initialisations, errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from flora_core import rng, velora

F32_TOL = {"rtol": 1e-6, "atol": 1e-6}  # float32 dot products of <= 64 terms
F64_TOL = {"rtol": 1e-12, "atol": 1e-12}

SHAPES = [  # (leading shape, D, M)
    ((), 8, 4),
    ((5,), 12, 3),
    ((2, 3), 16, 16),
    ((2, 3, 4), 32, 8),
    ((7,), 6, 1),
]


def _x(lead: tuple[int, ...], d: int, dtype: type = np.float64, seed: int = 0):
    x = np.random.default_rng(seed).standard_normal((*lead, d)).astype(dtype)
    x.setflags(write=False)  # the core must never write into its inputs
    return x


def _unit(m: int, seed: int = 1) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(m)
    v = v / np.linalg.norm(v)
    v.setflags(write=False)
    return v


def _reference(x: np.ndarray, v: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """z and x̂ by explicit loops over sub-tokens (independent of the core)."""
    d = x.shape[-1]
    flat = x.reshape(-1, d)
    z = np.zeros((flat.shape[0], d // m))
    x_hat = np.zeros_like(flat, dtype=np.float64)
    for t in range(flat.shape[0]):
        for s in range(d // m):
            sub = flat[t, s * m : (s + 1) * m].astype(np.float64)
            z[t, s] = float(sub @ v)
            x_hat[t, s * m : (s + 1) * m] = z[t, s] * v
    return z.reshape(*x.shape[:-1], d // m), x_hat.reshape(x.shape)


@pytest.mark.parametrize(("lead", "d", "m"), SHAPES)
def test_group_ungroup_round_trip(lead, d, m):
    x = _x(lead, d)
    g = velora.group(x, m)
    assert g.shape == (*lead, d // m, m)
    np.testing.assert_array_equal(g[..., 0, :], x[..., :m])
    np.testing.assert_array_equal(velora.ungroup(g), x)


@pytest.mark.parametrize(("lead", "d", "m"), SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compress_and_reconstruct_match_loops(lead, d, m, dtype):
    x, v = _x(lead, d, dtype), _unit(m)
    z = velora.compress(x, v, m)
    x_hat = velora.reconstruct(z, v, m)
    z_ref, x_hat_ref = _reference(x, v, m)
    assert z.shape == (*lead, d // m) and z.dtype == dtype
    assert x_hat.shape == x.shape and x_hat.dtype == dtype
    tol = F32_TOL if dtype == np.float32 else F64_TOL
    np.testing.assert_allclose(z, z_ref, **tol)
    np.testing.assert_allclose(x_hat, x_hat_ref, **tol)


@pytest.mark.parametrize(("lead", "d", "m"), SHAPES)
def test_projection_is_idempotent(lead, d, m):
    x, v = _x(lead, d), _unit(m)
    z = velora.compress(x, v, m)
    again = velora.compress(velora.reconstruct(z, v, m), v, m)
    np.testing.assert_allclose(again, z, **F64_TOL)


@pytest.mark.parametrize("d", [1, 5, 8])
def test_group_size_one_with_unit_v_is_exact(d):
    x, one = _x((3, 4), d), np.ones(1)
    z = velora.compress(x, one, 1)
    np.testing.assert_array_equal(z, x)
    np.testing.assert_array_equal(velora.reconstruct(z, one, 1), x)


@pytest.mark.parametrize("v_shape", [(4,), (4, 1), (1, 4)])
def test_v_may_be_a_row_or_a_column(v_shape):
    x, v = _x((3,), 8), _unit(4)
    z = velora.compress(x, v.reshape(v_shape), 4)
    np.testing.assert_allclose(z, velora.compress(x, v, 4), **F64_TOL)


@pytest.mark.parametrize(("lead", "d", "m"), SHAPES)
def test_init_v_mean_is_the_unit_mean_sub_token(lead, d, m):
    x = _x(lead, d) + 0.5  # a non-zero mean
    v = velora.init_v_mean(x, m)
    mean = x.reshape(-1, m).mean(axis=0)
    assert v.shape == (m,)
    np.testing.assert_allclose(np.linalg.norm(v), 1.0, **F64_TOL)
    np.testing.assert_allclose(v, mean / np.linalg.norm(mean), **F64_TOL)


@pytest.mark.parametrize("m", [1, 4, 64])
@pytest.mark.parametrize("stream", [0, 7])
def test_init_v_random_is_flora_rng_at_unit_length(m, stream):
    v = velora.init_v_random(123, m, stream=stream)
    draws = np.asarray(rng.gaussian(123, 0, stream, (1, m), xp=np), np.float64)[0]
    assert v.dtype == np.float32 and v.shape == (m,)
    np.testing.assert_array_equal(v, (draws / np.linalg.norm(draws)).astype(np.float32))
    np.testing.assert_array_equal(v, velora.init_v_random(123, m, stream=stream))
    if m > 1:
        assert not np.array_equal(v, velora.init_v_random(123, m, stream=stream + 1))


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9, 1.0])
def test_update_v_running(momentum):
    v, x = _unit(4), _x((10,), 8) + 0.3
    new = velora.update_v_running(v, x, 4, momentum)
    batch = x.reshape(-1, 4).mean(axis=0)
    expected = momentum * v + (1 - momentum) * batch / np.linalg.norm(batch)
    np.testing.assert_allclose(new, expected / np.linalg.norm(expected), **F64_TOL)
    np.testing.assert_allclose(np.linalg.norm(new), 1.0, **F64_TOL)


@pytest.mark.parametrize(("d", "m"), [(10, 3), (8, 16), (7, 2)])
def test_group_size_must_divide_features(d, m):
    with pytest.raises(ValueError, match=rf"M={m}.*D={d}"):
        velora.group(_x((2,), d), m)
    with pytest.raises(ValueError, match=rf"M={m}.*D={d}"):
        velora.compress(_x((2,), d), np.ones(m), m)


@pytest.mark.parametrize("m", [0, -4, 2.0, "4", True, None])
def test_bad_group_size_is_named(m):
    with pytest.raises(ValueError, match=re.escape(f"group_size M: {m!r}")):
        velora.group(_x((2,), 8), m)
    with pytest.raises(ValueError, match="group_size M"):
        velora.init_v_random(0, m)


def test_v_of_the_wrong_length_is_named():
    with pytest.raises(ValueError, match=r"v has 3 entries.*M=4"):
        velora.compress(_x((2,), 8), np.ones(3), 4)
    with pytest.raises(ValueError, match=r"v has 8 entries.*M=4"):
        velora.reconstruct(np.ones((2, 2)), np.ones(8), 4)


def test_zero_or_nan_norm_is_a_clear_error():
    with pytest.raises(ValueError, match="norm is 0.0"):
        velora.init_v_mean(np.zeros((4, 8)), 4)
    with pytest.raises(ValueError, match="norm is nan"):
        velora.normalize(np.array([np.nan, 1.0]))
    with pytest.raises(ValueError, match="norm is 0.0"):
        velora.update_v_running(np.zeros(4), np.ones((2, 8)), 4, 1.0)


@pytest.mark.parametrize("momentum", [-0.1, 1.5, True])
def test_bad_momentum_is_named(momentum):
    with pytest.raises(ValueError, match=f"momentum: {momentum!r}"):
        velora.update_v_running(_unit(4), _x((2,), 8), 4, momentum)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="scalar"):
        velora.group(np.asarray(1.0), 1)
    with pytest.raises(ValueError, match=r"ungroup needs shape"):
        velora.ungroup(np.ones(3))


def test_velora_imports_no_framework():
    code = (
        "import sys, flora_core.velora\n"
        "names = ('torch', 'jax', 'tensorflow', 'keras')\n"
        "bad = [m for m in names if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(velora.__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
