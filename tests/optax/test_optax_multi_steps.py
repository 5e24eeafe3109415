"""flora_multi_steps: optax.MultiSteps semantics with a compressed accumulator."""

from __future__ import annotations

from typing import Any

import flora_optax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax_testing import assert_trees_close, make_grads, make_params, train

from flora_core import accumulation

RANK = 6


def _nbytes(tree: Any) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def _is_zero(tree: Any) -> bool:
    return all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("every_k", [3, "schedule"], ids=["k=3", "k=2,3,2,..."])
def test_identity_equals_optax_multisteps(every_k: Any, params: dict[str, Any]) -> None:
    """With A = I the accumulated mean equals optax's (up to the order of the float
    additions: optax keeps a running mean, Flora a sum divided by k)."""
    k = (lambda count: 2 + count % 2) if every_k == "schedule" else every_k
    grads = make_grads(params, 8)
    tx = flora_optax.flora_multi_steps(optax.sgd(0.1), k, projection="identity")
    reference = optax.MultiSteps(optax.sgd(0.1), k).gradient_transformation()
    got, state, got_updates = train(tx, params, grads)
    want, _, want_updates = train(reference, params, grads)
    assert_trees_close(got_updates, want_updates, rtol=1e-6, atol=1e-7)
    assert_trees_close(got, want, rtol=1e-6, atol=1e-7)
    assert int(state.count) == (2 if every_k == 3 else 3)


def test_compressed_accumulator_cycle(params: dict[str, Any]) -> None:
    tx = flora_optax.flora_multi_steps(
        flora_optax.flora_adam(1e-2, rank=RANK), 3, rank=RANK
    )
    state = tx.init(params)
    assert state.acc["dense"]["kernel"].shape == (48, RANK)
    assert state.acc["wide"].shape == (RANK, 56) and state.acc["conv"].shape == (
        RANK,
        36,
    )
    assert state.acc["dense"]["bias"].shape == (40,)  # uncompressed: full-size
    step = jax.jit(tx.update)
    grads = make_grads(params, 6)
    for t, g in enumerate(grads):
        updates, state = step(g, state, params)
        emitted = t % 3 == 2
        assert _is_zero(updates) != emitted
        assert int(state.micro_step) == (t + 1) % 3
        assert int(state.count) == int(state.inner_state.count) == (t + 1) // 3
        assert _is_zero(state.acc) == emitted


def test_emitted_gradient_is_the_core_mean(params: dict[str, Any]) -> None:
    """On the emitting step the inner optimizer sees decompress(sum_j A_c g_j) / k."""
    k, params = 2, make_params(shapes={"w": (48, 40)})
    tx = flora_optax.flora_multi_steps(optax.sgd(1.0), k, rank=RANK, seed=3)
    grads = make_grads(params, 2 * k)
    _, state, history = train(tx, params, grads)
    plan = flora_optax.plans(state)[0]
    for cycle in range(2):
        acc = np.zeros(accumulation.accumulator_shape(plan), np.float32)
        for g in grads[cycle * k : (cycle + 1) * k]:
            acc = accumulation.accumulate(
                acc, np.asarray(g["w"]), cycle, plan=plan, xp=np
            )
        mean = accumulation.accumulated_gradient(acc, cycle, k, plan=plan, xp=np)
        got = -np.asarray(history[cycle * k + k - 1]["w"])
        np.testing.assert_allclose(got, mean, rtol=1e-5, atol=1e-6)


def test_state_is_smaller_than_optax_multisteps() -> None:
    """Accumulator bytes (sum of the state's array nbytes, inner state excluded)."""
    params = {"w": jnp.zeros((512, 256)), "b": jnp.zeros(256)}
    flora = flora_optax.flora_multi_steps(optax.sgd(0.1), 4, rank=32).init(params)
    full = optax.MultiSteps(optax.sgd(0.1), 4).init(params)
    assert _nbytes(flora.acc) == 4 * (512 * 32 + 256)
    assert _nbytes(full.acc_grads) == 4 * (512 * 256 + 256)
    assert _nbytes(flora) < _nbytes(full) / 7


def test_bad_schedules() -> None:
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises((TypeError, ValueError), match="every_k_schedule"):
            flora_optax.flora_multi_steps(optax.sgd(0.1), bad)


def _clip_case() -> tuple[Any, list[Any]]:
    params = make_params(shapes={"w": (48, 40), "b": (40,)})
    grads = [jax.tree.map(lambda g: 10 * g, g) for g in make_grads(params, 2)]
    return params, grads


def _emitted(tx: optax.GradientTransformation, params: Any, grads: list[Any]) -> Any:
    return train(tx, params, grads)[2][-1]


def test_clip_inside_clips_the_mean_the_update_uses() -> None:
    """clip_by_global_norm inside flora_multi_steps scales the decompressed mean to
    norm c: the update is the unclipped one times c / its norm (norm > c here)."""
    params, grads = _clip_case()
    sgd = optax.sgd(1.0)
    raw = _emitted(flora_optax.flora_multi_steps(sgd, 2, rank=RANK), params, grads)
    clipped = _emitted(
        flora_optax.flora_multi_steps(
            optax.chain(optax.clip_by_global_norm(1.0), sgd), 2, rank=RANK
        ),
        params,
        grads,
    )
    norm = float(optax.tree.norm(raw))
    assert norm > 10.0
    np.testing.assert_allclose(float(optax.tree.norm(clipped)), 1.0, rtol=1e-5)
    expected = jax.tree.map(lambda u: u / norm, raw)
    assert_trees_close(clipped, expected, rtol=1e-4, atol=1e-7)


def test_clip_outside_clips_each_micro_batch() -> None:
    """Chained before flora_multi_steps, the clip acts on each micro-batch gradient
    before compression (the same update as accumulating pre-clipped gradients), and
    the mean the update uses is not bounded by c."""
    params, grads = _clip_case()
    clip = optax.clip_by_global_norm(1.0)
    chained = optax.chain(
        clip, flora_optax.flora_multi_steps(optax.sgd(1.0), 2, rank=RANK)
    )
    got = _emitted(chained, params, grads)
    pre_clipped = [clip.update(g, clip.init(params))[0] for g in grads]
    want = _emitted(flora_optax.flora_multi_steps(optax.sgd(1.0), 2, rank=RANK),
                    params, pre_clipped)  # fmt: skip
    assert_trees_close(got, want, rtol=1e-5, atol=1e-7)
    assert float(optax.tree.norm(got)) > 1.0
