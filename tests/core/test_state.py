"""The portable state, format 2: round trip and named refusals of what would be
misread (docs/spec.md §5)."""

from __future__ import annotations

import dataclasses
import warnings

import array_api_compat.numpy as xp
import numpy as np
import pytest

from flora_core import policy, rules, state

CONFIG = rules.AdamConfig(kappa=10)


def make(rank=4, shapes=((32, 24), (24,)), names=("w", "b"), config=CONFIG, tau=1):
    plans = [policy.plan(s, i, rank=rank, seed=3) for i, s in enumerate(shapes)]
    states = [rules.flora_adam_init(p, config, xp=xp) for p in plans]
    for s in states:
        s["count"] = 7
    states[0]["mu"] = np.arange(
        np.prod(plans[0].state_shape), dtype=np.float32
    ).reshape(plans[0].state_shape)
    header = state.Header.of("adam", config, accumulation_steps=tau, names=names)
    return plans, states, header


def exported(**kwargs):
    plans, states, header = make(**kwargs)
    return state.export_state(plans, states, header)


def test_round_trip_is_exact():
    plans, states, header = make()
    back = state.import_state(state.export_state(plans, states, header), plans, header)
    for a, b in zip(states, back, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(np.asarray(a[k]), b[k])
    assert back[0]["count"].dtype == np.int64 and back[0]["mu"].dtype == np.float32


def test_header_records_what_gives_the_state_its_meaning():
    flat = exported()
    document = state.read_header(flat)
    assert document["format_version"] == 2
    assert {p["optimizer"] for p in document["params"]} == {"adam"}
    assert document["params"][1]["hyperparameters"]["kappa"] == 10
    assert [p["name"] for p in document["params"]] == ["w", "b"]
    assert document["params"][0]["fields"]["mu"] == {"dtype": "<f4", "shape": [32, 4]}


def _with_header(flat, **changes):
    """``flat`` with its header document changed and the checksum recomputed (a
    well-formed file written by a differently configured optimizer)."""
    import json

    document = state.read_header(flat)
    for key, value in changes.items():
        target = document
        *path, last = key.split(".")
        for part in path:
            target = target[int(part) if part.isdigit() else part]
        target[last] = value
    flat = dict(flat)
    flat[state.HEADER_KEY] = np.frombuffer(json.dumps(document).encode(), np.uint8)
    flat[state.CHECKSUM_KEY] = state.checksum(flat)
    return flat


@pytest.mark.parametrize(
    "changes,match",
    [
        (
            {"params.0.optimizer": "adafactor"},
            "optimizer: file .adafactor., optimizer .adam.",
        ),
        ({"params.0.hyperparameters.kappa": 1000}, "kappa: file 1000, optimizer 10"),
        ({"params.1.hyperparameters.b1": 0.95}, "b1: file 0.95, optimizer 0.9"),
        ({"params.0.hyperparameters.second_moment": "gradient"}, "second_moment: file"),
        ({"params.0.name": "b"}, "name: file 'b', optimizer 'w'"),
        ({"rng_version": 2}, "rng_version: file 2"),
    ],
)
def test_meaningful_mismatches_are_refused_by_name(changes, match):
    plans, _, header = make()
    with pytest.raises(ValueError, match=match):
        state.import_state(_with_header(exported(), **changes), plans, header)


def test_other_hyperparameters_may_differ_on_resume():
    """lr-like settings (eps, weight decay, the transfer rule) only change future
    updates: a state moves between optimizers that differ in them."""
    plans, _, header = make()
    other = dataclasses.replace(CONFIG, eps=1e-6, weight_decay=0.1, transfer="paper")
    state.import_state(
        exported(), plans, state.Header.of("adam", other, names=("w", "b"))
    )


def test_names_are_compared_only_where_both_sides_have_them():
    plans, _, header = make()
    unnamed = dataclasses.replace(header, names=())
    state.import_state(exported(), plans, unnamed)
    state.import_state(exported(names=()), plans, header)
    with pytest.raises(ValueError, match="name: file 'w', optimizer 'b'"):
        state.import_state(
            exported(), plans, dataclasses.replace(header, names=("b", "w"))
        )


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("count", np.asarray(-1), "count -1 is out of range"),
        ("count", np.asarray(7.9), "count must be an integer"),
        ("count", np.asarray([7, 7]), "count must be an integer scalar"),
        ("nu", np.full((32, 24), -1.0, np.float32), "nu holds negative values"),
        ("nu", np.full((32, 24), np.nan, np.float32), "nu holds non-finite"),
        ("mu", np.full((32, 4), np.inf, np.float32), "mu holds non-finite"),
        ("micro_step", np.asarray(-2), "micro_step -2 is out of range"),
    ],
)
def test_counters_and_statistics_are_range_checked(field, value, match):
    plans, states, header = make()
    states[0][field] = value
    flat = state.export_state(plans, states, header) if field != "count" else None
    if flat is None:  # export normalises counters: write the bad one by hand
        flat = exported()
        flat["param.0.count"] = value
        flat[state.CHECKSUM_KEY] = state.checksum(flat)
    with pytest.raises(ValueError, match=match):
        state.import_state(flat, plans, header)


