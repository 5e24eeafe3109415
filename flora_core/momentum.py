"""Compressed momentum: FLORA Algorithm 2 (docs/spec.md §4, normative).

With ``t`` updates applied so far and resample index ``i = t // κ``:
when ``t > 0`` and ``t % κ == 0`` the moment moves from ``A_{i-1}`` to ``A_i``
(see NOTE [momentum transfer] and NOTE [transfer rules]); then
``M <- β M + (1 - β) compress(U, A_i)`` and the direction is ``decompress(M, A_i)``.

``count`` may be a Python int (eager adapters: the transfer is a Python branch) or an
integer array (traced code: the transfer is gated with ``where``, never a branch).

References:
    Hao, Cao, Mou. "Flora: Low-Rank Adapters Are Secretly Gradient Compressors",
    ICML 2024, Algorithm 2.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

from flora_core._xp import Array, Namespace, backend_name
from flora_core.policy import ROLE_MOMENTUM, CompressionPlan
from flora_core.projection import (
    Projection,
    compress,
    decompress,
    projection,
    transfer,
    transfer_gain,
    transfer_scale,
)


def resample_index(count: Array | int, kappa: int) -> Array | int:
    """``i = t // κ``: which projection step ``t`` uses."""
    return count // kappa


def starts_interval(count: Array | int, kappa: int) -> Array | bool:
    """Whether update ``t`` is the first on a new projection (``t > 0``, ``t % κ == 0``):
    a Python bool for an int ``t``, a boolean array for a traced one."""
    if isinstance(count, int):
        return count > 0 and count % kappa == 0
    return (count > 0) & (count % kappa == 0)


def _transferred(
    mu: Array,
    count: Array | int,
    kappa: int,
    a_new: Any,
    plan: CompressionPlan,
    transfer_rule: str,
    xp: Namespace,
    device: Any,
) -> Array:
    """``mu`` moved onto ``a_new`` when ``count`` starts a new resample interval."""
    if a_new is None:
        return mu
    index = resample_index(count, kappa)
    scale = transfer_scale(plan, transfer_rule)

    def moved(m: Array) -> Array:
        # Traced: index - 1 wraps to 2**32 - 1 at t = 0, a harmless draw that is masked.
        a_old = projection(plan, index - 1, ROLE_MOMENTUM, xp=xp, device=device)
        return transfer(m, a_old, a_new, plan.axis, xp=xp, scale=scale)  # type: ignore[arg-type]

    starts = starts_interval(count, kappa)
    if isinstance(starts, bool):
        return moved(mu) if starts else mu

    if backend_name(xp) == "jax":
        # NOTE [transfer cond]: the transfer runs once every κ steps; under jax.jit a
        # lax.cond skips, on the other steps, the r x d draw of A_{i-1} and the
        # k x r x r product that `where` would compute and discard (10-27% of a
        # FloraAdam step on CPU).
        from jax import lax

        return lax.cond(starts, moved, lambda m: m, mu)
    return xp.where(starts, moved(mu), mu)


def momentum_step(
    mu: Array,
    update: Array,
    count: Array | int,
    *,
    beta: float,
    kappa: int,
    plan: CompressionPlan,
    xp: Namespace,
    device: Any = None,
    transfer: str = "paper",
) -> tuple[Array, Projection, Array]:
    """One step of compressed EMA, not yet decompressed.

    Args:
        mu: the compressed moment (``plan.state_shape``), or the full one when the
            parameter is not compressed.
        update: the new float32 update, in the matrix view when compressed.
        count: ``t``, the number of updates applied before this one.
        beta: EMA decay.
        kappa: resampling interval κ.
        plan: the parameter's compression plan.
        transfer: how the moment moves to a new projection, one of
            ``projection.TRANSFERS`` (NOTE [transfer rules]).

    Returns:
        ``(new_mu, a, compressed)``: the new moment, the projection ``A_i`` it lives
        on (None: identity) and ``compress(update, A_i)``. ``decompress(new_mu, a)``
        is the direction; ``decompress(compressed, a)`` is the update as the moment
        sees it.
    """
    a = projection(
        plan, resample_index(count, kappa), ROLE_MOMENTUM, xp=xp, device=device
    )
    mu = _transferred(mu, count, kappa, a, plan, transfer, xp, device)
    compressed = compress(update, a, plan.axis, xp=xp)
    return beta * mu + (1.0 - beta) * compressed, a, compressed


def momentum_update(
    mu: Array,
    update: Array,
    count: Array | int,
    *,
    beta: float,
    kappa: int,
    plan: CompressionPlan,
    xp: Namespace,
    device: Any = None,
    transfer: str = "paper",
) -> tuple[Array, Array]:
    """``momentum_step`` and the direction: ``(new_mu, decompress(new_mu, A_i))``."""
    new_mu, a, _ = momentum_step(
        mu, update, count, beta=beta, kappa=kappa, plan=plan, xp=xp, device=device,
        transfer=transfer,
    )  # fmt: skip
    return new_mu, decompress(new_mu, a, plan.axis, xp=xp)


class UndampedTransferWarning(UserWarning):
    """A κ with which the transferred moment grows from one interval to the next."""


def transfer_growth(
    plan: CompressionPlan, beta: float, kappa: int, transfer: str
) -> float:
    """``β^κ · c · sqrt(γ)``: how much a moment carried across a resample grows per
    interval (it decays by ``β^κ`` in between; a transfer multiplies its expected
    norm by ``c sqrt(γ)``, NOTE [transfer rules]). At 1 or more it never fades."""
    if not plan.compressed or plan.distribution == "identity":
        return 0.0
    gain = transfer_scale(plan, transfer) * math.sqrt(transfer_gain(plan))
    return float(beta**kappa * gain)


def warn_undamped(
    plans: Sequence[CompressionPlan | None],
    beta: float | None,
    kappa: int,
    transfer: str,
    names: Sequence[str | None] | None = None,
) -> None:
    """One :class:`UndampedTransferWarning` naming each compressed parameter whose
    moment cannot be damped (``transfer_growth >= 1``), with β, κ, d and r."""
    if beta is None:
        return
    bad = []
    for i, plan in enumerate(plans):
        if plan is None:
            continue
        growth = transfer_growth(plan, beta, kappa, transfer)
        if growth >= 1.0:
            name = (
                names[i] if names is not None and names[i] else f"#{plan.param_index}"
            )
            bad.append(f"{name} (d={plan.dim}, r={plan.rank}: x{growth:.3g})")
    if bad:
        shown = ", ".join(bad[:5]) + (
            f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        )
        warnings.warn(
            f"transfer={transfer!r} with beta={beta} and kappa={kappa} cannot damp the "
            f"moment carried across resamples: each interval multiplies it by "
            f"beta**kappa * sqrt(1 + (d+1)/r) >= 1 for {shown}; it will grow until "
            "the run diverges. Use transfer='least_squares' (the default) or 'norm', "
            "or a larger kappa.",
            UndampedTransferWarning,
            stacklevel=3,
        )
