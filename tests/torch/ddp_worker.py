"""One DDP rank of the DDP test: ``python ddp_worker.py RANK WORLD PORT OUT``.

Trains a tiny model with DistributedDataParallel (gloo, CPU) and FloraAdam on this
rank's share of each global batch, once per mode (plain DDP; compressed accumulation
under ``no_sync`` with ``all_reduce_accumulators``), and saves per mode its
parameters, its ``mu`` states and a checksum of the projections it drew.
``run_single`` is the one-process reference on the whole global batch; the test
imports it from here.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from flora_torch import FloraAdam
from flora_torch._optimizer import XP

from flora_core.projection import projection

STEPS = 6
BATCH = 32
MODES = {"plain": 1, "accumulate": 2}  # accumulation_steps


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8)
    )


def optimizer_for(model: torch.nn.Module, mode: str) -> FloraAdam:
    return FloraAdam(model.parameters(), lr=1e-2, rank=4, kappa=3, factored=True,
                     accumulation_steps=MODES[mode])  # fmt: skip


def global_batch(t: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * t + j)
    return torch.randn(BATCH, 16, generator=g), torch.randn(BATCH, 8, generator=g)


def loss_of(model, x, y) -> torch.Tensor:
    return (model(x) - y).square().mean()


def summary(model: torch.nn.Module, optimizer: FloraAdam) -> dict:
    params = list(model.parameters())
    checksums = [
        float(projection(optimizer.plan_of(p), 1, 0, xp=XP).sum())
        for p in params if optimizer.plan_of(p).compressed
    ]  # fmt: skip
    return {
        "params": [p.detach().clone() for p in params],
        "mu": [optimizer.state[p]["mu"].clone() for p in params],
        "checksums": torch.tensor(checksums, dtype=torch.float64),
    }


def run_single(mode: str) -> dict:
    model = build()
    optimizer = optimizer_for(model, mode)
    for t in range(STEPS):
        for j in range(MODES[mode]):
            loss_of(model, *global_batch(t, j)).backward()
        optimizer.step()
        optimizer.zero_grad()
    return summary(model, optimizer)


def run_rank(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    torch.save({mode: train_rank(rank, world, mode) for mode in MODES}, out)
    dist.destroy_process_group()


def train_rank(rank: int, world: int, mode: str) -> dict:
    model = torch.nn.parallel.DistributedDataParallel(build())
    optimizer = optimizer_for(model, mode)
    share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    for t in range(STEPS):
        for j in range(MODES[mode]):
            x, y = global_batch(t, j)
            if MODES[mode] == 1:
                loss_of(model, x[share], y[share]).backward()
            else:  # DDP must not all-reduce: the hooks compress and free the grads
                with model.no_sync():
                    loss_of(model, x[share], y[share]).backward()
        if MODES[mode] > 1:
            optimizer.all_reduce_accumulators()
        optimizer.step()
        optimizer.zero_grad()
    return summary(model.module, optimizer)


if __name__ == "__main__":
    run_rank(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
