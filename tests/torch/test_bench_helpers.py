"""The benchmarks' shared helpers: which optimizer is built, how state and peaks are counted."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))

import _optimizers  # noqa: E402
from training_peak import Meter  # noqa: E402


def params(*shapes: tuple[int, ...]) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    out = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    for p in out:
        p.grad = torch.randn(p.shape, generator=gen)
    return out


def test_galore_targets_are_the_non_embedding_matrices_above_rank():
    ps = params((64, 128), (128, 64), (1000, 64), (8, 64), (64,))
    targets = _optimizers.galore_targets(ps, rank=8)
    # (1000, 64) is embedding-shaped (aspect > 4), (8, 64) has no side above r = 8
    assert [tuple(p.shape) for p in targets] == [(64, 128), (128, 64)]


def test_state_bytes_counts_every_state_tensor_once():
    ps = params((32, 48), (48,))
    adamw = _optimizers.make_optimizer("AdamW(foreach)", ps, rank=8)
    adamw.step()
    n = sum(p.numel() for p in ps)
    assert _optimizers.state_bytes(adamw) == 8 * n + 4 * len(ps)  # exp_avg(_sq), step
    sgd = _optimizers.make_optimizer("SGD (stateless)", ps, rank=8)
    sgd.step()
    assert _optimizers.state_bytes(sgd) == 0
    flora = _optimizers.make_optimizer("FloraAdafactor", ps, rank=8)
    flora.step()
    assert 0 < _optimizers.state_bytes(flora) < _optimizers.state_bytes(adamw)


def test_state_bytes_include_galore_projection_matrices():
    class Projector:  # galore_torch keeps P in an object inside the state
        ortho_matrix = torch.zeros(8, 48)

    ps = params((32, 48))
    sgd = _optimizers.make_optimizer("SGD (stateless)", ps, rank=8)
    sgd.state[ps[0]] = {"exp_avg": torch.zeros(32, 8), "projector": Projector()}
    assert _optimizers.state_bytes(sgd) == 4 * (32 * 8 + 8 * 48)


def test_bad_names_and_missing_packages_are_named():
    with pytest.raises(ValueError, match="'AdamX'"):
        _optimizers.make_optimizer("AdamX", params((4, 4)), rank=2)
    with pytest.raises(RuntimeError, match="/nonexistent"):
        _optimizers.make_optimizer(
            "flora-opt Flora", params((4, 4)), rank=2, flora_opt_path="/nonexistent"
        )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_cpu_meter_sees_a_new_allocation_in_its_peak():
    meter = Meter("cpu")
    meter.reset_peak()
    before = meter.current()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert meter.peak() - before >= 60 * 2**20
    del block
