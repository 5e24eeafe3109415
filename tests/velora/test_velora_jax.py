"""flora_optax.velora: custom_vjp gradients, residuals and the Flax layer."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("flax")

import jax  # noqa: E402
import jax.ad_checkpoint  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flora_optax.velora import VeLoRADense, velora_dense  # noqa: E402

from flora_core import velora  # noqa: E402

F32_TOL = {"rtol": 2e-5, "atol": 2e-5}  # float32 (x64 off) matmuls of <= 96 terms
CASES = [  # (leading shape, D, out, M)
    ((4, 6), 32, 16, 8),
    ((5,), 24, 7, 3),
    ((2, 3, 4), 16, 5, 16),
]


def _numpy_x_hat(x: np.ndarray, v: np.ndarray, m: int) -> np.ndarray:
    """x̂ = ungroup((group(x) · v) vᵀ), written with einsum (independent of the core)."""
    g = x.reshape(*x.shape[:-1], x.shape[-1] // m, m)
    z = np.einsum("...gm,m->...g", g, v)
    return np.einsum("...g,m->...gm", z, v).reshape(x.shape)


def _data(lead, d, out, m, seed=0):
    r = np.random.default_rng(seed)
    x, w, b = (
        r.standard_normal((*lead, d)),
        r.standard_normal((d, out)),
        r.normal(size=out),
    )
    g, v = r.standard_normal((*lead, out)), r.standard_normal(m)
    v = v / np.linalg.norm(v)
    return [a.astype(np.float32) for a in (x, w, b, g, v)]


def _vjp(fn, x, w, b, g):
    y, pullback = jax.vjp(fn, jnp.asarray(x), jnp.asarray(w), jnp.asarray(b))
    return (np.asarray(a) for a in (y, *pullback(jnp.asarray(g))))


@pytest.mark.parametrize(("lead", "d", "out", "m"), CASES)
def test_gradients(lead, d, out, m):
    x, w, b, g, v = _data(lead, d, out, m)
    fn = jax.jit(lambda x, w, b: velora_dense(x, w, b, jnp.asarray(v), m))
    y, gx, gw, gb = _vjp(fn, x, w, b, g)
    y0, gx0, gw0, gb0 = _vjp(lambda x, w, b: x @ w + b, x, w, b, g)
    np.testing.assert_allclose(y, y0, **F32_TOL)
    np.testing.assert_allclose(gx, gx0, **F32_TOL)  # ∂x = ∂y wᵀ, exact
    np.testing.assert_allclose(gb, gb0, **F32_TOL)  # ∂b = Σ ∂y, exact
    x_hat = _numpy_x_hat(x.astype(np.float64), v.astype(np.float64), m)
    expected = x_hat.reshape(-1, d).T @ g.reshape(-1, out).astype(np.float64)
    np.testing.assert_allclose(gw, expected, **F32_TOL)  # ∂w = x̂ᵀ ∂y
    assert not np.allclose(gw, gw0, **F32_TOL)


def test_group_size_one_with_v_one_is_exact():
    x, w, b, g, _ = _data((4, 3), 8, 5, 1)
    fn = lambda x, w, b: velora_dense(x, w, b, jnp.ones(1), 1)  # noqa: E731
    for got, want in zip(
        _vjp(fn, x, w, b, g), _vjp(lambda x, w, b: x @ w + b, x, w, b, g), strict=True
    ):
        np.testing.assert_allclose(got, want, **F32_TOL)


def test_no_bias():
    x, w, _, g, v = _data((4,), 8, 5, 4)
    y, pullback = jax.vjp(lambda x: velora_dense(x, w, None, v, 4), jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), x @ w, **F32_TOL)
    np.testing.assert_allclose(np.asarray(pullback(g)[0]), g @ w.T, **F32_TOL)


def test_residuals_are_only_z_w_and_v(capsys):
    x, w, b, _, v = _data((6, 10), 48, 7, 8)
    jax.ad_checkpoint.print_saved_residuals(
        lambda x, w, b: velora_dense(x, w, b, v, 8).sum(), x, w, b
    )
    saved = capsys.readouterr().out
    assert "f32[6,10,6]" in saved  # z: one scalar per sub-token
    assert "f32[48,7]" in saved and "f32[8]" in saved  # w and v
    assert "f32[6,10,48]" not in saved  # never x
    jax.ad_checkpoint.print_saved_residuals(lambda x, w, b: (x @ w + b).sum(), x, w, b)
    assert "f32[6,10,48]" in capsys.readouterr().out  # a plain dense keeps x


@pytest.mark.parametrize(("d", "m"), [(10, 3), (8, 16)])
def test_bad_group_size_is_named(d, m):
    x, w, b, _, _ = _data((2,), d, 3, 1)
    with pytest.raises(ValueError, match=rf"M={m}.*D={d}"):
        velora_dense(x, w, b, jnp.ones(m), m)
    with pytest.raises(ValueError, match=rf"M={m}.*D={d}"):
        VeLoRADense(3, group_size=m).init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="group_size M: 0"):
        VeLoRADense(3, group_size=0).init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="v_init: 'svd'"):
        VeLoRADense(3, group_size=1, v_init="svd").init(jax.random.PRNGKey(0), x)


def _batch(seed, shift=0.5):
    return np.random.default_rng(seed).standard_normal((4, 5, 16)).astype("f4") + shift


def _unit_mean(x, m):
    mean = x.astype(np.float64).reshape(-1, m).mean(axis=0)
    return mean / np.linalg.norm(mean)


def test_flax_v_is_set_by_the_first_training_batch_then_fixed():
    layer = VeLoRADense(8, group_size=4)
    variables = layer.init(jax.random.PRNGKey(0), _batch(0))
    assert set(variables["params"]) == {"kernel", "bias"}  # nn.Dense's names
    assert not variables["velora"]["ready"] and not variables["velora"]["v"].any()
    apply = jax.jit(
        lambda variables, x: layer.apply(variables, x, train=True, mutable=["velora"])
    )
    _, state = apply(variables, _batch(1))
    first = np.asarray(state["velora"]["v"])
    np.testing.assert_allclose(first, _unit_mean(_batch(1), 4), **F32_TOL)
    _, state = apply({**variables, **state}, _batch(2, shift=-3.0))
    np.testing.assert_array_equal(np.asarray(state["velora"]["v"]), first)
    y = layer.apply(variables, _batch(3))  # eval: a plain dense layer
    p = variables["params"]
    expected = _batch(3) @ np.asarray(p["kernel"]) + np.asarray(p["bias"])
    np.testing.assert_allclose(np.asarray(y), expected, **F32_TOL)


def test_flax_running_and_random_v():
    layer = VeLoRADense(8, group_size=4, v_init="running", momentum=0.5)
    variables = layer.init(jax.random.PRNGKey(0), _batch(0))
    _, state = layer.apply(variables, _batch(1), train=True, mutable=["velora"])
    first = np.asarray(state["velora"]["v"], np.float64)
    variables = {**variables, **state}
    _, state = layer.apply(variables, _batch(2, -3.0), train=True, mutable=["velora"])
    step = 0.5 * first + 0.5 * _unit_mean(_batch(2, -3.0), 4)
    got = np.asarray(state["velora"]["v"])
    np.testing.assert_allclose(got, step / np.linalg.norm(step), **F32_TOL)
    random = VeLoRADense(8, group_size=4, v_init="random", seed=5, stream=2)
    variables = random.init(jax.random.PRNGKey(0), _batch(0))
    expected = velora.init_v_random(5, 4, stream=2)
    np.testing.assert_array_equal(np.asarray(variables["velora"]["v"]), expected)


def test_flax_training_gradient_uses_velora():
    layer = VeLoRADense(8, group_size=4)
    variables = layer.init(jax.random.PRNGKey(0), _batch(0))
    _, state = layer.apply(variables, _batch(1), train=True, mutable=["velora"])
    variables = {**variables, **state}
    x = _batch(2)

    def loss(params):
        y = layer.apply({**variables, "params": params}, x, train=True)
        return jnp.sum(y**2)

    grads = jax.grad(loss)(variables["params"])
    y = np.asarray(layer.apply(variables, x))
    x_hat = _numpy_x_hat(x.astype(np.float64), np.asarray(state["velora"]["v"]), 4)
    expected = x_hat.reshape(-1, 16).T @ (2 * y).reshape(-1, 8)
    np.testing.assert_allclose(np.asarray(grads["kernel"]), expected, **F32_TOL)


def test_cross_backend_z_and_x_hat_match_numpy():
    x = np.random.default_rng(0).standard_normal((3, 4, 32)).astype(np.float32)
    v = _unit_mean(x + 0.1, 8).astype(np.float32)
    z_np = velora.compress(x, v, 8)
    z = velora.compress(jnp.asarray(x), jnp.asarray(v), 8)
    x_hat = velora.reconstruct(z, jnp.asarray(v), 8)
    np.testing.assert_allclose(np.asarray(z), z_np, **F32_TOL)
    x_hat_np = velora.reconstruct(z_np, v, 8)
    np.testing.assert_allclose(np.asarray(x_hat), x_hat_np, **F32_TOL)
