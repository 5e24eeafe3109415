"""``flora_multi_steps``: ``optax.MultiSteps`` with a compressed accumulator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from flora_core import accumulation
from flora_core.validation import check_gradient, check_positive_int
from flora_optax import _common, _docs
from flora_optax._common import FloraSpec


class FloraMultiStepsState(NamedTuple):
    """State of :func:`flora_multi_steps` (docs/spec.md §5 names).

    Attributes:
        micro_step: int32 scalar, micro-batches accumulated in the current cycle.
        count: int32 scalar, updates emitted so far (the cycle ``c`` whose
            projection ``A_c`` compresses the micro-batch gradients).
        inner_state: the wrapped optimizer's state.
        acc: per leaf, the compressed sum of this cycle's gradients (full-size where
            the leaf is not compressed).
        spec: static (no leaves): the settings, and the plans derived from them
            (NOTE [static spec] in ``flora_optax._common``).
    """

    micro_step: jax.Array
    count: jax.Array
    inner_state: Any
    acc: optax.Updates
    spec: FloraSpec


@_docs.fill
def flora_multi_steps(
    inner: optax.GradientTransformation,
    every_k_schedule: int | Callable[[jax.Array], Any],
    *,
    rank: int | str | None = "auto",
    seed: int = 0,
    projection: str = "gaussian",
    axis: int | None = None,
    param_indices: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Accumulate gradients over ``k`` micro-batches in compressed form (Algorithm 1).

    ``optax.MultiSteps`` semantics (mean of the micro-batch gradients, zero updates
    between emissions, ``every_k_schedule`` an int or a function of the number of
    updates emitted), but the accumulator of a compressed leaf is ``k x r``: in cycle
    ``c`` each micro-batch gradient is compressed with ``A_c`` (role 1) and summed;
    on the ``k``-th micro-batch the inner optimizer sees
    ``decompress(acc, A_c) / k`` and ``acc`` resets. Nothing full-size survives
    between micro-batches. The inner optimizer runs (under ``lax.cond``) only on
    emitting steps; nothing branches in Python on traced values.

    Gradient clipping: to clip what the update uses, the accumulated mean, put the
    clip inside, ``flora_multi_steps(optax.chain(optax.clip_by_global_norm(c),
    flora_adam(...)), k)``: the inner transformation sees the decompressed mean, as
    in ``optax.MultiSteps``. Chained before (``optax.chain(
    optax.clip_by_global_norm(c), flora_multi_steps(...))``) it clips each
    micro-batch gradient before compression, and the mean the update uses is not
    clipped: decompressing a rank-``r`` projection can make its norm exceed ``c``.

    {streams}

    Args:
        inner: the optimizer applied to the accumulated gradient (any optax
            transformation, e.g. :func:`flora_adam`).
        every_k_schedule: micro-batches per update: an int ``>= 1`` or a function
            ``count -> k`` of the number of updates emitted.
        {flora_args}

    Returns:
        An ``optax.GradientTransformationExtraArgs`` whose state is a
        :class:`FloraMultiStepsState`.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> params = jnp.ones((64, 48))
        >>> tx = flora_multi_steps(optax.sgd(0.1), 4, rank=8)
        >>> state = tx.init(params)
        >>> state.acc.shape
        (64, 8)
        >>> for _ in range(4):
        ...     updates, state = tx.update(jnp.ones_like(params), state, params)
        >>> int(state.count), int(state.micro_step)
        (1, 0)

    References:
        {references}
    """
    if isinstance(every_k_schedule, bool) or not (
        callable(every_k_schedule) or isinstance(every_k_schedule, int)
    ):
        raise TypeError(f"Invalid every_k_schedule: {every_k_schedule!r}")
    if not callable(every_k_schedule):
        check_positive_int("every_k_schedule", every_k_schedule)
    structure = _common.Structure.checked(rank, seed, projection, axis, param_indices)
    inner = optax.with_extra_args_support(inner)

    def every_k(count: jax.Array) -> Any:
        if callable(every_k_schedule):
            return every_k_schedule(count)
        return every_k_schedule

    def init_fn(params: optax.Params) -> FloraMultiStepsState:
        _common.require_static("flora_multi_steps", {}, structure)
        plans, treedef = structure.plans(params)
        acc = _common.compressed_zeros(
            "acc", accumulation.accumulator_shape, params, plans, treedef
        )
        return FloraMultiStepsState(
            micro_step=jnp.zeros([], jnp.int32),
            count=jnp.zeros([], jnp.int32),
            inner_state=inner.init(params),
            acc=acc,
            spec=structure.spec(
                plans,
                treedef,
                hyperparameters=(("every_k_schedule", every_k_schedule),),
            ),
        )

    def update_fn(
        updates: optax.Updates, state: FloraMultiStepsState,
        params: optax.Params | None = None, **extra_args: Any,
    ) -> tuple[optax.Updates, FloraMultiStepsState]:  # fmt: skip
        plans, treedef = _common.update_plans(
            state.spec, structure, updates, "flora_multi_steps"
        )
        grads = treedef.flatten_up_to(updates)
        cycle, k = state.count, every_k(state.count)
        acc = []
        for grad, total, plan in zip(grads, treedef.flatten_up_to(state.acc), plans,
                                     strict=True):  # fmt: skip
            if plan is not None:
                check_gradient(grad, xp=jnp)
                total = accumulation.accumulate(total, grad, cycle, plan=plan, xp=jnp)
            acc.append(total)
        emit = state.micro_step == k - 1

        def emit_branch(operands: tuple[Any, Any, Any]) -> tuple[Any, Any]:
            acc, inner_state, params = operands
            mean = [
                total if plan is None else accumulation.accumulated_gradient(
                    total, cycle, k, plan=plan, xp=jnp
                ).astype(grad.dtype)
                for total, grad, plan in zip(acc, grads, plans, strict=True)
            ]  # fmt: skip
            out, new_inner = inner.update(
                treedef.unflatten(mean), inner_state, params, **extra_args
            )
            # As optax.MultiSteps: both branches must return the same dtypes.
            new_inner = jax.tree.map(
                lambda n, o: n.astype(o.dtype), new_inner, inner_state
            )
            return out, new_inner

        def skip_branch(operands: tuple[Any, Any, Any]) -> tuple[Any, Any]:
            shapes, _ = jax.eval_shape(emit_branch, operands)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            return zeros, operands[1]

        out, inner_state = lax.cond(
            emit, emit_branch, skip_branch, (acc, state.inner_state, params)
        )
        acc = [
            a if plan is None else jnp.where(emit, 0.0, a)
            for a, plan in zip(acc, plans, strict=True)
        ]
        return out, FloraMultiStepsState(
            micro_step=jnp.where(emit, 0, state.micro_step + 1).astype(jnp.int32),
            count=(state.count + emit).astype(jnp.int32),
            inner_state=inner_state,
            acc=treedef.unflatten(acc),
            spec=FloraSpec(
                state.spec.settings, plans, treedef, state.spec.hyperparameters
            ),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
