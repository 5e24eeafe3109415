"""flora_torch refuses, by name and with both values, every state that it would
misread (issue 16, docs/spec.md §5.6): through ``load_state_dict`` and
``import_state`` (a flat mapping or a file)."""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from flora_torch import FloraAdafactor, FloraAdam

from flora_core import state as portable
from flora_core import state_files

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
KWARGS = {"rank": 4, "kappa": 1000, "accumulation_steps": 2,
          "max_grad_norm": float("inf")}  # fmt: skip


@pytest.fixture
def params() -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    torch.manual_seed(0)
    return torch.nn.Parameter(torch.randn(16, 12)), torch.nn.Parameter(
        torch.randn(16, 12)
    )


def build(params, cls=FloraAdam, order=("a", "b"), **kwargs):
    named = dict(zip(("a", "b"), params, strict=True))
    return cls([(n, named[n]) for n in order], **{**KWARGS, **kwargs})


@pytest.fixture
def trained(params):
    """A FloraAdam(kappa=1000) after one update and a micro-batch of the next."""
    a, b = params
    optimizer = build(params)
    for _ in range(3):
        (a.square().sum() + (2 * b).sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def test_kappa_of_another_optimizer_is_refused(params, trained):
    with pytest.raises(ValueError, match="Parameter 0 kappa: file 1000, optimizer 10"):
        build(params, kappa=10).import_state(trained.export_state())


def test_a_state_of_another_optimizer_kind_is_refused(params, trained):
    other = build(params, FloraAdafactor)
    with pytest.raises(
        ValueError, match="Parameter 0 optimizer: file 'adam', optimizer 'adafactor'"
    ):
        other.import_state(trained.export_state())


def test_parameters_in_another_order_are_refused(params, trained, tmp_path: Path):
    swapped = build(params, order=("b", "a"))  # same shapes: only the names differ
    with pytest.raises(
        ValueError,
        match="param group 0 parameter 0 name: state dict 'a', optimizer 'b'",
    ):
        swapped.load_state_dict(trained.state_dict())
    trained.export_state(tmp_path / "s.safetensors")
    for source in (trained.export_state(), tmp_path / "s.safetensors"):
        with pytest.raises(
            ValueError, match="Parameter 0 name: file 'a', optimizer 'b'"
        ):
            swapped.import_state(source)


def edited(state_dict: dict, where: str, key: str, value) -> dict:
    """A deep copy of ``state_dict`` with ``state[0][key]`` or
    ``param_groups[0][key]`` set to ``value`` (``...``: removed)."""
    out = copy.deepcopy(state_dict)
    target = out["state"][0] if where == "state" else out["param_groups"][0]
    if value is ...:
        del target[key]
    elif callable(value):
        target[key] = value(target[key])
    else:
        target[key] = value
    return out


def nu_with(value: float):
    def change(nu: torch.Tensor) -> torch.Tensor:
        nu = nu.clone()
        nu[0, 0] = value
        return nu

    return change


@pytest.mark.parametrize(
    ("where", "key", "value", "message"),
    [
        ("state", "count", -1, "Parameter 0: count -1 is out of range"),
        ("state", "count", 7.9, "Parameter 0: count must be an integer scalar, got 7.9"),
        ("state", "count", torch.tensor(7.9), "count must be an integer scalar, got 7.9"),
        ("state", "micro_step", -1, "Parameter 0: micro_step -1 is out of range"),
        ("state", "micro_step", 2, "micro_step 2 is not below accumulation_steps 2"),
        ("state", "nu", nu_with(float("nan")), "Parameter 0: nu holds non-finite"),
        ("state", "nu", nu_with(-1.0), "Parameter 0: nu holds negative values"),
        ("param_groups", "lr", float("nan"), "Invalid learning rate: nan"),
        ("param_groups", "lr", torch.tensor(-1.0), "Invalid learning rate: -1.0"),
        ("param_groups", "betas", (1.5, 0.999), "Invalid beta1: 1.5"),
        ("param_groups", "kappa", 0, "Invalid kappa: 0"),
        ("state", "count", ..., "Parameter 0: the state has no 'count'"),
        ("state", "mu", ..., "Parameter 0 .*: the state has no 'mu' field"),
        ("state", "seed", ..., "Parameter 0: the saved state has no 'seed'"),
        ("param_groups", "params", ..., "param_groups\\[0\\] has no 'params'"),
    ],
)  # fmt: skip
def test_load_state_dict_refuses_by_name(params, trained, where, key, value, message):
    bad = edited(trained.state_dict(), where, key, value)
    fresh = build(params)
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match=message):
        fresh.load_state_dict(bad)
    assert str(fresh.state_dict()) == str(before)  # nothing was loaded


@pytest.mark.parametrize("key", ["state", "param_groups"])
def test_a_state_dict_without_its_keys_is_refused_by_name(params, trained, key):
    bad = {k: v for k, v in trained.state_dict().items() if k != key}
    with pytest.raises(ValueError, match=f"the state dict has no '{key}'"):
        build(params).load_state_dict(bad)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("count", -1, "count -1 is out of range"),
     ("micro_step", 5, "micro_step 5 is not below accumulation_steps 2")],
)  # fmt: skip
def test_import_state_range_checks_counters(params, trained, field, value, message):
    """A state whose checksum is right (written so) but whose counters are not."""
    plans = [trained.plan_of(p) for p in params]
    states = [
        {k: v for k, v in trained.state[p].items() if k in portable.ARRAY_FIELDS}
        for p in params
    ]
    states[0][field] = value
    flat = portable.export_state(plans, states, trained.state_header())
    with pytest.raises(ValueError, match=f"Parameter 0: {message}"):
        build(params).import_state(flat)


def format_1(flat: dict) -> dict:
    """``flat`` as format 1 wrote it: no header, no checksum."""
    old = {k: v for k, v in flat.items() if k not in ("flora.header", "flora.checksum")}
    return {**old, "flora.format_version": np.asarray(1, np.int64)}


def test_format_1_loads_with_a_warning_naming_what_was_not_checked(
    params, trained, tmp_path: Path
):
    state_files.save_state(format_1(trained.export_state()), tmp_path / "v1.npz")
    fresh = build(params)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh.import_state(tmp_path / "v1.npz")
    (warning,) = [w for w in caught if w.category is portable.FloraStateWarning]
    assert re.search(r"kappa.*accumulation_steps.*names", str(warning.message))
    for p in params:
        for key, value in trained.state[p].items():
            got = fresh.state[p][key]
            assert torch.equal(got, value) if torch.is_tensor(value) else got == value
    fresh.export_state(tmp_path / "v2.npz")  # saving again upgrades it
    assert int(state_files.load_state(tmp_path / "v2.npz")["flora.format_version"]) == 2


def test_missing_global_keys_are_named_not_key_errors(params, trained):
    flat = format_1(trained.export_state())
    del flat["flora.num_params"]
    with pytest.raises(ValueError, match="The state has no 'flora.num_params'"):
        build(params).import_state(flat)
    del flat["flora.format_version"]
    with pytest.raises(ValueError, match="it has no 'flora.format_version'"):
        build(params).import_state(flat)
