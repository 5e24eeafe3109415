"""Random projections and compress / decompress / transfer (DESIGN §3, normative).

For resample index ``i`` the projection is ``A_i`` (``r x d``) with
``A_i[a, b] = z(seed, i, stream, (a, b)) / sqrt(r)``, ``z`` gaussian or rademacher, so
that ``E[A_iᵀ A_i] = I_d``. ``identity`` stands for ``A = I`` and is never materialised.

| axis compressed | compress     | decompress   | transfer i -> j          |
| last (d = m)    | C = G A_iᵀ   | Ĝ = C A_i    | C <- C (A_i A_jᵀ)        |
| first (d = n)   | C = A_i G    | Ĝ = A_iᵀ C   | C <- (A_j A_iᵀ) C        |
"""

from __future__ import annotations

import math
from typing import Any

from flora_core import rng
from flora_core._xp import Array, Namespace
from flora_core.policy import CompressionPlan

Projection = Array | None  # None stands for the identity


def projection(
    plan: CompressionPlan,
    index: Array | int,
    role: int,
    *,
    xp: Namespace,
    device: Any = None,
    cols: tuple[int, int] | None = None,
) -> Projection:
    """``A_index`` of ``plan`` for ``role`` (float32, ``r x d``), or None for identity.

    None (the identity) is also what an uncompressed parameter gets, so the momentum
    and accumulation code has one path for every parameter.

    Args:
        plan: the parameter's compression plan.
        index: the resample / cycle index (int or integer array, may be traced).
        role: 0 momentum, 1 accumulation.
        xp: namespace; device: torch / CuPy device.
        cols: generate only the block ``A[:, cols[0]:cols[1]]`` (a shard of ``d``).
    """
    if plan.distribution == "identity" or plan.rank is None:
        return None
    start, stop = (0, plan.dim) if cols is None else cols
    shape = (plan.rank, stop - start)
    draw = rng.gaussian if plan.distribution == "gaussian" else rng.rademacher
    z = draw(
        plan.seed,
        index,
        plan.stream(role),
        shape,
        xp=xp,
        offset=(0, start),
        device=device,
    )
    # NOTE [projection scale]: multiply by float32(1/sqrt(r)), a single exactly-rounded
    # op that no compiler rewrites, so A itself is bit-identical on every backend.
    return z * float(1.0 / math.sqrt(plan.rank))


def compress(g: Array, a: Projection, axis: int | None, *, xp: Namespace) -> Array:
    """``G Aᵀ`` (axis 1) or ``A G`` (axis 0) of a 2-D ``g``."""
    if a is None:
        return g
    if axis == 1:
        return xp.matmul(g, xp.matrix_transpose(a))
    return xp.matmul(a, g)


def decompress(c: Array, a: Projection, axis: int | None, *, xp: Namespace) -> Array:
    """``C A`` (axis 1) or ``Aᵀ C`` (axis 0): back to the 2-D parameter shape."""
    if a is None:
        return c
    if axis == 1:
        return xp.matmul(c, a)
    return xp.matmul(xp.matrix_transpose(a), c)


def transfer(
    c: Array, a_old: Projection, a_new: Projection, axis: int, *, xp: Namespace
) -> Array:
    """Move a compressed state from ``a_old`` to ``a_new`` in ``r x r`` space.

    NOTE [momentum transfer]: old projection up, new projection down; the ``r x r``
    product is formed first, so nothing of full size is built.
    """
    if a_old is None or a_new is None:
        return c
    if axis == 1:
        return xp.matmul(c, xp.matmul(a_old, xp.matrix_transpose(a_new)))
    return xp.matmul(xp.matmul(a_new, xp.matrix_transpose(a_old)), c)
