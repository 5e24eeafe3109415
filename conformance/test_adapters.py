"""The generic suite every registered adapter must pass (see ``registry``).

Adapters are loaded from ``conformance/adapters_<name>.py`` when their framework is
importable; ``FLORA_ADAPTERS`` (comma-separated) restricts which run in a session.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import numpy as np
import pytest

from conformance.make_vectors import load_oracle
from conformance.problems import PROBLEMS, Problem, oracle
from conformance.registry import ADAPTERS, run_once

FRAMEWORK_OF = {"torch": "torch", "optax": "optax", "keras": "keras"}


def _load_adapters() -> list[str]:
    wanted = os.environ.get("FLORA_ADAPTERS")
    names = wanted.split(",") if wanted else list(FRAMEWORK_OF)
    loaded = []
    for name in names:
        if name not in FRAMEWORK_OF:
            continue
        if importlib.util.find_spec(FRAMEWORK_OF[name]) is None:
            continue
        if importlib.util.find_spec(f"conformance.adapters_{name}") is None:
            continue
        importlib.import_module(f"conformance.adapters_{name}")
        loaded.append(name)
    return loaded


LOADED = _load_adapters()
IDENTITY = {
    "adam_identity": Problem(
        "adam_identity", "adam", projection="identity", weight_decay=0.01
    ),
    # the hosts' Adafactors clip before the momentum (optax's order)
    "adafactor_identity": Problem(
        "adafactor_identity",
        "adafactor",
        projection="identity",
        factored=True,
        clip_after_momentum=False,
    ),  # fmt: skip
    # optax's pieces in the official FLORA code's order (the default)
    "adafactor_identity_official": Problem(
        "adafactor_identity_official",
        "adafactor",
        projection="identity",
        factored=True,
        weight_decay=0.01,
    ),  # fmt: skip
}


def assert_trajectories_close(got, want, rtol: float, atol: float, label: str) -> None:
    assert len(got) == len(want), f"{label}: {len(got)} steps, expected {len(want)}"
    for t, (params_got, params_want) in enumerate(zip(got, want, strict=True)):
        for i, (g, w) in enumerate(zip(params_got, params_want, strict=True)):
            g = np.asarray(g, dtype=np.float32)
            assert g.shape == w.shape, (
                f"{label}: step {t} param {i} shape {g.shape} != {w.shape}"
            )
            np.testing.assert_allclose(
                g, w, rtol=rtol, atol=atol, err_msg=f"{label}: step {t}, param {i}"
            )


@pytest.mark.parametrize("adapter", LOADED)
@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_adapter_follows_oracle(adapter: str, problem: str) -> None:
    entry, spec = ADAPTERS[adapter], PROBLEMS[problem]
    if not entry.supports(spec):
        pytest.skip(f"{adapter} does not support {problem}")
    assert_trajectories_close(
        run_once(adapter, spec),
        load_oracle(problem),
        entry.rtol,
        entry.atol,
        f"{adapter}/{problem}",
    )


@pytest.mark.parametrize("adapter", LOADED)
@pytest.mark.parametrize("problem", sorted(IDENTITY))
def test_identity_mode_equals_host_optimizer(adapter: str, problem: str) -> None:
    entry, spec = ADAPTERS[adapter], IDENTITY[problem]
    if entry.run_reference is None or not entry.supports(spec):
        pytest.skip(f"{adapter} has no reference for {problem}")
    reference = entry.run_reference(spec)
    assert_trajectories_close(
        entry.run(spec), reference, 1e-4, 1e-5, f"{adapter}/{problem}"
    )
    assert_trajectories_close(oracle(spec), reference, 1e-4, 1e-5, f"core/{problem}")
