"""``scale_by_flora_momentum``: FLORA's compressed EMA as an Optax building block."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from flora_core import rules
from flora_core.momentum import momentum_update
from flora_core.projection import check_transfer
from flora_core.validation import check_beta, check_gradient, check_positive_int
from flora_optax import _common, _docs
from flora_optax._common import FloraSpec


@dataclass(frozen=True)
class MomentumConfig:
    """Hyper-parameters of :func:`scale_by_flora_momentum`."""

    b1: float = 0.9
    kappa: int = 1000
    transfer: str = rules.DEFAULT_TRANSFER

    def __post_init__(self) -> None:
        check_beta("b1", self.b1)
        check_positive_int("kappa", self.kappa)
        check_transfer(self.transfer)


# flora_core's EMA takes b1 and kappa as arrays (NOTE [injected hyper-parameters]).
TRACEABLE = frozenset({"b1", "kappa"})


class FloraMomentumState(NamedTuple):
    """State of :func:`scale_by_flora_momentum`.

    Attributes:
        count: int32 scalar, updates seen so far.
        mu: per leaf, the compressed moment (or the full one where not compressed).
        spec: static (no leaves): the settings, and the plans derived from them
            (NOTE [static spec] in ``flora_optax._common``).
    """

    count: jax.Array
    mu: optax.Updates
    spec: FloraSpec


@_docs.fill
def scale_by_flora_momentum(
    b1: float = 0.9,
    *,
    rank: int | str | None = "auto",
    kappa: int = 1000,
    transfer: str = rules.DEFAULT_TRANSFER,
    seed: int = 0,
    projection: str = "gaussian",
    axis: int | None = None,
    param_indices: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Replace updates by their compressed exponential moving average.

    Per leaf ``u`` at step ``t`` with ``A_i`` the projection of ``i = t // kappa``
    (Algorithm 2 of the paper; at ``t % kappa == 0``, ``t > 0``, ``M`` is first moved
    from ``A_{i-1}`` to ``A_i`` in ``r x r`` space)::

        M <- b1 M + (1 - b1) compress(u, A_i)
        u <- decompress(M, A_i)

    Uncompressed leaves (and ``projection="identity"``) get exactly
    ``optax.ema(b1, debias=False)``. Chain it with a scaling to build an optimizer.

    {streams}

    {static_note}

    {inject_momentum}

    Args:
        b1: decay of the moving average.
        {flora_args}
        {kappa_arg}

    Returns:
        An ``optax.GradientTransformationExtraArgs`` whose state is a
        :class:`FloraMomentumState`.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> params = jnp.ones((128, 64))
        >>> tx = optax.chain(scale_by_flora_momentum(0.9, rank=8), optax.scale(-1e-2))
        >>> state = tx.init(params)
        >>> state[0].mu.shape
        (128, 8)
        >>> updates, state = tx.update(jnp.ones_like(params), state)
        >>> updates.shape, updates.dtype
        ((128, 64), dtype('float32'))

    References:
        {references}
    """
    hyper = dict(b1=b1, kappa=kappa, transfer=transfer)
    _common.known_hyperparameters(MomentumConfig, **hyper)
    structure = _common.Structure.checked(rank, seed, projection, axis, param_indices)

    def init_fn(params: optax.Params) -> FloraMomentumState:
        _common.require_static("scale_by_flora_momentum", hyper, structure)
        plans, treedef = structure.plans(params)
        mu = _common.compressed_zeros(
            "mu", rules.momentum_shape, params, plans, treedef
        )
        extra = _common.recorded_hyperparameters(hyper, TRACEABLE)
        return FloraMomentumState(
            count=jnp.zeros([], jnp.int32),
            mu=mu,
            spec=structure.spec(
                plans, treedef, extra, _common.carried_hyperparameters(hyper)
            ),
        )

    def update_fn(
        updates: optax.Updates, state: FloraMomentumState,
        params: optax.Params | None = None, **extra_args: Any,
    ) -> tuple[optax.Updates, FloraMomentumState]:  # fmt: skip
        del params, extra_args
        plans, treedef = _common.update_plans(
            state.spec, structure, updates, "scale_by_flora_momentum", hyper, TRACEABLE
        )
        config = _common.step_config(
            "scale_by_flora_momentum", MomentumConfig, hyper, TRACEABLE, state.spec
        )
        out, mu = [], []
        leaves = treedef.flatten_up_to(updates)
        moments = treedef.flatten_up_to(state.mu)
        for grad, moment, plan in zip(leaves, moments, plans, strict=True):
            if plan is None:
                out.append(grad)
                mu.append(moment)
                continue
            check_gradient(grad, xp=jnp, name="update")
            view = grad.astype(jnp.float32)
            if plan.compressed:
                view = jnp.reshape(view, plan.matrix_shape)
            moment, direction = momentum_update(
                moment, view, state.count, beta=config.b1, kappa=config.kappa,
                plan=plan, xp=jnp, transfer=config.transfer,
            )  # fmt: skip
            out.append(jnp.reshape(direction, plan.shape).astype(grad.dtype))
            mu.append(moment)
        new_state = FloraMomentumState(
            state.count + 1,
            treedef.unflatten(mu),
            _common.FloraSpec(
                state.spec.settings, plans, treedef, state.spec.hyperparameters
            ),
        )
        return treedef.unflatten(out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
