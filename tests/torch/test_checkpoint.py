"""state_dict (weights_only, portable names, bit-exact resume) and the portable form."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flora_torch import FloraAdafactor, FloraAdam

from flora_core import state as portable
from flora_core.policy import DISTRIBUTIONS

WORKER = Path(__file__).with_name("resume_worker.py")
_spec = importlib.util.spec_from_file_location("resume_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)
REPO = Path(__file__).resolve().parents[2]


def walk(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from walk(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from walk(v)
    else:
        yield value


@pytest.mark.parametrize("case", sorted(worker.CASES))
def test_resume_in_a_new_process_is_bit_exact(case: str, tmp_path: Path) -> None:
    middle, total = worker.split(case)
    model, optimizer = worker.build(case)
    worker.train(model, optimizer, case, 0, total)  # 20 updates in one process

    first, first_optimizer = worker.build(case)
    worker.train(first, first_optimizer, case, 0, middle)
    checkpoint, out = tmp_path / "checkpoint.pt", tmp_path / "params.pt"
    torch.save({"model": first.state_dict(), "optimizer": first_optimizer.state_dict()},
               checkpoint)  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "adapters")]),
    }
    subprocess.run(
        [sys.executable, str(WORKER), case, str(checkpoint), str(out),
         str(torch.get_num_threads())],
        check=True, env=env, timeout=120,
    )  # fmt: skip
    resumed = torch.load(out, weights_only=True)
    for want, got in zip(model.parameters(), resumed, strict=True):
        assert torch.equal(want, got)


def test_state_dict_holds_tensors_and_ints_in_schema_names(tmp_path: Path) -> None:
    model, optimizer = worker.build("adam_factored_accumulate")
    worker.train(model, optimizer, "adam_factored_accumulate", 0, 3)  # mid-cycle
    state_dict = optimizer.state_dict()
    for value in walk(state_dict["state"]):
        assert torch.is_tensor(value) or type(value) is int
    torch.save(state_dict, tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)
    weight = loaded["state"][0]  # Linear(32, 96).weight: 96 x 32, r = 8
    assert set(weight) == {
        "count",
        "mu",
        "nu_row",
        "nu_col",
        "acc",
        "micro_step",
        "seed",
        "stream",
        "rank",
        "axis",
        "distribution",
        "rng_version",
    }
    assert (weight["count"], weight["micro_step"], weight["rank"], weight["axis"]) == (
        1,
        1,
        8,
        1,
    )
    assert weight["distribution"] == DISTRIBUTIONS.index("gaussian")
    assert weight["mu"].shape == weight["acc"].shape == (96, 8)
    assert loaded["state"][2]["stream"] == 2 << 2


def test_load_keeps_float32_state_for_bf16_params() -> None:
    model, optimizer = worker.build("adam")
    model.to(torch.bfloat16)
    optimizer = FloraAdam(model.parameters(), rank=8)
    model(torch.randn(4, 32, dtype=torch.bfloat16)).float().square().mean().backward()
    optimizer.step()
    saved = optimizer.state_dict()
    fresh = FloraAdam(model.parameters(), rank=8)
    fresh.load_state_dict(saved)
    mu = fresh.state[model[0].weight]["mu"]
    assert mu.dtype == torch.float32  # torch itself would cast it to bfloat16
    assert torch.equal(mu, saved["state"][0]["mu"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"rank": 4}, "saved with rank=8, this optimizer has rank=4"),
     ({"seed": 9}, "saved with seed=3, this optimizer has seed=9")],
)  # fmt: skip
def test_load_into_a_different_plan_raises(kwargs: dict, message: str) -> None:
    model, optimizer = worker.build("adam")
    worker.train(model, optimizer, "adam", 0, 1)
    other = FloraAdam(model.parameters(), **{**worker.CASES["adam"][1], **kwargs})
    with pytest.raises(ValueError, match=message):
        other.load_state_dict(optimizer.state_dict())


def test_load_state_of_another_rule_raises() -> None:
    model, optimizer = worker.build("adam_factored_accumulate")
    worker.train(model, optimizer, "adam_factored_accumulate", 0, 2)
    other = FloraAdafactor(
        model.parameters(), rank=8, kappa=4, min_dim_size_to_factor=16
    )
    with pytest.raises(ValueError, match=r"nu_row has shape \(96,\), expected \(32,\)"):
        other.load_state_dict(optimizer.state_dict())


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
@pytest.mark.parametrize("case", sorted(worker.CASES))
def test_export_import_continues_bit_exactly(
    case: str, suffix: str, tmp_path: Path
) -> None:
    middle, total = worker.split(case)
    model, optimizer = worker.build(case)
    worker.train(model, optimizer, case, 0, middle)
    optimizer.export_state(tmp_path / f"state{suffix}")
    copy, fresh = worker.build(case)
    copy.load_state_dict(model.state_dict())
    fresh.import_state(tmp_path / f"state{suffix}")
    worker.train(model, optimizer, case, middle, total)
    worker.train(copy, fresh, case, middle, total)
    for a, b in zip(model.parameters(), copy.parameters(), strict=True):
        assert torch.equal(a, b)


def test_export_is_the_portable_schema_and_import_checks_it() -> None:
    model, optimizer = worker.build("adam")
    worker.train(model, optimizer, "adam", 0, 2)
    flat = optimizer.export_state()
    plans = [optimizer.plan_of(p) for p in model.parameters()]
    states = portable.import_state(flat, plans, optimizer.state_header())
    assert int(states[0]["count"]) == 2
    np.testing.assert_array_equal(
        states[0]["mu"], optimizer.state[model[0].weight]["mu"]
    )
    other = FloraAdam(model.parameters(), **{**worker.CASES["adam"][1], "seed": 4})
    with pytest.raises(ValueError, match="Parameter 0 seed: file 3, optimizer 4"):
        other.import_state(flat)
