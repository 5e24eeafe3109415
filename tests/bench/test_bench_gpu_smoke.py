"""``benchmarks/bench_gpu.py --smoke``: the GPU check's code on CPU, at tiny shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
ROOT = Path(__file__).parents[2]


def test_smoke_runs_on_cpu_into_its_own_folder(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'adapters'}"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--smoke",
         "--only", "bits", "step", "--reps", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, check=False, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "gpu.json").read_text())["rows"]
    assert all(r["equal"] for r in rows if r["kind"] == "bits")
    steps = {r["what"]: r for r in rows if r["kind"] == "step"}
    assert steps["FloraAdam eager"]["seconds"] > 0
    assert steps["FloraAdam cuda graph"]["skipped"] == "needs CUDA"
    assert "not GPU numbers" in (tmp_path / "gpu.md").read_text()


def test_smoke_refuses_the_results_folder() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--smoke"],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "GPU numbers only" in done.stderr