def test_a_cycle_longer_than_tau_or_a_partial_one_without_accumulation_is_refused():
    plans, states, header = make(tau=4)
    for s in states:
        s["micro_step"] = 3
    flat = state.export_state(plans, states, header)
    state.import_state(flat, plans, header)  # 3 < τ = 4
    with pytest.raises(
        ValueError, match="micro_step 3 is not below accumulation_steps 2"
    ):
        state.import_state(
            flat, plans, dataclasses.replace(header, accumulation_steps=2)
        )
    with pytest.raises(
        ValueError, match="3 accumulated micro-batches of an unfinished"
    ):
        state.import_state(
            flat, plans, dataclasses.replace(header, accumulation_steps=1)
        )


def test_a_changed_byte_fails_the_checksum():
    plans, _, header = make()
    flat = exported()
    flat["param.0.mu"] = flat["param.0.mu"].copy()
    flat["param.0.mu"].view(np.uint8)[5] ^= 0x10
    with pytest.raises(ValueError, match="checksum does not match"):
        state.import_state(flat, plans, header)


def test_plans_are_checked():
    flat = exported()
    plans, _, header = make(rank=5)
    with pytest.raises(ValueError, match="rank: file 4, optimizer 5"):
        state.import_state(flat, plans, header)
    plans, _, header = make(shapes=((32, 20), (24,)))
    with pytest.raises(ValueError, match="shape: file"):
        state.import_state(flat, plans, header)
    plans, _, header = make(shapes=((32, 24),), names=("w",))
    with pytest.raises(ValueError, match="num_params: file 2, optimizer 1"):
        state.import_state(flat, plans, header)


def test_a_missing_metadata_field_is_named():
    plans, _, header = make()
    flat = exported()
    del flat["param.0.seed"]
    flat[state.CHECKSUM_KEY] = state.checksum(flat)
    with pytest.raises(ValueError, match="Parameter 0: the state has no 'seed'"):
        state.import_state(flat, plans, header)


def test_format_1_loads_with_a_warning_naming_what_was_not_checked():
    plans, states, header = make()
    flat = exported()
    for key in (state.HEADER_KEY, state.CHECKSUM_KEY):
        del flat[key]
    flat["flora.format_version"] = np.asarray(1)
    with pytest.warns(state.FloraStateWarning, match="kappa.*Save it again"):
        back = state.import_state(flat, plans, header)
    np.testing.assert_array_equal(back[0]["mu"], states[0]["mu"])


@pytest.mark.parametrize("version", [0, 3, 9])
def test_unknown_versions_are_refused(version):
    plans, _, header = make()
    flat = exported()
    flat["flora.format_version"] = np.asarray(version)
    with pytest.raises(ValueError, match=f"format version {version}"):
        state.import_state(flat, plans, header)


def test_format_2_without_its_header_is_refused():
    plans, _, header = make()
    flat = exported()
    del flat[state.HEADER_KEY]
    with pytest.raises(ValueError, match="no 'flora.header'"):
        state.import_state(flat, plans, header)


def test_no_warning_for_format_2():
    plans, _, header = make()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state.import_state(exported(), plans, header)
