"""FLORA on sharded parameters: FSDP2 / DTensor states and tensor-parallel shards.

FLORA's projections are counter-based (docs/spec.md §2): any block of ``A`` is generated
from its own counters, the same bits on every rank, with no communication. Hence:

* **FSDP2** (``torch.distributed.fsdp.fully_shard``) gives ``FloraAdam`` and
  ``FloraAdafactor`` DTensor parameters sharded on dim 0. The optimizer then runs
  the core rule on DTensors (plain tensors such as ``A`` count as replicated, via
  ``implicit_replication``), so DTensor's sharding propagation does the math on the
  local rows. Its states are DTensors sharded like their parameter (``mu`` of a
  row-sharded ``n x m`` weight is ``n x r`` sharded on dim 0), and
  ``torch.distributed.checkpoint`` saves and reloads them.
* **The compressed axis** of a sharded parameter defaults to an *unsharded* one
  (:func:`plan_axis`): a row-sharded weight is compressed along its last axis, so
  each rank computes ``G_rows A_iᵀ`` from its own rows and the whole ``A_i`` (``r x
  m``, identical on every rank) with no communication at all. The policy's default
  (the smaller axis) would otherwise pick axis 0 for a wide weight, whose
  compressed gradient ``A_i G`` is a sum over the ranks' rows (an all-reduce of
  ``r x m`` per step) and whose ``mu`` would be replicated. A forced ``axis=0``
  still works that way (DTensor inserts the all-reduce).
* **FloraAdam** (not factored) is elementwise outside the projection: no
  communication besides FSDP's own. ``factored=True`` and **FloraAdafactor**
  reduce column statistics and RMS scalars over the rows: an all-reduce of one
  ``m``-vector and a few scalars per matrix, done by DTensor.
* **Tensor-parallel column shards** (the compressed axis itself is split):
  :func:`compress_column_shard` generates only ``A_i[:, c0:c1]`` and forms
  ``G A_iᵀ`` with one all-reduce of ``k x r``.
* **Compressed accumulation** (``accumulation_steps > 1``): FSDP2 runs the
  post-accumulate-grad hooks on the sharded parameters after each micro-batch's
  reduce-scatter, so the accumulator (``n/W x r`` per rank) is local too.
  ``layerwise=True`` is not supported with DTensor parameters yet, nor
  ``export_state`` / ``import_state`` (they neither gather nor scatter).

See ``docs/scale.md`` for the communication and memory per shard.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import torch

from flora_core import rules
from flora_core._xp import namespace_for
from flora_core.policy import CompressionPlan
from flora_core.projection import compress, projection

XP = namespace_for("torch")
__all__ = [
    "compress_column_shard",
    "is_sharded",
    "keep_placements",
    "plan_axis",
    "sharded_context",
    "sharded_state",
]


def is_sharded(p: Any) -> bool:
    """Whether ``p`` is a DTensor (FSDP2, tensor parallel).

    NOTE [lazy DTensor import]: ``torch.distributed.tensor`` takes ~1.5 s to import;
    nothing can be a DTensor before it is imported, so it is looked up, not imported.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(p, module.DTensor)


def _matrix_dims(p: Any) -> set[int]:
    """Matrix-view axes (0: ``shape[0]``, 1: the rest) that a shard placement splits."""
    from torch.distributed.tensor import Shard

    return {0 if pl.dim == 0 else 1 for pl in p.placements if isinstance(pl, Shard)}


def plan_axis(p: Any, axis: int | None) -> int | None:
    """The axis to compress ``p`` along: the user's, else an unsharded one.

    Returns ``axis`` unchanged when it is given, when ``p`` is a plain tensor or has
    fewer than 2 dimensions, or when both matrix axes are sharded (the policy's
    default then applies); otherwise the matrix axis that no placement splits.
    """
    if axis is not None or not is_sharded(p) or p.ndim < 2:
        return axis
    sharded = _matrix_dims(p)
    if len(sharded) != 1:
        return axis
    return 1 - sharded.pop()


def _field_placement(
    name: str, d: int, plan: CompressionPlan, rule: Any, config: Any
) -> Any:
    """Where a state field's shard lies when its parameter is sharded on dim ``d``."""
    from torch.distributed.tensor import Replicate, Shard

    if name == "nu" or (name in ("mu", "acc") and not plan.compressed):
        return Shard(d)
    row = 0 if d == 0 else 1  # the matrix-view axis that ``d`` splits
    contiguous = d <= 1 or len(plan.shape) == 2
    if name in ("mu", "acc"):  # compressed: (n, r) for axis 1, (r, m) for axis 0
        kept = 1 - plan.axis  # type: ignore[operator]
        return Shard(kept) if row == kept and (row == 0 or contiguous) else Replicate()
    if rule is rules.flora_adam:  # factored: nu_row (n,), nu_col (prod(rest),)
        if name == "nu_row":
            return Shard(0) if row == 0 else Replicate()
        return Shard(0) if row == 1 and len(plan.shape) == 2 else Replicate()
    d1, d0 = rules.factored_dims(  # type: ignore[misc]
        plan.shape, config.factored, config.min_dim_size_to_factor
    )
    removed = d0 if name == "nu_row" else d1
    return Replicate() if d == removed else Shard(d - (d > removed))


