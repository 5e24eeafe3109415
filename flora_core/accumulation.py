"""Compressed gradient accumulation: FLORA Algorithm 1 (docs/spec.md §4, normative).

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


def accumulated_square_norm(
    acc: Array,
    cycle: Array | int,
    *,
    plan: CompressionPlan,
    xp: Namespace,
    device: Any = None,
) -> Array:
    """``‖decompress(acc, A_cycle)‖²`` without decompressing (float32 scalar).

    NOTE [norm in r x r space]: with ``A`` the cycle's ``r x d`` accumulation
    projection and ``C = acc``, ``‖C A‖² = tr(C A Aᵀ Cᵀ) = sum(C ⊙ (C (A Aᵀ)))`` for
    the last axis compressed and ``‖Aᵀ C‖² = sum(C ⊙ ((A Aᵀ) C))`` for the first: the
    exact Frobenius norm of the decompressed sum (an identity, not an estimate), for
    one ``r x d x r`` and one ``n x r x r`` product and no full-size temporary. In
    float32 it differs from the norm of the materialised ``C A`` by rounding only
    (relative error about 1e-7, ``tests/torch/test_clipping.py``). Clipping under
    accumulation uses it: the host's own clip cannot see a gradient that was folded
    into ``acc`` during backward. Uncompressed, ``acc`` is the full sum.
    """
    a = projection(plan, cycle, ROLE_ACCUMULATION, xp=xp, device=device)
    if a is None:
        return xp.sum(acc * acc)
    gram = xp.matmul(a, xp.matrix_transpose(a))  # r x r
    moved = xp.matmul(acc, gram) if plan.axis == 1 else xp.matmul(gram, acc)
    return xp.sum(acc * moved)
