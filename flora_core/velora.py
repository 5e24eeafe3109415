"""VeLoRA: rank-1 projections of sub-tokens, the activations a linear layer keeps.

A linear layer ``y = x Wᵀ + b`` keeps its input ``x (..., D)`` for ``∂W = ∂yᵀ x``.
VeLoRA splits every token into ``D / M`` sub-tokens of size ``M`` and keeps one scalar
per sub-token, its projection on a fixed unit vector ``v`` (docs/spec.md §6):

    z = group(x) · v                      (..., D/M)        kept for backward
    x̂ = ungroup(z vᵀ)                     (..., D)          rebuilt in backward
    ∂W = ∂yᵀ x̂,   ∂x = ∂y W (exact),   ∂b = Σ ∂y (exact)

so the saved activation shrinks by ``M``. ``v`` is initialised from the mean of the
first batch's sub-tokens and then fixed (``init_v_mean``, the paper's default);
``init_v_random`` and the running average ``update_v_running`` are the paper's
ablations (Table 5c).

Every public function resolves the array namespace of its array argument (or takes
``xp=``), so the same code runs on numpy, torch, JAX, TensorFlow and CuPy; nothing here
imports a framework.

Example:
    >>> import numpy as np
    >>> from flora_core import velora
    >>> x = np.arange(8.0, dtype=np.float32).reshape(2, 4)
    >>> v = velora.init_v_mean(x, 2)
    >>> velora.compress(x, v, 2).shape
    (2, 2)
    >>> velora.reconstruct(velora.compress(x, v, 2), v, 2).shape
    (2, 4)

References:
    Miles, Reddy, Elezi, Deng, "VeLoRA: Memory Efficient Training using Rank-1
    Sub-Token Projections", NeurIPS 2024 (§3.1, Algorithm 1, Table 5).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flora_core import _xp, rng
from flora_core._xp import Array, Namespace

INITS = ("mean", "random", "running")


def check_group_size(group_size: object) -> int:
    """``group_size`` (the sub-token size M) as an int >= 1, or an error naming it."""
    if isinstance(group_size, bool) or not isinstance(group_size, int | np.integer):
        raise ValueError(f"Invalid group_size M: {group_size!r} (expected an int >= 1)")
    if int(group_size) < 1:
        raise ValueError(f"Invalid group_size M: {group_size} (expected an int >= 1)")
    return int(group_size)


def check_features(features: object, group_size: object) -> int:
    """The number of sub-tokens per token, ``D / M``; M must divide D."""
    m = check_group_size(group_size)
    if features is None:
        raise ValueError("The feature dimension D must be known to group sub-tokens")
    d = int(features)  # type: ignore[call-overload]
    if d % m:
        raise ValueError(
            f"group_size M={m} does not divide the feature dimension D={d}; pick M "
            f"among the divisors of {d}"
        )
    return d // m


def _lead(shape: tuple[Any, ...]) -> tuple[int, ...]:
    """A leading shape for reshape; one unknown (None) dimension becomes -1."""
    lead = tuple(shape)
    unknown = sum(d is None for d in lead)
    if unknown > 1:
        raise ValueError(
            f"At most one leading dimension may be unknown, got {lead}; "
            "flatten the leading dimensions first"
        )
    return tuple(-1 if d is None else d for d in lead)


def group(x: Array, group_size: int, *, xp: Namespace | None = None) -> Array:
    """Split each token into sub-tokens: ``(..., D) -> (..., D/M, M)``.

    Args:
        x: activations whose last axis is the feature axis of size D.
        group_size: the sub-token size M (divides D).
        xp: the array namespace (resolved from ``x`` when omitted).

    Returns:
        A reshaped view of ``x`` of shape ``(..., D/M, M)``.
    """
    xp = xp or _xp.namespace(x)
    m = check_group_size(group_size)
    if not tuple(x.shape):
        raise ValueError("VeLoRA needs an array with a feature axis, got a scalar")
    groups = check_features(x.shape[-1], m)
    return xp.reshape(x, (*_lead(tuple(x.shape)[:-1]), groups, m))


def ungroup(g: Array, *, xp: Namespace | None = None) -> Array:
    """Merge sub-tokens back into tokens: ``(..., D/M, M) -> (..., D)``."""
    xp = xp or _xp.namespace(g)
    shape = tuple(g.shape)
    if len(shape) < 2:
        raise ValueError(f"ungroup needs shape (..., D/M, M), got {shape}")
    return xp.reshape(g, (*_lead(shape[:-2]), shape[-2] * shape[-1]))


def _check_v(v: Array, group_size: int, xp: Namespace) -> Array:
    """``v`` as a flat vector of M entries."""
    size = 1
    for d in tuple(v.shape):
        size *= int(d)
    if size != group_size:
        raise ValueError(
            f"v has {size} entries (shape {tuple(v.shape)}) but group_size M="
            f"{group_size}; v must be a vector of M entries"
        )
    return xp.reshape(v, (group_size,))


def compress(
    x: Array, v: Array, group_size: int, *, xp: Namespace | None = None
) -> Array:
    """Project every sub-token on ``v``: ``z = group(x) · v``, one scalar per sub-token.

    Args:
        x: activations ``(..., D)``.
        v: the unit projection vector, ``M`` entries (cast to ``x``'s dtype).
        group_size: the sub-token size M (divides D).
        xp: the array namespace (resolved from ``x`` when omitted).

    Returns:
        ``z`` of shape ``(..., D/M)`` and ``x``'s dtype.
    """
    xp = xp or _xp.namespace(x)
    m = check_group_size(group_size)
    g = group(x, m, xp=xp)
    column = xp.reshape(xp.astype(_check_v(v, m, xp), x.dtype), (m, 1))
    return xp.matmul(g, column)[..., 0]


def reconstruct(
    z: Array, v: Array, group_size: int, *, xp: Namespace | None = None
) -> Array:
    """Rebuild tokens from their compressed sub-tokens: ``x̂ = ungroup(z vᵀ)``.

    Args:
        z: compressed sub-tokens ``(..., D/M)``.
        v: the projection vector used by ``compress`` (M entries).
        group_size: the sub-token size M.
        xp: the array namespace (resolved from ``z`` when omitted).

    Returns:
        ``x̂`` of shape ``(..., D)``: each sub-token replaced by ``(sub-token · v) v``.
    """
    xp = xp or _xp.namespace(z)
    m = check_group_size(group_size)
    row = xp.reshape(xp.astype(_check_v(v, m, xp), z.dtype), (1, m))
    return ungroup(xp.expand_dims(z, axis=-1) * row, xp=xp)


def _concrete(x: Array) -> float | None:
    """``x`` as a Python float, or None when it is traced (jit, tf.function)."""
    if _xp._is_tensorflow(x):
        to_numpy = getattr(x, "numpy", None)  # symbolic graph tensors have none
        return float(to_numpy()) if to_numpy is not None else None
    try:
        return float(x)
    except TypeError:  # a JAX tracer (ConcretizationTypeError is a TypeError)
        return None


def normalize(v: Array, *, xp: Namespace | None = None, what: str = "v") -> Array:
    """``v / ‖v‖``; a zero or non-finite norm is an error (checked when concrete)."""
    xp = xp or _xp.namespace(v)
    norm = xp.sqrt(xp.sum(v * v))
    value = _concrete(norm)
    if value is not None and not (np.isfinite(value) and value > 0.0):
        raise ValueError(
            f"Cannot normalise {what}: its norm is {value}; VeLoRA needs a non-zero, "
            "finite projection vector (for an all-zero batch use init='random')"
        )
    return v / norm


def subtoken_mean(x: Array, group_size: int, *, xp: Namespace | None = None) -> Array:
    """The mean of all sub-tokens of ``x``, a vector of M entries."""
    xp = xp or _xp.namespace(x)
    m = check_group_size(group_size)
    g = group(x, m, xp=xp)
    return xp.mean(xp.reshape(g, (-1, m)), axis=0)


def init_v_mean(x: Array, group_size: int, *, xp: Namespace | None = None) -> Array:
    """The paper's default ``v``: the first batch's mean sub-token, at unit length.

    Args:
        x: the first training batch's activations ``(..., D)``.
        group_size: the sub-token size M (divides D).
        xp: the array namespace (resolved from ``x`` when omitted).

    Returns:
        ``v = mean(sub-tokens) / ‖mean(sub-tokens)‖``, M entries, ``x``'s dtype.
    """
    xp = xp or _xp.namespace(x)
    mean = subtoken_mean(x, group_size, xp=xp)
    return normalize(mean, xp=xp, what="the mean sub-token of the first batch")


def init_v_random(
    seed: int,
    group_size: int,
    *,
    stream: int = 0,
    xp: Namespace | None = None,
    device: Any = None,
) -> Array:
    """A random unit ``v``, bit-identical on every backend.

    The Gaussian draws are FLORA-RNG v1 (``rng.gaussian(seed, 0, stream, (1, M))``);
    they are normalised on the host in float64 and rounded once to float32, so every
    framework gets the same bits.

    Args:
        seed: uint64 seed.
        group_size: the sub-token size M.
        stream: uint32 stream id (e.g. the layer's index) so layers differ.
        xp: the namespace of the result (numpy when omitted).
        device: the device of the result (torch / CuPy).

    Returns:
        A float32 unit vector of M entries.
    """
    m = check_group_size(group_size)
    draws = np.asarray(rng.gaussian(seed, 0, stream, (1, m), xp=np), dtype=np.float64)
    host = (draws / np.sqrt(np.sum(draws * draws))).astype(np.float32).reshape(m)
    if xp is None:
        return host
    if device is None:
        return xp.asarray(host)
    return xp.asarray(host, device=device)


def update_v_running(
    v: Array,
    x: Array,
    group_size: int,
    momentum: float,
    *,
    xp: Namespace | None = None,
) -> Array:
    """One running-average step of ``v`` towards the batch's mean sub-token direction.

    ``v ← normalize(β v + (1 - β) normalize(mean(sub-tokens of x)))``; the batch mean
    is normalised first so that β weighs directions, not activation scales.

    Args:
        v: the current unit vector (M entries).
        x: this batch's activations ``(..., D)``.
        group_size: the sub-token size M.
        momentum: β in [0, 1]; 1 keeps ``v``, 0 replaces it by this batch's mean.
        xp: the array namespace (resolved from ``x`` when omitted).

    Returns:
        The new unit vector, M entries.
    """
    if isinstance(momentum, bool) or not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"Invalid momentum: {momentum!r} (expected a float in [0, 1])")
    xp = xp or _xp.namespace(x)
    m = check_group_size(group_size)
    batch = init_v_mean(x, m, xp=xp)
    old = xp.astype(_check_v(v, m, xp), batch.dtype)
    return normalize(momentum * old + (1.0 - momentum) * batch, xp=xp)
