"""flora_optax inside optax's combinators: masked, multi_transform, inject_hyperparams."""

from __future__ import annotations

from typing import Any

import flora_optax
import jax
import jax.numpy as jnp
import optax
import pytest
from optax_testing import assert_trees_close, assert_trees_equal, make_grads, train

RANK = 6
MASK = {
    "conv": True,
    "dense": {"bias": False, "kernel": True},
    "scale": False,
    "wide": False,
}


def _leaves(tree: Any, mask: Any, keep: bool) -> list[Any]:
    pairs = zip(jax.tree.leaves(tree), jax.tree.leaves(mask), strict=True)
    return [x for x, m in pairs if m == keep]


def test_masked_leaves_keep_their_full_tree_streams(params: dict[str, Any]) -> None:
    """Under optax.masked a leaf keeps its stream, so it is updated exactly as by
    the unmasked transformation; masked-out leaves pass through."""
    grads = make_grads(params, 3)
    full = train(flora_optax.flora_adam(1e-2, rank=RANK, kappa=2), params, grads)[2]
    tx = optax.masked(flora_optax.flora_adam(1e-2, rank=RANK, kappa=2), MASK)
    masked, state, history = train(tx, params, grads)
    assert_trees_equal(_leaves(history[-1], MASK, True), _leaves(full[-1], MASK, True))
    assert_trees_equal(
        _leaves(history[-1], MASK, False), _leaves(grads[-1], MASK, False)
    )
    plans = flora_optax.plans(state)
    assert [p.param_index for p in plans] == [0, 2]  # conv, dense.kernel


def test_multi_transform_groups(params: dict[str, Any]) -> None:
    labels = jax.tree.map(lambda m: "fast" if m else "slow", MASK)
    tx = optax.multi_transform(
        {"fast": flora_optax.flora_adam(1e-2, rank=RANK),
         "slow": flora_optax.flora_adafactor(1e-3, rank=RANK)}, labels)  # fmt: skip
    grads = make_grads(params, 2)
    _, state, history = train(tx, params, grads)
    fast = train(flora_optax.flora_adam(1e-2, rank=RANK), params, grads)[2]
    slow = train(flora_optax.flora_adafactor(1e-3, rank=RANK), params, grads)[2]
    assert_trees_equal(_leaves(history[-1], MASK, True), _leaves(fast[-1], MASK, True))
    assert_trees_equal(
        _leaves(history[-1], MASK, False), _leaves(slow[-1], MASK, False)
    )
    assert len(flora_optax.plans(state)) == len(jax.tree.leaves(params))


def test_inject_hyperparams_schedule_matches_direct_schedule(
    params: dict[str, Any],
) -> None:
    """The injected learning rate follows the schedule; the other hyper-parameters
    arrive as float32 arrays, hence rtol 1e-5."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 6)
    grads = make_grads(params, 4)
    injected = optax.inject_hyperparams(flora_optax.flora_adam)(
        learning_rate=schedule, rank=RANK, kappa=2
    )
    _, state, got = train(injected, params, grads)
    want = train(flora_optax.flora_adam(schedule, rank=RANK, kappa=2), params, grads)[2]
    assert_trees_close(got, want, rtol=1e-5, atol=1e-8)
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(
        float(schedule(3))
    )


def test_inject_hyperparams_manual_learning_rate(params: dict[str, Any]) -> None:
    tx = optax.inject_hyperparams(flora_optax.flora_adam)(learning_rate=1e-2, rank=RANK)
    step = jax.jit(tx.update)
    grads = make_grads(params, 2)
    updates, state = step(grads[0], tx.init(params), params)
    assert any(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(updates))
    state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    updates, state = step(grads[1], state, params)
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates))
    assert int(state.inner_state.count) == 2


def test_inject_hyperparams_init_under_jit_is_a_clear_error(
    params: dict[str, Any],
) -> None:
    tx = optax.inject_hyperparams(flora_optax.flora_adam)(learning_rate=1e-2)
    with pytest.raises(
        ValueError, match=r"\['b1', 'b2', 'eps', .*'seed'\].*static_args"
    ):
        jax.jit(tx.init)(params)
    static = ("b1", "b2", "eps", "weight_decay", "kappa", "seed", "rank")
    tx = optax.inject_hyperparams(flora_optax.flora_adam, static_args=static)
    state = jax.jit(tx(learning_rate=1e-2, rank=RANK).init)(params)
    assert state.inner_state.mu["wide"].shape == (RANK, 56)


def test_multi_steps_around_injected_inner(params: dict[str, Any]) -> None:
    inner = optax.inject_hyperparams(flora_optax.flora_adam)(
        learning_rate=1e-2, rank=RANK
    )
    tx = flora_optax.flora_multi_steps(inner, 2, rank=RANK)
    _, state, history = train(tx, params, make_grads(params, 4))
    assert int(state.count) == 2 and int(state.inner_state.count) == 2
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(history[2]))
