"""flora_keras.FloraAdam under the Keras distribution API (JAX backend, 8 CPUs).

Each case runs in a subprocess: the 8 host devices and the Keras backend must be
chosen before JAX and Keras start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax")
pytest.importorskip("keras")
if os.environ.get("KERAS_BACKEND", "jax") != "jax":
    pytest.skip("the JAX-backend Keras session runs these", allow_module_level=True)

WORKER = Path(__file__).with_name("keras_dist_worker.py")
REPO = Path(__file__).resolve().parents[2]


def run(kind: str) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "adapters")]),
        "JAX_PLATFORMS": "cpu",
        "KERAS_BACKEND": "jax",
    }
    done = subprocess.run(
        [sys.executable, str(WORKER), kind], env=env, capture_output=True, text=True,
        timeout=170,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    return {kind: run(kind) for kind in ("data", "model")}


@pytest.mark.parametrize("kind", ["data", "model"])
def test_flora_adam_trains_under_a_distribution(kind: str, results: dict) -> None:
    out = results[kind]
    assert out["devices"] == 8
    losses = out["loss"]
    assert len(losses) == 4 and all(v == v for v in losses)  # finite, 4 epochs
    assert losses[-1] < 0.75 * losses[0]  # 32 updates of a small regression
    # the weight matrices are compressed (rank 8): d0 32x128 along its rows
    # (axis 0), d1 128x64 along its columns; d2 (64x4) is too small
    assert out["axes"][:4:2] == [0, 1] and out["ranks"][:4:2] == [8, 8]
    mu = out["states"]["flora_adam/sequential_d1_kernel_mu"]
    assert mu[0] == [128, 8]


def test_model_parallel_shards_the_kernels(results: dict) -> None:
    kernels = results["model"]["kernels"]
    assert kernels["sequential/d0/kernel"] == "P(None, 'model')"
    assert kernels["sequential/d1/kernel"] == "P('model', None)"
    assert results["data"]["kernels"]["sequential/d0/kernel"] == "P(None, None)"


def test_data_and_model_parallel_agree(results: dict) -> None:
    # the same global batches and projections: the same losses up to float order
    for a, b in zip(results["data"]["loss"], results["model"]["loss"], strict=True):
        assert abs(a - b) <= 1e-4 * abs(a)
