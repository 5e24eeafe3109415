"""Compressed gradient accumulation (``accumulation_steps``) under Keras training."""

from __future__ import annotations

import array_api_compat.numpy as np_xp
import keras
import numpy as np
import pytest
from flora_keras import FloraAdafactor, FloraAdam
from flora_keras._base import _decompressed_sq_norm
from keras_testing import BACKEND, data, mlp, nbytes, slot, weights

from conformance.adapters_keras import make_step
from flora_core import accumulation, policy

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
    # As Keras' own accumulation: _iterations counts calls, iterations updates.
    assert int(keras.ops.convert_to_numpy(opt._iterations)) == 2 * TAU
    assert int(keras.ops.convert_to_numpy(opt.iterations)) == 2


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


CLIPS = {"clipnorm": 0.5, "global_clipnorm": 0.5, "clipvalue": 0.05}


def cycles(shapes, tau: int, scales=(1.0, 20.0), seed: int = 0):
    """Micro-batch gradients of two cycles, the second 20x larger (Adam is
    scale-invariant in a single step: two scales make clipping show)."""
    rs = np.random.default_rng(seed)
    return [
        [[(scale * rs.standard_normal(s)).astype("float32") for s in shapes]
         for _ in range(tau)]
        for scale in scales
    ]  # fmt: skip


def run(optimizer, initial, batches) -> list[np.ndarray]:
    """Apply every micro-batch as ``fit`` would on this backend (tf.function,
    jax.jit of stateless_apply, eager torch); the optimizer's variables hold the
    final state afterwards."""
    variables = [keras.Variable(v) for v in initial]
    if BACKEND != "jax":
        step = make_step(optimizer, variables)
        for cycle in batches:
            for grads in cycle:
                step(grads)
        return [keras.ops.convert_to_numpy(v) for v in variables]
    import jax

    optimizer.build(variables)
    apply = jax.jit(optimizer.stateless_apply)
    params = [v.value for v in variables]
    state = [v.value for v in optimizer.variables]
    for cycle in batches:
        for grads in cycle:
            params, state = apply(state, grads, params)
    for variable, new in zip(optimizer.variables, state, strict=True):
        variable.assign(new)
    return [np.asarray(p) for p in params]


@pytest.mark.parametrize("clip", sorted(CLIPS))
def test_clipping_applies_to_the_mean_as_in_keras_accumulation(clip):
    """projection="identity": FloraAdam(accumulation_steps=3) with clipping follows
    Keras' Adam(gradient_accumulation_steps=3), which clips the accumulated mean;
    clipping binds (the unclipped run differs)."""
    shapes, rs = [(8, 6), (6,)], np.random.default_rng(1)
    initial = [rs.standard_normal(s).astype("float32") for s in shapes]
    batches = cycles(shapes, TAU)
    kwargs = {clip: CLIPS[clip]}
    flora = run(FloraAdam(0.1, projection="identity", accumulation_steps=TAU, **kwargs),
                initial, batches)  # fmt: skip
    host = run(keras.optimizers.Adam(0.1, gradient_accumulation_steps=TAU, **kwargs),
               initial, batches)  # fmt: skip
    unclipped = run(FloraAdam(0.1, projection="identity", accumulation_steps=TAU),
                    initial, batches)  # fmt: skip
    for got, want, free in zip(flora, host, unclipped, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert not np.allclose(got, free, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("clip", ["clipnorm", "global_clipnorm"])
def test_compressed_means_are_clipped_by_their_norms(clip):
    """Compressed accumulators: the decompressed mean of each cycle is scaled by
    c / its norm (clipnorm) or c / the global norm of all means (global_clipnorm,
    computed in r x r space). Accumulation is linear, so that equals an unclipped
    optimizer fed every micro-batch gradient times the cycle's scale."""
    shapes, tau, c = [(64, 48), (48,)], 2, CLIPS[clip]
    rs = np.random.default_rng(2)
    initial = [rs.standard_normal(s).astype("float32") for s in shapes]
    batches = cycles(shapes, tau)
    opt = FloraAdam(0.1, rank=6, accumulation_steps=tau, **{clip: c})
    got = run(opt, initial, batches)
    assert [p.rank for p in opt.plans] == [6, None]
    scaled = []
    for index, cycle in enumerate(batches):
        means = []
        for i, plan in enumerate(opt.plans):
            acc = np.zeros(accumulation.accumulator_shape(plan), np.float32)
            for grads in cycle:
                acc = accumulation.accumulate(acc, grads[i], index, plan=plan, xp=np_xp)
            means.append(accumulation.accumulated_gradient(acc, index, tau, plan=plan,
                                                           xp=np_xp))  # fmt: skip
        norms = [float(np.linalg.norm(m)) for m in means]
        if clip == "global_clipnorm":
            norms = [float(np.linalg.norm(norms))] * len(norms)
        assert all(n > c for n in norms)  # the clip binds in both cycles
        scales = [c / n for n in norms]
        scaled.append([[g * s for g, s in zip(grads, scales, strict=True)]
                       for grads in cycle])  # fmt: skip
    reference = FloraAdam(0.1, rank=6, accumulation_steps=tau)
    run(reference, initial, scaled)
    # The moments are linear (mu) and quadratic (nu) in what the rule saw, so they
    # compare tightly; the weights go through m / sqrt(v), which amplifies rounding
    # where a projected gradient element is near zero (NOTE [conditioning]).
    for mine, theirs in zip(opt._slots, reference._slots, strict=True):
        for name in ("mu", "nu"):
            np.testing.assert_allclose(
                keras.ops.convert_to_numpy(mine[name]),
                keras.ops.convert_to_numpy(theirs[name]),
                rtol=1e-5, atol=1e-7, err_msg=name,
            )  # fmt: skip
    unclipped = run(FloraAdam(0.1, rank=6, accumulation_steps=tau), initial, batches)
    for g, free in zip(got, unclipped, strict=True):
        assert not np.allclose(g, free, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("shape", [(64, 48), (48, 64)], ids=["axis0", "axis1"])
def test_norm_in_r_by_r_space(shape):
    """NOTE [norm in r x r space]: the squared norm of decompress(acc) without
    decompressing, for either compressed axis."""
    plan = policy.plan(shape, 3, rank=6, seed=5)
    acc = np.random.default_rng(0).standard_normal(plan.state_shape).astype("float32")
    full = accumulation.accumulated_gradient(acc, 7, 1, plan=plan, xp=np_xp)
    got = _decompressed_sq_norm(acc, 7, plan=plan, xp=np_xp, device=None)
    np.testing.assert_allclose(got, np.sum(full.astype(np.float64) ** 2), rtol=1e-5)
