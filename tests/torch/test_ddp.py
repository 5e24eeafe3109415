"""DDP on CPU (gloo, 2 processes): same result as one process on the global batch."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")
_spec = importlib.util.spec_from_file_location("ddp_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Both modes trained by two gloo ranks (one launch for the module)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "adapters")]),
    }
    port, folder = free_port(), tmp_path_factory.mktemp("ddp")
    outs = [folder / f"rank{r}.pt" for r in range(2)]
    processes = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(r), "2", str(port), str(outs[r])], env=env
        )
        for r in range(2)
    ]
    for process in processes:
        assert process.wait(timeout=180) == 0
    return [torch.load(out, weights_only=True) for out in outs]


@pytest.mark.parametrize("mode", sorted(worker.MODES))
def test_ddp_two_ranks_match_one_process(mode: str, ranks: list[dict]) -> None:
    rank0, rank1 = (r[mode] for r in ranks)
    single = worker.run_single(mode)
    # projections agree across ranks and with one process, with no communication
    assert torch.equal(rank0["checksums"], rank1["checksums"])
    assert torch.equal(rank0["checksums"], single["checksums"])
    initial = list(worker.build().parameters())
    for key in ("params", "mu"):
        for a, b, ref in zip(rank0[key], rank1[key], single[key], strict=True):
            assert torch.equal(a, b)  # ranks stay bit-identical
            # the all-reduce sums in another order than one process: float tolerance
            torch.testing.assert_close(a, ref, rtol=1e-4, atol=1e-5)
    assert not torch.equal(rank0["params"][0], initial[0])
    assert rank0["mu"][0].shape == (64, 4)  # compressed: 64 x 16 weight, r = 4
