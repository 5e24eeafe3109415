"""One FSDP2 rank clipping with compressed accumulation:
``python fsdp_clip_worker.py RANK WORLD PORT DIR``.

FloraAdam(accumulation_steps=2, max_grad_norm=c) on a model sharded with
``fully_shard`` (gloo, CPU), each rank on its half of every micro-batch; the
accumulators are DTensor shards, so each parameter's squared norm is a partial sum
that DTensor all-reduces. Writes, per step, the norm that ``clip_grad_norm_(inf)``
reports before the update (it clips nothing) and the final full parameters to
``DIR/rank{RANK}.pt``. ``run_single`` is the one-process reference on the whole
batch (imported by the test).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from flora_torch import FloraAdam

STEPS, BATCH, MICRO, CLIP = 3, 16, 2, 0.05


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(24, 96), torch.nn.Tanh(), torch.nn.Linear(96, 9)
    )


def batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2000 + t)
    return torch.randn(BATCH, 24, generator=g), torch.randn(BATCH, 9, generator=g)


def train(model, optimizer, rows: slice) -> list[float]:
    norms = []
    for t in range(STEPS):
        for j in range(MICRO):
            x, y = batch(100 * t + j)
            (model(x[rows]) - y[rows]).square().mean().backward()
        norms.append(float(optimizer.clip_grad_norm_(math.inf)))
        optimizer.step()
        optimizer.zero_grad()
    return norms


def make(params, axis):
    return FloraAdam(params, lr=1e-2, rank=8, kappa=2, axis=axis,
                     accumulation_steps=MICRO, max_grad_norm=CLIP)  # fmt: skip


def full(x: torch.Tensor) -> torch.Tensor:
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def run_single() -> dict:
    """One process, whole batch, axis 1 (what FSDP2 picks for dim-0 shards)."""
    model = build()
    norms = train(model, make(model.parameters(), 1), slice(None))
    return {"norms": norms, "params": [p.detach().clone() for p in model.parameters()]}


def main() -> None:
    rank, world, port, folder = (
        int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    )  # fmt: skip
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        from torch.distributed.fsdp import fully_shard

        model = build()
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
        optimizer = make(model.parameters(), None)
        rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        norms = train(model, optimizer, rows)
        sharded = all(hasattr(s["acc"], "placements") for s in optimizer.state.values())
        params = [full(p.detach()).clone() for p in model.parameters()]
        torch.save({"norms": norms, "params": params, "sharded": sharded},
                   folder / f"rank{rank}.pt")  # fmt: skip
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
