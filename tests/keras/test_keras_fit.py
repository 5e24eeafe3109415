"""``model.compile(optimizer=Flora...())`` then ``fit`` on this process's backend."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from flora_keras import FloraAdafactor, FloraAdam
from keras_testing import BACKEND, data, mlp, nbytes, slot, weights

from flora_core import rules

OPTIMIZERS = {
    "adam": lambda: FloraAdam(1e-2),
    "adam_factored": lambda: FloraAdam(1e-2, factored=True),
    "adafactor": lambda: FloraAdafactor(1e-2, min_dim_size_to_factor=16),
}


def expected_shapes(optimizer, variable) -> dict[str, tuple[int, ...]]:
    """The slot shapes the core's own initialiser gives for this weight's plan."""
    import array_api_compat.numpy as np_xp

    index = optimizer._get_variable_index(variable)
    plan, config = optimizer.plans[index], optimizer._configs[index]
    init = optimizer._init(plan, config, xp=np_xp)
    return {name: value.shape for name, value in init.items() if name != "count"}


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_fit_trains_with_compressed_slots(optimizer):
    model, (x, y) = mlp(), data()
    opt = OPTIMIZERS[optimizer]()
    model.compile(optimizer=opt, loss="mse")
    before = weights(model)
    history = model.fit(x, y, batch_size=8, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert all(np.any(a != b) for a, b in zip(before, weights(model), strict=True))
    assert int(keras.ops.convert_to_numpy(opt.iterations)) == 12
    kernel = model.layers[0].kernel  # (40, 48): compress axis 0 (d = 40) to r = 10
    plan = opt.plans[opt._get_variable_index(kernel)]
    assert (plan.rank, plan.axis, plan.state_shape) == (10, 0, (10, 48))
    if "mu" in expected_shapes(opt, kernel):
        assert tuple(slot(opt, kernel, "mu").shape) == (10, 48)
    for variable in model.trainable_variables:
        got = {
            n: tuple(v.shape)
            for n, v in opt._slots[opt._get_variable_index(variable)].items()
        }
        assert got == expected_shapes(opt, variable), variable.path
        assert all(
            v.dtype == "float32"
            for v in opt._slots[opt._get_variable_index(variable)].values()
        )


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_optimizer_variables_take_fewer_bytes_than_keras_adam(optimizer):
    model = mlp(inputs=256, hidden=256, outputs=256)
    adam = keras.optimizers.Adam()
    adam.build(model.trainable_variables)
    opt = OPTIMIZERS[optimizer]()
    opt.build(model.trainable_variables)
    params = nbytes(model.trainable_variables)
    # Adam: 2 full moments. FloraAdam: full nu + a 4x smaller mu (rank d // 4 = 64).
    ratio = {"adam": 1.25 / 2, "adam_factored": 0.25 / 2, "adafactor": 0.25 / 2}
    assert nbytes(adam.variables) > 2 * params
    assert nbytes(opt.variables) < nbytes(adam.variables)
    assert nbytes(opt.variables) / nbytes(adam.variables) < ratio[optimizer] + 0.02


def test_embedding_gradients_are_handled():
    """TensorFlow hands embeddings ``IndexedSlices``; the adapter densifies them."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8,), dtype="int32"),
            keras.layers.Embedding(100, 64),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(1),
        ]
    )
    opt = FloraAdam(1e-2, factored=True)
    model.compile(optimizer=opt, loss="mse")
    x = np.random.default_rng(0).integers(0, 100, (16, 8)).astype("int32")
    table = keras.ops.convert_to_numpy(model.layers[0].embeddings).copy()
    model.fit(x, np.ones((16, 1), "float32"), batch_size=8, verbose=0)
    new_table = keras.ops.convert_to_numpy(model.layers[0].embeddings)
    unused = np.setdiff1d(np.arange(100), x)
    used = np.unique(x)
    # Compressed along the embedding axis (64 -> 16): rows never looked up stay put.
    assert tuple(slot(opt, model.layers[0].embeddings, "mu").shape) == (100, 16)
    np.testing.assert_array_equal(new_table[unused], table[unused])
    assert np.all(np.any(new_table[used] != table[used], axis=1))


@pytest.mark.skipif(
    BACKEND == "jax", reason="JAX always compiles the train step with XLA"
)
def test_fit_with_jit_compile_matches_plain_fit():
    """``jit_compile=True`` (TensorFlow: XLA, the default on GPUs; torch:
    ``torch.compile`` of the model with the optimizer update left eager) gives the
    same trajectory."""
    results = []
    for jit in (False, True):
        model, (x, y) = mlp(), data()
        model.compile(
            optimizer=FloraAdam(1e-2, kappa=2, accumulation_steps=2),
            loss="mse",
            jit_compile=jit,
        )
        model.fit(x, y, batch_size=8, epochs=2, verbose=0)
        results.append(weights(model))
    # The compiled forward/backward sums in another order; the conformance
    # tolerance covers what FloraAdam's m / sqrt(v) makes of that.
    for plain, compiled in zip(*results, strict=True):
        np.testing.assert_allclose(compiled, plain, rtol=1e-4, atol=1e-5)


def test_adam_identity_mode_is_keras_adamw_under_fit():
    """With ``projection="identity"``, FloraAdam + weight decay equals Keras AdamW,
    including ``exclude_from_weight_decay``. Keras adds epsilon before the bias
    correction, the core after; tiny tanh-MLP gradients make that visible at
    ``1e-8``, so both use ``1e-12``."""
    trained = []
    for make in (
        lambda: FloraAdam(1e-2, epsilon=1e-12, projection="identity", weight_decay=0.1),
        lambda: keras.optimizers.AdamW(1e-2, epsilon=1e-12, weight_decay=0.1),
    ):
        model, (x, y) = mlp(), data()
        opt = make()
        opt.exclude_from_weight_decay(var_names=["bias"])
        model.compile(optimizer=opt, loss="mse")
        model.fit(x, y, batch_size=8, epochs=2, verbose=0)
        trained.append(weights(model))
    for flora, keras_adamw in zip(*trained, strict=True):
        np.testing.assert_allclose(flora, keras_adamw, rtol=1e-5, atol=1e-6)


def test_adafactor_without_momentum_is_keras_adafactor_on_matrices_and_vectors():
    """Keras' Adafactor = FloraAdafactor(momentum=None) when both factor the same
    axes (2-D kernels, 1-D biases) and lr < 1/sqrt(t) (no relative-step cap)."""
    trained = []
    for make in (
        lambda: FloraAdafactor(1e-2, momentum=None, min_dim_size_to_factor=1),
        lambda: keras.optimizers.Adafactor(1e-2),
    ):
        model, (x, y) = mlp(), data()
        model.compile(optimizer=make(), loss="mse")
        model.fit(x, y, batch_size=8, epochs=2, verbose=0)
        trained.append(weights(model))
    for flora, keras_adafactor in zip(*trained, strict=True):
        np.testing.assert_allclose(flora, keras_adafactor, rtol=1e-5, atol=1e-6)


def test_rule_state_names_are_the_portable_schema():
    opt = FloraAdam(factored=True)
    opt.build([keras.Variable(np.zeros((64, 48), "float32"))])
    assert sorted(opt._slots[0]) == ["mu", "nu_col", "nu_row"]
    assert rules.flora_adam is FloraAdam._rule
