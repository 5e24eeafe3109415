"""Compressed gradient accumulation: FLORA Algorithm 1 (DESIGN §4, normative).

Micro-batch gradients of cycle ``c`` (the number of updates applied so far) are
compressed with ``A_c`` (role 1) and summed into ``acc``; after ``τ`` micro-batches the
optimizer sees ``decompress(acc, A_c) / τ`` and ``acc`` resets. Nothing full-size
survives between micro-batches. Parameters that are not compressed accumulate in full.

References:
    Hao, Cao, Mou. "Flora: Low-Rank Adapters Are Secretly Gradient Compressors",
    ICML 2024, Algorithm 1.
"""

from __future__ import annotations

from typing import Any

from flora_core._xp import Array, Namespace
from flora_core.policy import ROLE_ACCUMULATION, CompressionPlan
from flora_core.projection import compress, decompress, projection


def accumulator_shape(plan: CompressionPlan) -> tuple[int, ...]:
    """Shape of ``acc``: compressed, or the parameter's own shape (behind the batch
    axes of a :class:`~flora_core.policy.StackedPlan`)."""
    return (*plan.batch, *(plan.state_shape if plan.compressed else plan.shape))


def accumulate(
    acc: Array,
    grad: Array,
    cycle: Array | int,
    *,
    plan: CompressionPlan,
    xp: Namespace,
    device: Any = None,
) -> Array:
    """``acc + compress(grad, A_cycle)`` for one micro-batch gradient (float32)."""
    grad = xp.astype(grad, xp.float32, copy=False)
    if plan.compressed:
        grad = xp.reshape(grad, (*plan.batch, *plan.matrix_shape))
    a = projection(plan, cycle, ROLE_ACCUMULATION, xp=xp, device=device)
    return acc + compress(grad, a, plan.axis, xp=xp)


def accumulated_gradient(
    acc: Array,
    cycle: Array | int,
    steps: Array | int,
    *,
    plan: CompressionPlan,
    xp: Namespace,
    device: Any = None,
) -> Array:
    """The mean gradient of the cycle, ``decompress(acc, A_cycle) / τ``, parameter-shaped.

    ``steps`` (τ) may be an integer array (traced: a schedule of τ under jit).
    """
    a = projection(plan, cycle, ROLE_ACCUMULATION, xp=xp, device=device)
    tau = xp.astype(steps, xp.float32) if hasattr(steps, "dtype") else float(steps)
    full = decompress(acc, a, plan.axis, xp=xp) / tau
    return xp.reshape(full, (*plan.batch, *plan.shape))
