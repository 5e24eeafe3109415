"""One tensor-parallel rank: ``python tp_worker.py RANK WORLD PORT OUT`` (OUT: a
``str.format`` template given the rank).

1. ``compress_column_shard``: the rank holds columns ``[c0, c1)`` of a gradient,
   generates only ``A_i[:, c0:c1]`` and one all-reduce forms ``G A_iᵀ``.
2. FloraAdam on a column-sharded DTensor weight (``Shard(1)``, as RowwiseParallel
   shards ``nn.Linear.weight``): the compressed axis defaults to the unsharded rows
   and ``mu`` (``r x m``) is sharded on its columns like the weight.
Writes the results to ``OUT`` (``run_single`` is the one-process reference).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from flora_torch import FloraAdam
from flora_torch.distributed import XP, compress_column_shard

from flora_core import policy
from flora_core.projection import compress, projection

K, D, RANK = 24, 200, 16  # gradient k x d, compressed along d
STEPS = 5


def gradient(step: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(7 + step)
    return torch.randn(K, D, generator=g)


def plan() -> policy.CompressionPlan:
    return policy.plan((K, D), 3, rank=RANK, seed=11, axis=1)


def reference() -> torch.Tensor:
    """The unsharded ``G A_5ᵀ`` for role 0."""
    return compress(gradient(), projection(plan(), 5, 0, xp=XP), 1, xp=XP)


def initial() -> torch.Tensor:
    return torch.linspace(-1, 1, K * D).reshape(K, D)


def run_single() -> dict:
    weight = torch.nn.Parameter(initial())
    optimizer = FloraAdam([weight], lr=1e-2, rank=RANK, kappa=2, axis=0)
    for t in range(STEPS):
        weight.grad = gradient(t)
        optimizer.step()
    return {"weight": weight.detach().clone(), "mu": optimizer.state[weight]["mu"]}


def run_sharded(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    weight = torch.nn.Parameter(distribute_tensor(initial(), mesh, [Shard(1)]))
    optimizer = FloraAdam([weight], lr=1e-2, rank=RANK, kappa=2)
    for t in range(STEPS):
        weight.grad = distribute_tensor(gradient(t), mesh, [Shard(1)])
        optimizer.step()
    mu = optimizer.state[weight]["mu"]
    try:
        FloraAdam([weight], layerwise=True)
        refused = ""
    except NotImplementedError as error:
        refused = str(error)
    return {
        "layerwise_refused": refused,
        "weight": weight.detach().full_tensor(),
        "mu": mu.full_tensor(),
        "mu_local": tuple(mu.to_local().shape),
        "mu_placements": str(mu.placements),
        "axis": optimizer.plan_of(weight).axis,
    }


def main() -> None:
    rank, world, port, out = (
        int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    )  # fmt: skip
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        bounds = [D * r // world for r in range(world + 1)]
        cols = (bounds[rank], bounds[rank + 1])
        compressed = compress_column_shard(
            gradient()[:, cols[0] : cols[1]], plan(), 5, cols
        )
        results = {"cols": cols, "compressed": compressed, **run_sharded(rank, world)}
        torch.save(results, out.format(rank))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
