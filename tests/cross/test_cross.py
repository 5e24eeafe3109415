"""Cross-framework conformance (run by ``nox -s conformance``, every stack installed).

Every adapter on every backend trains the committed conformance problems; every pair
is compared directly (not only through the oracle), and a checkpoint exported by one
framework after ``k`` updates, imported by another, continues the same trajectory:
``k`` updates in A + export + import into B + the rest == all updates in B.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conformance.problems import PROBLEMS
from flora_core import policy, projection, state_files

HERE = Path(__file__).resolve().parent
RTOL, ATOL = 1e-4, 1e-5
SPLITS = {"adam": 4, "adafactor": 4, "adam_factored": 3, "adafactor_accumulate": 2}
FRAMEWORKS = {"torch": ("torch",), "optax": ("optax",), "keras-tensorflow": ("keras", "tensorflow"),
              "keras-jax": ("keras", "jax"), "keras-torch": ("keras", "torch")}  # fmt: skip
ADAPTERS = [
    a
    for a, mods in FRAMEWORKS.items()
    if all(importlib.util.find_spec(m) for m in mods)
]


def _run_all(jobs_by_adapter: dict[str, list[dict]], workdir: Path) -> dict[str, dict]:
    def run(adapter: str) -> tuple[str, dict]:
        jobs, out = workdir / f"{adapter}.json", workdir / f"{adapter}.npz"
        jobs.write_text(json.dumps(jobs_by_adapter[adapter]))
        proc = subprocess.run([sys.executable, str(HERE / "segments.py"), adapter, str(jobs),
                               str(out)], capture_output=True, text=True)  # fmt: skip
        assert proc.returncode == 0, f"{adapter} failed:\n{proc.stderr[-4000:]}"
        with np.load(out) as data:
            return adapter, dict(data)

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run, jobs_by_adapter))


def _trajectory(
    data: dict, key: str, problem: str, t0: int = 0
) -> list[list[np.ndarray]]:
    n_params, steps = len(PROBLEMS[problem].shapes), PROBLEMS[problem].steps
    return [
        [data[f"{key}/step{t}_param{i}"] for i in range(n_params)]
        for t in range(t0, steps)
    ]


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict:
    if len(ADAPTERS) < 2:
        pytest.skip(f"fewer than two adapters installed: {ADAPTERS}")
    work = tmp_path_factory.mktemp("cross")
    heads = {a: [] for a in ADAPTERS}
    for adapter in ADAPTERS:
        for name, p in PROBLEMS.items():
            heads[adapter].append({"key": f"full/{name}", "problem": name, "t0": 0,
                                   "t1": p.steps, "params": None, "state": None})  # fmt: skip
        for name, k in SPLITS.items():
            heads[adapter].append({"key": f"head/{name}", "problem": name, "t0": 0, "t1": k,
                                   "params": None, "state": None})  # fmt: skip
    first = _run_all(heads, work)
    tails = {b: [] for b in ADAPTERS}
    for a, (name, k) in itertools.product(ADAPTERS, SPLITS.items()):
        data = first[a]
        params = work / f"{a}-{name}-params.npz"
        np.savez(params, **{f"param{i}": data[f"head/{name}/step{k - 1}_param{i}"]
                            for i in range(len(PROBLEMS[name].shapes))})  # fmt: skip
        flat = {key.split("/state/", 1)[1]: v for key, v in data.items()
                if key.startswith(f"head/{name}/state/")}  # fmt: skip
        saved = work / f"{a}-{name}-state.npz"
        state_files.save_state(flat, saved)
        for b in ADAPTERS:
            tails[b].append({"key": f"tail/{a}/{name}", "problem": name, "t0": k,
                             "t1": PROBLEMS[name].steps, "params": str(params),
                             "state": str(saved)})  # fmt: skip
        if name == "adam":
            tails[a].append({"key": f"bad_rank/{a}", "problem": name, "t0": k, "t1": k + 1,
                             "params": str(params), "state": str(saved),
                             "expect_error": PROBLEMS[name].rank + 1})  # fmt: skip
    second = _run_all(tails, work)
    return {"full": first, "tail": second}


def close(got, want, label: str) -> None:
    for t, (gs, ws) in enumerate(zip(got, want, strict=True)):
        for i, (g, w) in enumerate(zip(gs, ws, strict=True)):
            np.testing.assert_allclose(
                g, w, rtol=RTOL, atol=ATOL, err_msg=f"{label} t={t} i={i}"
            )


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("a,b", list(itertools.combinations(list(FRAMEWORKS), 2)))
def test_adapters_agree_pairwise(runs, problem, a, b):
    if a not in ADAPTERS or b not in ADAPTERS:
        pytest.skip(f"{a} or {b} is not installed")
    close(_trajectory(runs["full"][a], f"full/{problem}", problem),
          _trajectory(runs["full"][b], f"full/{problem}", problem), f"{a} vs {b}")  # fmt: skip


@pytest.mark.parametrize("problem", sorted(SPLITS))
@pytest.mark.parametrize("a,b", list(itertools.product(list(FRAMEWORKS), repeat=2)))
def test_checkpoint_moves_between_frameworks(runs, problem, a, b):
    if a not in ADAPTERS or b not in ADAPTERS:
        pytest.skip(f"{a} or {b} is not installed")
    k = SPLITS[problem]
    resumed = _trajectory(runs["tail"][b], f"tail/{a}/{problem}", problem, t0=k)
    direct = _trajectory(runs["full"][b], f"full/{problem}", problem)[k:]
    close(resumed, direct, f"{k} steps in {a}, the rest in {b}")


@pytest.mark.parametrize("adapter", list(FRAMEWORKS))
def test_state_of_another_rank_is_refused(runs, adapter):
    if adapter not in ADAPTERS:
        pytest.skip(f"{adapter} is not installed")
    message = str(runs["tail"][adapter][f"bad_rank/{adapter}/error"])
    assert "rank" in message, f"{adapter} accepted a state of another rank: {message!r}"


def test_projection_bits_agree_across_backends():
    from flora_core import _xp

    plan = policy.plan((300, 200), 7, rank=16, seed=2**40 + 3)
    want = projection.projection(plan, 5, 1, xp=np)
    for backend in ("torch", "jax", "tensorflow"):
        if importlib.util.find_spec(backend) is None:
            continue
        got = _xp.to_numpy(
            projection.projection(plan, 5, 1, xp=_xp.namespace_for(backend))
        )
        np.testing.assert_array_equal(
            got.view(np.uint32), want.view(np.uint32), err_msg=backend
        )
