"""Hyper-parameter documentation, written once and interpolated into docstrings.

Each public transformation's docstring names fragments as ``{flora_args}`` and
friends; :func:`fill` substitutes them (plain text replacement, so dict literals in
examples are left alone).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])

FRAGMENTS = {
    "flora_args": """\
rank: ``"auto"`` (default: ``r = min(256, d // 4)`` for a compressed axis of
            size ``d >= 32``, so ordinary weight matrices are compressed 4x or
            more), an int ``r`` (compress where the axis is larger than ``r``) or
            None (never compress). Vectors and scalars are never compressed.
        seed: uint64 seed of the projections (FLORA-RNG v1).
        projection: ``"gaussian"``, ``"rademacher"`` or ``"identity"`` (no
            compression; a testing mode that reproduces the base optimizer).
        axis: force the compressed axis (0 or 1 of the matrix view
            ``(shape[0], prod(shape[1:]))``); default: the smaller one.
        param_indices: override the stream ids: a list with one int per leaf in
            ``jax.tree_util`` flatten order, or a pytree of ints shaped like the
            params. Default: the leaf's position in that order.""",
    "kappa_arg": """\
kappa: resample the projection every ``kappa`` updates; the moment is
            transferred to the new projection in ``r x r`` space.
        transfer: how the moment moves onto a new projection:
            ``"least_squares"`` (default: scaled by ``1/γ``, ``γ = 1 + (d+1)/r``,
            the least expected error, stable at any ``kappa``), ``"norm"``
            (scaled by ``1/sqrt(γ)``: keeps the moment's norm) or ``"paper"``
            (Algorithm 2 as printed: each transfer multiplies the moment's norm by
            about ``sqrt(d/r)``; stable only while ``b^kappa sqrt(d/r) << 1``).
            See NOTE [transfer rules] in ``flora_core.projection``.""",
    "streams": """\
Stream ids: leaf ``i`` of the params in ``jax.tree_util`` flatten order (the order
    of ``jax.tree.leaves(params)``) draws its projections from stream
    ``(i << 2) | role`` (role 0 momentum, 1 accumulation), so the same params give the
    same projections as ``flora_torch`` and ``flora_keras`` built on them in that order.
    Under ``optax.masked`` and ``optax.multi_transform`` a leaf keeps its position in
    the full tree. ``param_indices`` overrides the positions.""",
    "static_note": """\
The state records its settings statically (``state.spec``, compared by value) and
    its pytree structure does not depend on the params: a jitted step never
    recompiles, and ``optax.tree.map_params`` works (see the ``flora_optax`` module).""",
    "references": """\
Hao, Cao, Mou. "Flora: Low-Rank Adapters Are Secretly Gradient Compressors",
        ICML 2024 (https://arxiv.org/abs/2402.03293).""",
}


_RECORDED = """\
the state records the value init saw, and a jitted update uses
    that record (a change injected later is followed only by an eager update). So
    when init runs under ``jax.jit``, list them in ``static_args``; the jitted update
    raises, naming them, otherwise (NOTE [injected hyper-parameters])."""

FRAGMENTS["inject_adam"] = (
    """\
Under ``optax.inject_hyperparams`` any numeric argument may be injected, and
    ``jax.jit(tx.init)`` needs static (``static_args``) only what fixes the state's
    shapes: an int ``rank`` and ``axis``. Injected ``learning_rate``, ``eps`` and
    ``kappa`` are followed by every update, jitted or not. ``seed`` (a uint64 RNG
    key, which a JAX int32 cannot hold), ``b1``, ``b2`` and ``weight_decay``
    (flora_core's bias corrections take ``log(b1)`` and ``log(b2)``) are needed as
    Python values: """
    + _RECORDED
)

FRAGMENTS["inject_adafactor"] = (
    """\
Under ``optax.inject_hyperparams`` any numeric argument may be injected, and
    ``jax.jit(tx.init)`` needs static (``static_args``) only what fixes the state's
    shapes: an int ``rank``, ``axis`` and ``min_dim_size_to_factor`` (as for
    ``optax.adafactor``). The other injected values are followed by every update,
    jitted or not, except ``seed`` (a uint64 RNG key, which a JAX int32 cannot
    hold), which is needed as a Python value: """
    + _RECORDED
)

FRAGMENTS["inject_momentum"] = (
    """\
Under ``optax.inject_hyperparams`` any numeric argument may be injected, and
    ``jax.jit(tx.init)`` needs static (``static_args``) only an int ``rank`` and
    ``axis`` (they fix the state's shapes). Injected ``b1`` and ``kappa`` are
    followed by every update, jitted or not. ``seed`` (a uint64 RNG key, which a JAX
    int32 cannot hold) is needed as a Python value: """
    + _RECORDED
)


def fill(fn: F) -> F:
    """Substitute the fragments named in ``fn.__doc__``."""
    doc = fn.__doc__ or ""
    for name, text in FRAGMENTS.items():
        doc = doc.replace("{" + name + "}", text)
    fn.__doc__ = doc
    return fn
