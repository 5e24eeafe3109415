"""Portable checkpoints: export/import through flora_core.state, files and orbax."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import flora_optax
import jax
import optax
import pytest
from optax_testing import assert_trees_equal, make_grads, train

from flora_core.policy import DISTRIBUTIONS

RANK = 6
CASES = {
    "adam": lambda: flora_optax.flora_adam(1e-2, rank=RANK, kappa=3, weight_decay=0.1),
    "adam_factored": lambda: flora_optax.flora_adam(1e-2, rank=RANK, kappa=3, factored=True),
    "adafactor": lambda: flora_optax.flora_adafactor(1e-2, rank=RANK, kappa=3),
    "momentum": lambda: optax.chain(
        flora_optax.scale_by_flora_momentum(rank=RANK, kappa=3), optax.scale(-0.1)),
    "multi_steps": lambda: flora_optax.flora_multi_steps(
        flora_optax.flora_adam(1e-2, rank=RANK, kappa=3, factored=True), 3, rank=RANK),
}  # fmt: skip


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_file_round_trip_resumes_bit_exact(case: str, suffix: str, params: dict[str, Any],
                                           tmp_path: Path) -> None:  # fmt: skip
    """Stop after 4 steps (mid-cycle for multi_steps, past a resample), save to a
    file, load into a fresh state, continue: the same bits as an uninterrupted run."""
    tx = CASES[case]()
    grads = make_grads(params, 8)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))

    def run(state: Any, p: Any, batch: list[Any]) -> tuple[Any, Any]:
        for g in batch:
            updates, state = step(g, state, p)
            p = optax.apply_updates(p, updates)
        return state, p

    state, p = run(tx.init(params), params, grads[:4])
    flora_optax.export_state(state, path=tmp_path / f"opt{suffix}")
    restored = flora_optax.import_state(tmp_path / f"opt{suffix}", tx.init(params))
    assert_trees_equal(restored, state)
    assert_trees_equal(run(restored, p, grads[4:]), run(state, p, grads[4:]))


def test_exported_metadata(params: dict[str, Any]) -> None:
    tx = flora_optax.flora_multi_steps(
        flora_optax.flora_adam(1e-2, rank=RANK, seed=42, projection="rademacher"), 2,
        rank=RANK, seed=42, projection="rademacher",
    )  # fmt: skip
    _, state, _ = train(tx, params, make_grads(params, 3))
    flat = flora_optax.export_state(state)
    n = len(jax.tree.leaves(params))
    assert int(flat["flora.num_params"]) == n
    kernel = 2  # jax.tree.leaves order: conv, dense.bias, dense.kernel, scale, wide
    assert flat[f"param.{kernel}.mu"].shape == (48, RANK)
    assert flat[f"param.{kernel}.acc"].shape == (48, RANK)
    assert (
        int(flat[f"param.{kernel}.rank"]) == RANK
        and int(flat[f"param.{kernel}.axis"]) == 1
    )
    assert int(flat[f"param.{kernel}.seed"]) == 42
    assert int(flat[f"param.{kernel}.stream"]) == kernel << 2
    assert DISTRIBUTIONS[int(flat[f"param.{kernel}.distribution"])] == "rademacher"
    assert int(flat["param.1.rank"]) == -1  # dense.bias: not compressed
    assert {int(flat[f"param.{i}.count"]) for i in range(n)} == {1}
    assert {int(flat[f"param.{i}.micro_step"]) for i in range(n)} == {1}


@pytest.mark.parametrize(
    ("change", "message"),
    [({"seed": 1}, "seed"), ({"rank": 5}, "rank"), ({"projection": "rademacher"}, "distribution")],
)  # fmt: skip
def test_import_rejects_another_configuration(change: dict[str, Any], message: str,
                                              params: dict[str, Any]) -> None:  # fmt: skip
    flat = flora_optax.export_state(
        flora_optax.flora_adam(1e-2, rank=RANK).init(params)
    )
    other = flora_optax.flora_adam(1e-2, **{"rank": RANK, **change}).init(params)
    with pytest.raises(ValueError, match=message):
        flora_optax.import_state(flat, other)


def test_update_rejects_a_state_of_another_configuration(
    params: dict[str, Any],
) -> None:
    state = flora_optax.flora_adam(1e-2, rank=RANK).init(params)
    grads = make_grads(params, 1)[0]
    with pytest.raises(ValueError, match="state was initialised"):
        flora_optax.flora_adam(1e-2, rank=RANK, seed=1).update(grads, state, params)


def test_orbax_round_trip(params: dict[str, Any], tmp_path: Path) -> None:
    """The whole optax state (schedule count included) through orbax."""
    ocp = pytest.importorskip("orbax.checkpoint")
    tx = optax.inject_hyperparams(flora_optax.flora_adam)(
        learning_rate=optax.linear_schedule(1e-2, 0.0, 10), rank=RANK, kappa=2
    )
    _, state, _ = train(tx, params, make_grads(params, 3))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "ckpt", state)
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(tmp_path / "ckpt", tx.init(params))
    assert_trees_equal(restored, state)
    assert restored.inner_state.spec == state.inner_state.spec
