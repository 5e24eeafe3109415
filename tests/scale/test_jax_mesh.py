"""flora_optax on a 2-D (data x model) mesh of 8 CPU devices with NamedSharding.

The worker runs in a subprocess because the 8 host devices must be requested
before JAX starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")
pytest.importorskip("flora_optax")

WORKER = Path(__file__).with_name("jax_mesh_worker.py")
REPO = Path(__file__).resolve().parents[2]
NO_COLLECTIVES = {
    "all-reduce": 0, "all-gather": 0, "reduce-scatter": 0, "all-to-all": 0,
    "collective-permute": 0,
}  # fmt: skip


@pytest.fixture(scope="module")
def result() -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "adapters")]),
        "JAX_PLATFORMS": "cpu",
    }
    done = subprocess.run(
        [sys.executable, str(WORKER)], env=env, capture_output=True, text=True,
        timeout=170,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


@pytest.mark.parametrize("variant", ["adam", "adam_factored"])
def test_sharded_update_equals_unsharded(variant: str, result: dict) -> None:
    out = result[variant]
    # 4 jitted steps across a resample (kappa=2); float32, other reduction order
    assert out["max_param_diff"] < 5e-5
    assert out["max_mu_diff"] < 5e-6


@pytest.mark.parametrize("variant", ["adam", "adam_factored"])
def test_params_and_states_keep_their_sharding(variant: str, result: dict) -> None:
    out = result[variant]
    assert out["params_keep_sharding"]
    assert all(out["states_keep_sharding"].values()), out["states_keep_sharding"]
    # mu is k x r, sharded along the parameter's kept axis: rows 128/4 = 32 per
    # device for "rows" (compressed along axis 1), columns 128/4 for "cols"
    assert out["axes"] == {"bias": None, "both": 0, "cols": 0, "rows": 1}
    assert out["mu_local"] == {
        "bias": [32], "both": [8, 24], "cols": [8, 32], "rows": [32, 8],
    }  # fmt: skip


def test_unsharded_compressed_axis_needs_no_communication(result: dict) -> None:
    alone = result["adam"]["alone_collectives"]
    # a row-sharded weight compressed along its columns, or a column-sharded one
    # compressed along its rows: the compiled update has no collective at all
    assert alone["rows"] == NO_COLLECTIVES
    assert alone["cols"] == NO_COLLECTIVES
    # the compressed rows of "both" are sharded over "data": A G is a sum
    assert alone["both"]["all-reduce"] == 2
    assert result["adam"]["collectives"]["all-reduce"] == 2


def test_factored_statistics_add_one_small_all_reduce(result: dict) -> None:
    alone = result["adam_factored"]["alone_collectives"]
    assert alone["rows"]["all-reduce"] == 1  # the column means (m) and a scalar
    assert alone["cols"]["all-reduce"] == 1
    for counts in alone.values():
        assert counts["all-gather"] == 0  # nothing is gathered to full size
