"""flora_keras.velora on the KERAS_BACKEND of this process (run once per backend)."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from flora_keras.velora import VeLoRADense, velora_matmul  # noqa: E402
from keras import ops  # noqa: E402

from flora_core import velora  # noqa: E402

BACKEND = keras.backend.backend()
F32_TOL = {"rtol": 2e-5, "atol": 2e-5}  # float32 matmuls of <= 96 terms
CASES = [
    ((4, 6), 32, 16, 8),
    ((5,), 24, 7, 3),
    ((2, 3, 4), 16, 5, 16),
]  # lead, D, out, M


def _numpy_x_hat(x: np.ndarray, v: np.ndarray, m: int) -> np.ndarray:
    """x̂ = ungroup((group(x) · v) vᵀ), written with einsum (independent of the core)."""
    g = x.reshape(*x.shape[:-1], x.shape[-1] // m, m)
    z = np.einsum("...gm,m->...g", g, v)
    return np.einsum("...g,m->...gm", z, v).reshape(x.shape)


def _vjp(fn, x, kernel, g):
    """(y, ∂x, ∂kernel) of ``sum(fn(x, kernel) * g)`` with this backend's autodiff."""
    x, kernel, g = (ops.convert_to_tensor(a) for a in (x, kernel, g))
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            y = fn(x, kernel)
            loss = tf.reduce_sum(y * g)
        grads = tape.gradient(loss, [x, kernel])
    elif BACKEND == "jax":
        import jax

        y = fn(x, kernel)
        grads = jax.grad(lambda a, b: (fn(a, b) * g).sum(), argnums=(0, 1))(x, kernel)
    elif BACKEND == "torch":
        x, kernel = x.requires_grad_(True), kernel.requires_grad_(True)
        y = fn(x, kernel)
        (y * g).sum().backward()
        grads, y = (x.grad, kernel.grad), y.detach()
    else:
        pytest.skip(f"no gradient helper for backend {BACKEND}")
    return tuple(ops.convert_to_numpy(a) for a in (y, *grads))


@pytest.mark.parametrize(("lead", "d", "out", "m"), CASES)
def test_gradients(lead, d, out, m):
    r = np.random.default_rng(0)
    x, kernel = r.standard_normal((*lead, d)), r.standard_normal((d, out))
    g, v = r.standard_normal((*lead, out)), r.standard_normal(m)
    v = v / np.linalg.norm(v)
    x, kernel, g, v = (a.astype("float32") for a in (x, kernel, g, v))
    y, gx, gk = _vjp(lambda a, b: velora_matmul(a, b, v, m), x, kernel, g)
    np.testing.assert_allclose(y, x @ kernel, **F32_TOL)
    np.testing.assert_allclose(gx, g @ kernel.T, **F32_TOL)  # exact
    x_hat = _numpy_x_hat(x.astype(np.float64), v.astype(np.float64), m)
    expected = x_hat.reshape(-1, d).T @ g.reshape(-1, out)
    np.testing.assert_allclose(gk, expected, **F32_TOL)  # ∂kernel = x̂ᵀ ∂y
    exact = x.reshape(-1, d).T @ g.reshape(-1, out)
    assert not np.allclose(gk, exact, **F32_TOL)
    _, _, gk1 = _vjp(lambda a, b: velora_matmul(a, b, np.ones(1), 1), x, kernel, g)
    np.testing.assert_allclose(gk1, exact, **F32_TOL)  # M = 1, v = [1]: exact


def _batch(seed, shift=0.5, n=16):
    return np.random.default_rng(seed).standard_normal((n, 6, 16)).astype("f4") + shift


def _unit_mean(x, m):
    mean = x.astype(np.float64).reshape(-1, m).mean(axis=0)
    return mean / np.linalg.norm(mean)


