"""One FSDP2 rank of the scale tests: ``python fsdp_worker.py RANK WORLD PORT DIR``.

Trains a small MLP sharded with ``fully_shard`` (gloo, CPU) with FloraAdam (plain and
factored) and FloraAdafactor on this rank's half of each global batch, checkpoints the
optimizer with ``torch.distributed.checkpoint`` halfway, and resumes from it in a
fresh model and optimizer. Writes, per optimizer, the full parameters and ``mu``
states of the uninterrupted and the resumed runs, the state placements and the
compressed axes to ``DIR/rank{RANK}.pt``. ``run_single`` is the one-process
reference on the whole global batch (imported by the test).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from flora_torch import FloraAdafactor, FloraAdam

STEPS = 6
RESUME_AT = 3
BATCH = 16
MICRO = 2  # micro-batches per update of "adam_accumulate"
OPTIMIZERS = {
    "adam": lambda params, axis: FloraAdam(
        params, lr=1e-2, rank=8, kappa=3, weight_decay=0.1, axis=axis
    ),
    "adam_factored": lambda params, axis: FloraAdam(
        params, lr=1e-2, rank=8, kappa=3, factored=True, axis=axis
    ),
    "adam_accumulate": lambda params, axis: FloraAdam(
        params, lr=1e-2, rank=8, kappa=3, axis=axis, accumulation_steps=MICRO
    ),
    "adafactor": lambda params, axis: FloraAdafactor(
        params, lr=1e-2, rank=8, kappa=3, min_dim_size_to_factor=16, axis=axis
    ),
}


def build() -> torch.nn.Module:
    """Weights 96x24, 32x96 (wide: the policy alone would compress axis 0), 9x32."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(24, 96), torch.nn.Tanh(), torch.nn.Linear(96, 32),
        torch.nn.Tanh(), torch.nn.Linear(32, 9),
    )  # fmt: skip


def batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + t)
    return torch.randn(BATCH, 24, generator=g), torch.randn(BATCH, 9, generator=g)


def train(model, optimizer, steps: range, rows: slice) -> None:
    micro = optimizer.accumulation_steps
    for t in steps:
        for j in range(micro):  # compressed into ``acc`` inside each backward
            x, y = batch(t + 100 * j)
            (model(x[rows]) - y[rows]).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def counted_step(model, optimizer, t: int, rows: slice) -> dict[str, int]:
    """One training step; the collectives ``optimizer.step()`` issued, by kind."""
    from torch.distributed.tensor.debug import CommDebugMode

    for j in range(optimizer.accumulation_steps):
        x, y = batch(t + 100 * j)
        (model(x[rows]) - y[rows]).square().mean().backward()
    with CommDebugMode() as comm:
        optimizer.step()
    optimizer.zero_grad()
    return {str(k): int(v) for k, v in comm.get_comm_counts().items()}


def full(x: torch.Tensor) -> torch.Tensor:
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def summary(model, optimizer) -> dict:
    params = list(model.parameters())
    return {
        "params": [full(p.detach()).clone() for p in params],
        "mu": [full(optimizer.state[p]["mu"]).clone() for p in params],
        "axes": [optimizer.plan_of(p).axis for p in params],
        "acc_local": [
            tuple(optimizer.state[p]["acc"].to_local().shape)
            for p in params
            if "acc" in optimizer.state[p]
            and hasattr(optimizer.state[p]["acc"], "to_local")
        ],
    }


def run_single(name: str) -> dict:
    """One process, whole batch, compressed axis 1 (what FSDP2 picks for dim-0 shards)."""
    model = build()
    optimizer = OPTIMIZERS[name](model.parameters(), 1)
    train(model, optimizer, range(STEPS), slice(None))
    return summary(model, optimizer)


def sharded(name: str):
    from torch.distributed.fsdp import fully_shard

    model = build()
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer)
    fully_shard(model)
    return model, OPTIMIZERS[name](model.parameters(), None)


def run_rank(name: str, rank: int, world: int, folder: Path) -> dict:
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    model, optimizer = sharded(name)
    train(model, optimizer, range(RESUME_AT), rows)
    checkpoint = folder / f"ckpt_{name}"
    dcp.save(
        {
            "model": model.state_dict(),
            "optim": get_optimizer_state_dict(model, optimizer),
        },
        checkpoint_id=str(checkpoint),
    )
    train(model, optimizer, range(RESUME_AT, STEPS - 1), rows)
    out = {"comms": counted_step(model, optimizer, STEPS - 1, rows)}
    out.update(summary(model, optimizer))
    weights = {"w0": model[0].weight, "w1": model[2].weight, "w2": model[4].weight}
    out["placements"] = {
        key: [
            str(v.placements)
            for v in optimizer.state[p].values()
            if hasattr(v, "placements")
        ]
        for key, p in weights.items()
    }
    out["local_mu"] = [
        tuple(optimizer.state[p]["mu"].to_local().shape) for p in model.parameters()
    ]

    resumed, resumed_optimizer = sharded(name)
    state = {
        "model": resumed.state_dict(),
        "optim": get_optimizer_state_dict(resumed, resumed_optimizer),
    }
    dcp.load(state, checkpoint_id=str(checkpoint))
    resumed.load_state_dict(state["model"])
    set_optimizer_state_dict(resumed, resumed_optimizer, state["optim"])
    out["count_after_load"] = resumed_optimizer.state[resumed[0].weight]["count"]
    train(resumed, resumed_optimizer, range(RESUME_AT, STEPS), rows)
    out["resumed"] = summary(resumed, resumed_optimizer)
    return out


def main() -> None:
    rank, world, port, folder = (
        int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    )  # fmt: skip
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        results = {name: run_rank(name, rank, world, folder) for name in OPTIMIZERS}
        torch.save(results, folder / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
