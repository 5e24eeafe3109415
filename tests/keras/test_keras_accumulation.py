"""Compressed gradient accumulation (``accumulation_steps``) under Keras training."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from flora_keras import FloraAdafactor, FloraAdam
from keras_testing import data, mlp, nbytes, slot, weights

TAU = 3


@pytest.mark.parametrize("cls", [FloraAdam, FloraAdafactor], ids=lambda c: c.__name__)
def test_weights_change_only_every_tau_th_batch(cls):
    model, (x, y) = mlp(), data(samples=8 * 2 * TAU)
    opt = cls(1e-2, kappa=1, accumulation_steps=TAU)
    model.compile(optimizer=opt, loss="mse")
    kernel = model.layers[0].kernel
    history = [weights(model)]
    accumulators = []
    for batch in range(2 * TAU):
        rows = slice(8 * batch, 8 * batch + 8)
        model.train_on_batch(x[rows], y[rows])
        history.append(weights(model))
        accumulators.append(keras.ops.convert_to_numpy(slot(opt, kernel, "acc")))
    for batch in range(1, 2 * TAU + 1):
        changed = [
            np.any(a != b)
            for a, b in zip(history[batch - 1], history[batch], strict=True)
        ]
        updates = batch % TAU == 0
        assert all(changed) if updates else not any(changed), batch
        assert np.any(accumulators[batch - 1] != 0) != updates, batch
    assert int(keras.ops.convert_to_numpy(opt.iterations)) == 2 * TAU


def test_accumulators_are_compressed_and_keras_accumulation_is_refused():
    model = mlp(inputs=256, hidden=256, outputs=256)
    opt = FloraAdam(factored=True, accumulation_steps=4)
    opt.build(model.trainable_variables)
    kernel = model.layers[0].kernel  # 256 x 256 -> rank 64
    assert tuple(slot(opt, kernel, "acc").shape) == (256, 64)
    full = [v for v in opt.variables if tuple(v.shape) == (256, 256)]
    assert full == []  # nothing full-size for a compressed weight
    keras_accumulating = keras.optimizers.Adam(gradient_accumulation_steps=4)
    keras_accumulating.build(model.trainable_variables)
    assert nbytes(opt.variables) < nbytes(keras_accumulating.variables) / 5
    with pytest.raises(ValueError, match="accumulation_steps=4 instead"):
        FloraAdam(gradient_accumulation_steps=4)


def test_identity_accumulation_equals_keras_adamw_on_the_whole_batch():
    """``projection="identity"``: τ micro-batches of 8 = one batch of 8τ (mean loss)
    for Keras AdamW. Epsilon 1e-12 on both (Keras adds it before bias correction)."""
    (x, y), trained = data(samples=8 * TAU * 2), []
    flora = FloraAdam(
        1e-2,
        epsilon=1e-12,
        projection="identity",
        accumulation_steps=TAU,
        weight_decay=0.1,
    )
    model = mlp()
    model.compile(optimizer=flora, loss="mse")
    for batch in range(2 * TAU):
        model.train_on_batch(x[8 * batch : 8 * batch + 8], y[8 * batch : 8 * batch + 8])
    trained.append(weights(model))
    model = mlp()
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-2, epsilon=1e-12, weight_decay=0.1),
        loss="mse",
    )
    for batch in range(2):
        rows = slice(8 * TAU * batch, 8 * TAU * (batch + 1))
        model.train_on_batch(x[rows], y[rows])
    trained.append(weights(model))
    for accumulated, whole in zip(*trained, strict=True):
        np.testing.assert_allclose(accumulated, whole, rtol=1e-5, atol=1e-6)
