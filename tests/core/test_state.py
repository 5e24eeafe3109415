"""The portable state schema: round trip and refusal of mismatched states."""

from __future__ import annotations

import array_api_compat.numpy as xp
import numpy as np
import pytest

from flora_core import policy, rules, state


def make(rank=4, shapes=((32, 24), (24,))):
    plans = [policy.plan(s, i, rank=rank, seed=3) for i, s in enumerate(shapes)]
    states = [rules.flora_adam_init(p, rules.AdamConfig(), xp=xp) for p in plans]
    states[0]["mu"] = np.arange(
        np.prod(plans[0].state_shape), dtype=np.float32
    ).reshape(plans[0].state_shape)
    return plans, states


def test_round_trip(tmp_path):
    plans, states = make()
    flat = state.export_state(plans, states)
    np.savez(tmp_path / "s.npz", **flat)
    with np.load(tmp_path / "s.npz") as data:
        back = state.import_state(dict(data), plans)
    for a, b in zip(states, back, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(np.asarray(a[k]), b[k])
    assert int(flat["param.0.rng_version"]) == 1 and int(flat["param.0.stream"]) == 0


@pytest.mark.parametrize(
    "change,match",
    [
        (
            lambda f: f.update({"flora.format_version": np.asarray(9)}),
            "format version 9",
        ),
        (lambda f: f.update({"param.0.rng_version": np.asarray(2)}), "rng_version"),
    ],
)
def test_refuses_bad_versions(change, match):
    plans, states = make()
    flat = state.export_state(plans, states)
    change(flat)
    with pytest.raises(ValueError, match=match):
        state.import_state(flat, plans)


def test_refuses_other_rank_shape_and_count():
    plans, states = make()
    flat = state.export_state(plans, states)
    with pytest.raises(ValueError, match="rank 4.*optimizer's 5"):
        state.import_state(flat, make(rank=5)[0])
    with pytest.raises(ValueError, match="shape"):
        state.import_state(flat, make(shapes=((32, 20), (24,)))[0])
    with pytest.raises(ValueError, match="2 parameters but the optimizer has 1"):
        state.import_state(flat, make(shapes=((32, 24),))[0])
