"""Clipping compressed accumulators that FSDP2 shards (DTensor ``acc``), 2 gloo ranks.

Each rank's squared norm of a shard is a partial sum; the global norm must be the
one-process norm of the whole batch on every rank, and the clipped training the
one-process clipped training (within FSDP's reduction-order tolerance).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)
pytest.importorskip("torch.distributed.fsdp")

HERE = Path(__file__).parent


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


WORKER = HERE / "fsdp_clip_worker.py"
worker = load(WORKER)
launch = load(HERE.parent / "scale" / "launcher.py").launch


def test_fsdp2_clipping_matches_one_process(tmp_path: Path) -> None:
    launch(WORKER, 2, str(tmp_path), timeout=170)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    single = worker.run_single()
    assert all(r["sharded"] for r in ranks)  # the accumulators were DTensor shards
    assert ranks[0]["norms"] == ranks[1]["norms"]  # one global norm on every rank
    assert min(single["norms"]) > 2 * worker.CLIP  # the clipping bites
    for norm, want in zip(ranks[0]["norms"], single["norms"], strict=True):
        assert norm == pytest.approx(want, rel=1e-4)
    for a, b, ref in zip(ranks[0]["params"], ranks[1]["params"], single["params"],
                         strict=True):  # fmt: skip
        assert torch.equal(a, b)
        torch.testing.assert_close(a, ref, rtol=1e-4, atol=1e-5)
