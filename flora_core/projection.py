"""Random projections and compress / decompress / transfer (docs/spec.md §3, normative).

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
TRANSFERS = ("paper", "norm", "least_squares")


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


def check_transfer(transfer: object) -> str:
    if transfer not in TRANSFERS:
        raise ValueError(
            f"Invalid transfer: {transfer!r} (expected one of {TRANSFERS})"
        )
    return transfer  # type: ignore[return-value]


def transfer_gain(plan: CompressionPlan) -> float:
    """``γ = E‖X A_newᵀ A_new‖² / ‖X‖²`` for a fixed ``X`` and a fresh projection.

    ``1 + (d + 1) / r`` for gaussian and ``1 + (d - 1) / r`` for rademacher entries
    (the diagonal of ``AᵀA`` is exactly 1 there); 1 for the identity.
    """
    if plan.rank is None or plan.distribution == "identity":
        return 1.0
    d, r = plan.dim, plan.rank
    return 1.0 + (d + (1 if plan.distribution == "gaussian" else -1)) / r


def transfer_scale(plan: CompressionPlan, transfer: str) -> float:
    """The factor ``c`` of ``C <- c · C (A_old A_newᵀ)`` for a transfer rule.

    NOTE [transfer rules]: with ``X`` the decompressed moment and ``γ`` of
    :func:`transfer_gain`, the moved moment ``c X A_newᵀ A_new`` has expected squared
    norm ``c² γ ‖X‖²`` and relative error ``E‖c X A_newᵀA_new - X‖² / ‖X‖² =
    c² γ - 2c + 1``:

    =================  ============  ==================  ==========================
    rule               c             norm gain           error (d/r = 16, gaussian)
    =================  ============  ==================  ==========================
    ``paper``          1             ``sqrt(γ)`` (4.1)   ``γ - 1`` (16.1)
    ``norm``           ``1/sqrt(γ)``  1                   ``2 - 2/sqrt(γ)`` (1.52)
    ``least_squares``  ``1/γ``       ``1/sqrt(γ)``       ``1 - 1/γ`` (0.94)
    =================  ============  ==================  ==========================

    Dropping the moment (``c = 0``) has error 1. ``paper`` is Algorithm 2 as
    printed: unbiased, but each transfer multiplies the moment's norm by
    ``sqrt(γ) ≈ sqrt(d/r)``, so it is only safe when the moment decays between
    transfers (``β^κ · sqrt(γ) << 1``). ``least_squares`` is the ``c`` of least
    expected error (about the pseudo-inverse transfer ``A_old A_newᵀ (A_new
    A_newᵀ)⁻¹``, since ``A Aᵀ ≈ (d/r) I``).
    """
    gain = transfer_gain(plan)
    if transfer == "paper":
        return 1.0
    if transfer == "norm":
        return 1.0 / math.sqrt(gain)
    if transfer == "least_squares":
        return 1.0 / gain
    raise ValueError(f"Invalid transfer: {transfer!r} (expected one of {TRANSFERS})")


def transfer(
    c: Array,
    a_old: Projection,
    a_new: Projection,
    axis: int,
    *,
    xp: Namespace,
    scale: float = 1.0,
) -> Array:
    """Move a compressed state from ``a_old`` to ``a_new`` in ``r x r`` space.

    NOTE [momentum transfer]: old projection up, new projection down; the ``r x r``
    product (times ``scale``, see NOTE [transfer rules]) is formed first, so nothing
    of full size is built.
    """
    if a_old is None or a_new is None:
        return c
    if axis == 1:
        bridge = xp.matmul(a_old, xp.matrix_transpose(a_new))
        return xp.matmul(c, bridge if scale == 1.0 else bridge * scale)
    bridge = xp.matmul(a_new, xp.matrix_transpose(a_old))
    return xp.matmul(bridge if scale == 1.0 else bridge * scale, c)
