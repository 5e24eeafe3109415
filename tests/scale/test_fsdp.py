"""FSDP2 (``fully_shard``, DTensor parameters) on CPU with gloo, 2 ranks.

FloraAdam and FloraAdafactor step on the local shards; the states are DTensors
sharded like their parameters; ``torch.distributed.checkpoint`` saves and reloads
them and training resumes bit-exactly; results equal one process on the global
batch within float tolerance.
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


def load(name: str):
    """A module of this folder, by path (the test folders have no packages)."""
    path = Path(__file__).with_name(name)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


WORKER = Path(__file__).with_name("fsdp_worker.py")
worker = load("fsdp_worker.py")
launch = load("launcher.py").launch
WEIGHTS = (0, 2, 4)  # positions of the weight matrices in model.parameters()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Every optimizer trained by two FSDP2 ranks (one launch for the module)."""
    folder = tmp_path_factory.mktemp("fsdp")
    launch(WORKER, 2, str(folder), timeout=170)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("optimizer", sorted(worker.OPTIMIZERS))
def test_fsdp2_matches_one_process(optimizer: str, ranks: list[dict]) -> None:
    rank0, rank1 = ranks[0][optimizer], ranks[1][optimizer]
    single = worker.run_single(optimizer)
    initial = [p.detach() for p in worker.build().parameters()]
    for key in ("params", "mu"):
        for a, b, ref in zip(rank0[key], rank1[key], single[key], strict=True):
            assert torch.equal(a, b)  # the gathered full tensors agree on both ranks
            # FSDP's reduce-scatter sums in another order than one process
            torch.testing.assert_close(a, ref, rtol=1e-4, atol=1e-5)
    for i in WEIGHTS:
        assert not torch.equal(rank0["params"][i], initial[i])


@pytest.mark.parametrize("optimizer", sorted(worker.OPTIMIZERS))
def test_row_shards_compress_the_last_axis(optimizer: str, ranks: list[dict]) -> None:
    out = ranks[0][optimizer]
    # 96x24, 32x96 (the policy alone would pick axis 0), 9x32: all along axis 1
    assert [out["axes"][i] for i in WEIGHTS] == [1, 1, 1]
    # mu is n_local x r on each rank: rows 96 -> 48, 32 -> 16, 9 -> 5 / 4 (uneven)
    assert [out["local_mu"][i] for i in WEIGHTS] == [(48, 8), (16, 8), (5, 8)]
    assert [ranks[1][optimizer]["local_mu"][i] for i in WEIGHTS] == [
        (48, 8), (16, 8), (4, 8),
    ]  # fmt: skip
    for placements in out["placements"].values():
        assert "(Shard(dim=0),)" in placements  # mu (and nu) shard like the param


def test_factored_column_statistics_are_replicated(ranks: list[dict]) -> None:
    # FloraAdam(factored=True): mu, nu_row sharded on rows; nu_col (m,) reduced
    assert ranks[0]["adam_factored"]["placements"]["w0"] == [
        "(Shard(dim=0),)", "(Shard(dim=0),)", "(Replicate(),)",
    ]  # fmt: skip


@pytest.mark.parametrize("optimizer", sorted(worker.OPTIMIZERS))
def test_dcp_checkpoint_resumes(optimizer: str, ranks: list[dict]) -> None:
    for rank in ranks:
        out = rank[optimizer]
        assert out["count_after_load"] == worker.RESUME_AT
        for key in ("params", "mu"):
            for a, b in zip(out[key], out["resumed"][key], strict=True):
                assert torch.equal(a, b)  # saved at step 3, resumed to step 6


def test_compressed_accumulation_is_local(ranks: list[dict]) -> None:
    # accumulation_steps=2: the accumulators are n_local x r DTensors like mu
    for rank, rows in zip(ranks, [(48, 16, 5), (48, 16, 4)], strict=True):
        acc = rank["adam_accumulate"]["acc_local"]
        assert [acc[i] for i in WEIGHTS] == [(n, 8) for n in rows]


def test_flora_adam_step_issues_no_collective(ranks: list[dict]) -> None:
    # FloraAdam (full second moment) on row shards compressed along the last axis:
    # optimizer.step() communicates nothing (DTensor's CommDebugMode counts)
    for rank in ranks:
        assert rank["adam"]["comms"] == {}
        assert rank["adam_accumulate"]["comms"] == {}
        # factored statistics need small reductions (column means, RMS scalars)
        for name in ("adam_factored", "adafactor"):
            assert rank[name]["comms"].get("c10d_functional.all_reduce", 0) > 0