def _model(**layer_kwargs):
    layer = VeLoRADense(8, group_size=4, activation="tanh", **layer_kwargs)
    model = keras.Sequential([keras.Input((6, 16)), layer, keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    return model, layer


def test_fit_loss_falls_and_v_is_set_by_the_first_batch_then_fixed():
    keras.utils.set_random_seed(0)
    model, layer = _model()
    assert not ops.convert_to_numpy(layer.v).any()
    x = _batch(1)
    y = np.sin(x.sum(axis=-1, keepdims=True))
    kernel = ops.convert_to_numpy(layer.kernel).copy()
    history = model.fit(x, y, batch_size=16, epochs=8, shuffle=False, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.9 * losses[0], losses
    assert not np.allclose(ops.convert_to_numpy(layer.kernel), kernel)  # it trains
    first = ops.convert_to_numpy(layer.v)
    np.testing.assert_allclose(first, _unit_mean(x, 4), **F32_TOL)
    model.fit(_batch(2, -3.0), y, batch_size=16, epochs=1, verbose=0)
    np.testing.assert_array_equal(ops.convert_to_numpy(layer.v), first)


def test_running_and_random_v():
    model, layer = _model(v_init="running", momentum=0.5)
    model.fit(_batch(1), np.zeros((16, 6, 1)), batch_size=16, verbose=0)
    first = ops.convert_to_numpy(layer.v).astype(np.float64)
    model.fit(_batch(2, -3.0), np.zeros((16, 6, 1)), batch_size=16, verbose=0)
    step = 0.5 * first + 0.5 * _unit_mean(_batch(2, -3.0), 4)
    got = ops.convert_to_numpy(layer.v)
    np.testing.assert_allclose(got, step / np.linalg.norm(step), **F32_TOL)
    _, random = _model(v_init="random", seed=5, stream=2)
    expected = velora.init_v_random(5, 4, stream=2)
    np.testing.assert_array_equal(ops.convert_to_numpy(random.v), expected)


def test_get_config_round_trip():
    layer = VeLoRADense(8, group_size=4, activation="relu", v_init="running")
    config = layer.get_config()
    clone = VeLoRADense.from_config(config)
    assert clone.get_config() == config
    assert (clone.group_size, clone.v_init, clone.units) == (4, "running", 8)
    assert keras.saving.get_registered_name(VeLoRADense) == "flora_keras>VeLoRADense"


def test_save_and_load_model(tmp_path):
    model, layer = _model()
    model.fit(_batch(1), np.zeros((16, 6, 1)), batch_size=16, verbose=0)
    path = str(tmp_path / "velora.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    again = loaded.layers[0]
    assert isinstance(again, VeLoRADense)
    np.testing.assert_array_equal(
        ops.convert_to_numpy(again.v), ops.convert_to_numpy(layer.v)
    )
    assert float(ops.convert_to_numpy(again.v_ready)) == 1.0
    x = _batch(3)
    np.testing.assert_allclose(
        ops.convert_to_numpy(loaded(x)), ops.convert_to_numpy(model(x)), **F32_TOL
    )


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"M=3.*D=16"):
        keras.Sequential([keras.Input((16,)), VeLoRADense(4, group_size=3)])
    with pytest.raises(ValueError, match="group_size M: 0"):
        VeLoRADense(4, group_size=0)
    with pytest.raises(ValueError, match="v_init: 'svd'"):
        VeLoRADense(4, group_size=4, v_init="svd")
    with pytest.raises(ValueError, match="units: 0"):
        VeLoRADense(0)


def test_cross_backend_z_and_x_hat_match_numpy():
    x = np.random.default_rng(0).standard_normal((3, 4, 32)).astype(np.float32)
    v = _unit_mean(x + 0.1, 8).astype(np.float32)
    z_np = velora.compress(x, v, 8)
    xt, vt = ops.convert_to_tensor(x), ops.convert_to_tensor(v)
    z = velora.compress(xt, vt, 8)
    x_hat = velora.reconstruct(z, vt, 8)
    np.testing.assert_allclose(ops.convert_to_numpy(z), z_np, **F32_TOL)
    x_hat_np = velora.reconstruct(z_np, v, 8)
    np.testing.assert_allclose(ops.convert_to_numpy(x_hat), x_hat_np, **F32_TOL)
