"""Tensor-parallel column shards (gloo, 2 ranks): blocks of A, one all-reduce."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)


def load(name: str):
    """A module of this folder, by path (the test folders have no packages)."""
    path = Path(__file__).with_name(name)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


WORKER = Path(__file__).with_name("tp_worker.py")
worker = load("tp_worker.py")
launch = load("launcher.py").launch


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    folder = tmp_path_factory.mktemp("tp")
    outs = [folder / f"rank{r}.pt" for r in range(2)]
    launch(WORKER, 2, str(folder / "rank{}.pt"), timeout=120)
    return [torch.load(out, weights_only=False) for out in outs]


def test_column_shards_generate_their_block(world: int = 2) -> None:
    # block-equals-slice: what a shard generates is exactly its columns of A
    plan = worker.plan()
    full = worker.projection(plan, 5, 0, xp=worker.XP)
    for r in range(world):
        c0, c1 = worker.D * r // world, worker.D * (r + 1) // world
        block = worker.projection(plan, 5, 0, xp=worker.XP, cols=(c0, c1))
        assert block.shape == (worker.RANK, c1 - c0)
        assert torch.equal(block, full[:, c0:c1])


def test_one_all_reduce_gives_the_unsharded_compression(ranks: list[dict]) -> None:
    assert [r["cols"] for r in ranks] == [(0, 100), (100, 200)]
    reference = worker.reference()
    for r in ranks:
        assert r["compressed"].shape == (worker.K, worker.RANK)  # k x r reduced
        # two partial sums instead of one: float tolerance
        torch.testing.assert_close(r["compressed"], reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(ranks[0]["compressed"], ranks[1]["compressed"])


def test_column_sharded_weight_trains_like_one_process(ranks: list[dict]) -> None:
    single = worker.run_single()
    for r in ranks:
        assert r["axis"] == 0  # the unsharded axis (rows) is compressed
        assert r["mu_placements"] == "(Shard(dim=1),)"
        assert r["mu_local"] == (worker.RANK, worker.D // 2)
        torch.testing.assert_close(r["weight"], single["weight"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["mu"], single["mu"], rtol=1e-5, atol=1e-6)
    assert not torch.equal(ranks[0]["weight"], worker.initial())


def test_dtensor_with_layerwise_is_refused_eagerly(ranks: list[dict]) -> None:
    assert "layerwise=True" in ranks[0]["layerwise_refused"]


def test_compress_column_shard_rejects_axis_0() -> None:
    plan = worker.policy.plan((worker.K, worker.D), 0, rank=4, axis=0)
    with pytest.raises(ValueError, match="axis=0"):
        worker.compress_column_shard(torch.zeros(worker.K, 10), plan, 0, (0, 10))
