"""flora_optax inside optax's combinators: masked, multi_transform, inject_hyperparams."""

from __future__ import annotations

from typing import Any

import flora_optax
import jax
import jax.numpy as jnp
import numpy as np
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


def test_inject_hyperparams_init_under_jit(params: dict[str, Any]) -> None:
    """jit(init) needs only the shape-fixing arguments static (here: none, rank is
    "auto"); a jitted update then names what flora_core needs as Python values and
    the state could not record, and works once they are static."""
    tx = optax.inject_hyperparams(flora_optax.flora_adam)(learning_rate=1e-2)
    state = jax.jit(tx.init)(params)
    assert state.inner_state.mu["dense"]["kernel"].shape == (48, 40 // 4)  # "auto"
    grads = make_grads(params, 1)[0]
    with pytest.raises(
        ValueError, match=r"\['seed', 'b1', 'b2', 'weight_decay'\].*static_args"
    ):
        jax.jit(tx.update)(grads, state, params)
    static = ("b1", "b2", "weight_decay", "seed", "rank")
    tx = optax.inject_hyperparams(flora_optax.flora_adam, static_args=static)
    tx = tx(learning_rate=1e-2, rank=RANK)
    state = jax.jit(tx.init)(params)
    assert state.inner_state.mu["wide"].shape == (RANK, 56)
    updates, state = jax.jit(tx.update)(grads, state, params)
    direct = flora_optax.flora_adam(1e-2, rank=RANK)
    want, _ = direct.update(grads, direct.init(params), params)
    assert_trees_close(updates, want, rtol=1e-5, atol=1e-8)


def test_rank_must_be_static_under_jitted_init(params: dict[str, Any]) -> None:
    tx = optax.inject_hyperparams(flora_optax.flora_adam)(learning_rate=1e-2, rank=RANK)
    with pytest.raises(ValueError, match=r"traced \['rank'\], which fix the state"):
        jax.jit(tx.init)(params)


def test_injected_hyperparameters_are_followed(params: dict[str, Any]) -> None:
    """A value set in state.hyperparams reaches the core where its math takes
    arrays (eps, kappa): the jitted update equals a transformation built with it."""
    tx = optax.inject_hyperparams(flora_optax.flora_adam)(
        learning_rate=1e-2, rank=RANK, eps=1e-8, kappa=1000
    )
    step = jax.jit(tx.update)
    grads = make_grads(params, 3)
    state = tx.init(params)
    state.hyperparams["eps"] = jnp.asarray(0.5)
    state.hyperparams["kappa"] = jnp.asarray(1)  # a resample at every step
    direct = flora_optax.flora_adam(1e-2, rank=RANK, eps=0.5, kappa=1)
    want = train(direct, params, grads)[2]
    got = []
    for g in grads:
        updates, state = step(g, state, params)
        got.append(updates)
    assert_trees_close(got, want, rtol=1e-5, atol=1e-7)


def test_multi_steps_around_injected_inner(params: dict[str, Any]) -> None:
    inner = optax.inject_hyperparams(flora_optax.flora_adam)(
        learning_rate=1e-2, rank=RANK
    )
    tx = flora_optax.flora_multi_steps(inner, 2, rank=RANK)
    _, state, history = train(tx, params, make_grads(params, 4))
    assert int(state.count) == 2 and int(state.inner_state.count) == 2
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(history[2]))