def sharded_state(
    p: Any, plan: CompressionPlan, shapes: dict[str, Any], rule: Any, config: Any
) -> dict[str, Any]:
    """Zero float32 DTensor states, each sharded like its parameter where it can be.

    Args:
        p: the DTensor parameter.
        plan: its compression plan (global shape).
        shapes: the zero state (the rule's fields and ``acc``) on the meta
            device; it gives the names and the global shapes.
        rule: ``rules.flora_adam`` or ``rules.flora_adafactor``.
        config: the rule's config.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor import zeros as dtensor_zeros

    out = {}
    for name, meta in shapes.items():
        placements = [
            _field_placement(name, pl.dim, plan, rule, config)
            if isinstance(pl, Shard)
            else Replicate()
            for pl in p.placements
        ]
        out[name] = dtensor_zeros(
            tuple(meta.shape),
            dtype=torch.float32,
            device_mesh=p.device_mesh,
            placements=placements,
        )
    return out


def sharded_context(p: Any) -> contextlib.AbstractContextManager:
    """Plain tensors (projections, scalars) count as replicated while ``p`` updates."""
    if not is_sharded(p):
        return contextlib.nullcontext()
    from torch.distributed.tensor.experimental import implicit_replication

    return implicit_replication()


def keep_placements(new: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """Redistribute new DTensor states to the placements of the old ones.

    DTensor leaves a reduction over a sharded axis ``Partial``; this is where its
    all-reduce happens, so the stored state is complete on every rank.
    """
    from torch.distributed.tensor import DTensor, Partial, Replicate

    out = dict(new)
    for name, value in new.items():
        before = old.get(name)
        if isinstance(value, DTensor) and isinstance(before, DTensor):
            if value.placements != before.placements:
                out[name] = value.redistribute(placements=before.placements)
        elif isinstance(value, DTensor) and any(
            isinstance(pl, Partial) for pl in value.placements
        ):
            placements = [
                Replicate() if isinstance(pl, Partial) else pl
                for pl in value.placements
            ]
            out[name] = value.redistribute(placements=placements)
    return out


def compress_column_shard(
    grad_shard: torch.Tensor,
    plan: CompressionPlan,
    index: int,
    cols: tuple[int, int],
    *,
    role: int = 0,
    group: Any = None,
) -> torch.Tensor:
    """``G A_iᵀ`` (``k x r``) of a weight whose compressed columns are sharded.

    Each rank holds ``G[:, c0:c1]`` and generates only ``A_i[:, c0:c1]``
    (``r x (c1 - c0)``, from its own counters); one all-reduce sums the partial
    products ``G[:, c0:c1] A_i[:, c0:c1]ᵀ``. The result is the unsharded
    ``compress(G, A_i)`` up to float summation order.

    Args:
        grad_shard: this rank's columns of the gradient's matrix view (``k x
            (c1 - c0)``).
        plan: the parameter's plan, compressed along its last axis (``axis == 1``).
        index: the resample or cycle index ``i``.
        cols: ``(c0, c1)``, this rank's columns.
        role: 0 momentum, 1 accumulation.
        group: the process group of the tensor-parallel ranks.

    Example:
        >>> # rank k of 2, weight 64 x 128 split into column halves
        >>> c = compress_column_shard(g[:, 64 * k : 64 * (k + 1)], plan, 0,
        ...                           (64 * k, 64 * (k + 1)))  # doctest: +SKIP
    """
    if plan.axis != 1:
        raise ValueError(
            f"compress_column_shard needs a plan compressed along axis 1, got "
            f"axis={plan.axis!r}"
        )
    c0, c1 = cols
    if grad_shard.shape[-1] != c1 - c0:
        raise ValueError(
            f"grad_shard has {grad_shard.shape[-1]} columns but cols={cols!r}"
        )
    import torch.distributed as dist

    a = projection(plan, index, role, xp=XP, device=grad_shard.device, cols=cols)
    partial = compress(grad_shard.float(), a, 1, xp=XP)
    dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=group)
    return partial
