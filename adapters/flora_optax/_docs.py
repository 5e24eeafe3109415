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
Hyper-parameters other than the learning rate shape the state or the projections
    and are fixed when the state is initialised; under ``optax.inject_hyperparams``
    only ``learning_rate`` follows the injected value (a schedule, or a value set in
    ``state.hyperparams``). The state records its plans and settings statically
    (``state.spec``), so a jitted step never recompiles.""",
    "references": """\
Hao, Cao, Mou. "Flora: Low-Rank Adapters Are Secretly Gradient Compressors",
        ICML 2024 (https://arxiv.org/abs/2402.03293).""",
}


def fill(fn: F) -> F:
    """Substitute the fragments named in ``fn.__doc__``."""
    doc = fn.__doc__ or ""
    for name, text in FRAGMENTS.items():
        doc = doc.replace("{" + name + "}", text)
    fn.__doc__ = doc
    return fn