MAPPED = {
    "adam": lambda: flora_optax.flora_adam(1e-2, rank=RANK, kappa=2),
    "adam_factored": lambda: flora_optax.flora_adam(1e-2, rank=RANK, factored=True),
    "adafactor": lambda: flora_optax.flora_adafactor(1e-2, rank=RANK, kappa=2),
    "adafactor_no_momentum": lambda: flora_optax.flora_adafactor(1e-2, momentum=None),
    "momentum": lambda: optax.chain(
        flora_optax.scale_by_flora_momentum(rank=RANK, kappa=2), optax.scale(-0.1)),
    "multi_steps": lambda: flora_optax.flora_multi_steps(
        flora_optax.flora_adam(1e-2, rank=RANK, kappa=2), 2, rank=RANK),
    "masked": lambda: optax.masked(flora_optax.flora_adam(1e-2, rank=RANK), MASK),
    "multi_transform": lambda: optax.multi_transform(
        {"fast": flora_optax.flora_adam(1e-2, rank=RANK),
         "slow": flora_optax.flora_adafactor(1e-3, rank=RANK)},
        jax.tree.map(lambda m: "fast" if m else "slow", MASK)),
    "inject": lambda: optax.inject_hyperparams(flora_optax.flora_adam)(
        learning_rate=optax.linear_schedule(1e-2, 0.0, 10), rank=RANK, kappa=2),
    "optax_multi_steps": lambda: optax.MultiSteps(
        flora_optax.flora_adam(1e-2, rank=RANK, kappa=2), 2).gradient_transformation(),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(MAPPED))
def test_tree_map_params(name: str, params: dict[str, Any]) -> None:
    """optax.tree.map_params works on every Flora state (its structure does not
    depend on the params): mapping every params-shaped field to a marker reaches all
    of them and nothing else, and an identity map trains exactly like the state
    itself, jitted once; the mapped state exports given the params."""
    tx = MAPPED[name]()
    state = tx.init(params)
    marked = optax.tree.map_params(
        tx, lambda _: "param", state, transform_non_params=lambda _: "other"
    )
    kinds = jax.tree.leaves(marked, is_leaf=lambda x: x is None)
    assert "param" in kinds and "other" in kinds  # count, and the moments
    is_array = lambda x: isinstance(x, jax.Array)  # noqa: E731
    assert len(jax.tree.leaves(marked)) == len(jax.tree.leaves(state, is_leaf=is_array))
    grads = make_grads(params, 3)
    step = jax.jit(tx.update)
    mapped = optax.tree.map_params(tx, lambda v: v, state)
    for g in grads:
        want, state = step(g, state, params)
        got, mapped = step(g, mapped, params)
        assert_trees_equal(got, want)
    assert step._cache_size() == 1
    flat, want = (
        flora_optax.export_state(mapped, params),
        flora_optax.export_state(state),
    )
    assert sorted(flat) == sorted(want)
    for key in flat:
        np.testing.assert_array_equal(flat[key], want[key], err_msg=key)


def test_tree_map_params_onto_shardings(params: dict[str, Any]) -> None:
    """The use map_params exists for, as flora_optax's docstring shows it: the
    params' shardings mapped onto the state (a field a leaf does not use holds None:
    ``is_leaf`` keeps it; a compressed or factored field does not have the param's
    shape: replicated here), then jit's out_shardings for init."""
    from jax.sharding import SingleDeviceSharding

    device = SingleDeviceSharding(jax.devices()[0])
    tx = flora_optax.flora_adam(1e-2, rank=RANK, factored=True)
    shardings = jax.tree.map(lambda _: device, params)
    seen = []

    def place(leaf: Any, param: Any, sharding: Any) -> Any:
        seen.append(None if leaf is None else (leaf.shape, param.shape))
        if leaf is None:
            return None
        return sharding if leaf.shape == param.shape else device

    abstract = jax.eval_shape(tx.init, params)
    state_shardings = optax.tree.map_params(
        tx, place, abstract, params, shardings,
        transform_non_params=lambda _: device, is_leaf=lambda x: x is None,
    )  # fmt: skip
    state = jax.jit(tx.init, out_shardings=state_shardings)(params)
    assert ((48, RANK), (48, 40)) in seen and ((48,), (48, 40)) in seen
    assert None in seen  # nu of a factored leaf
    assert state.mu["dense"]["kernel"].sharding == device
    assert flora_optax.plans(state)[2].rank == RANK
