"""Plumbing shared by the Flora transformations: leaves, plans, the static spec and
hyper-parameter handling. No optimizer math lives here (that is ``flora_core``).

Leaves are taken in ``jax.tree_util`` flatten order with ``optax.MaskedNode`` counted
as a leaf, so under ``optax.masked`` / ``optax.multi_transform`` a parameter keeps its
position in the full tree (hence its RNG stream).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flora_core import policy
from flora_core.rng import check_seed
from flora_core.validation import check_gradient, check_lr

Plans = tuple[policy.CompressionPlan | None, ...]


class _Injected:
    """A hyper-parameter that arrived traced (``optax.inject_hyperparams`` in jit)."""

    def __repr__(self) -> str:
        return "INJECTED"


INJECTED = _Injected()


@jax.tree_util.register_static
@dataclass(frozen=True)
class FloraSpec:
    """Static part of a Flora state: no leaves, compared by value in jit's cache.

    Attributes:
        plans: one :class:`~flora_core.policy.CompressionPlan` per leaf (None where
            the leaf is an ``optax.MaskedNode``).
        config: the rule's hyper-parameters the state was initialised with.
        treedef: the params' structure (``MaskedNode`` counted as a leaf).
    """

    plans: Plans
    config: Any
    treedef: Any

    def __post_init__(self) -> None:
        # jit hashes the static parts of its arguments on every call: hash once.
        object.__setattr__(self, "_hash", hash((self.plans, self.config, self.treedef)))

    def __hash__(self) -> int:
        return self._hash  # type: ignore[attr-defined,no-any-return]


def is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def shape_of(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def flatten(tree: Any) -> tuple[list[Any], Any]:
    """Leaves (``MaskedNode`` included) and the treedef of a params-like tree."""
    return jax.tree.flatten(tree, is_leaf=is_masked)


def static_value(value: Any) -> Any:
    """A hyper-parameter as a Python value, or INJECTED if it is a traced array."""
    if isinstance(value, jax.core.Tracer):
        return INJECTED
    if isinstance(value, jax.Array | np.ndarray | np.generic) and np.ndim(value) == 0:
        host = np.asarray(value)
        kind = host.dtype.kind
        if kind in "iu":
            return int(host)
        if kind == "f":
            return float(host)
        if kind == "b":
            return bool(host)
    return value


def known_hyperparameters(config_cls: type, **hyper: Any) -> dict[str, Any]:
    """The hyper-parameters that are not traced, validated now by ``config_cls``."""
    known = {k: static_value(v) for k, v in hyper.items()}
    known = {k: v for k, v in known.items() if v is not INJECTED}
    config_cls(**known)  # raises, naming the bad value
    return known


def config_for(config_cls: type, known: dict[str, Any], initial: Any, n: int) -> Any:
    """The config a step uses: the transformation's values, else the state's."""
    if initial is None or len(known) == n:
        return config_cls(**known)
    return dataclasses.replace(initial, **known)


def check_learning_rate(learning_rate: Any, *, optional: bool = False) -> None:
    if learning_rate is None and optional:
        return
    if callable(learning_rate):
        return
    value = static_value(learning_rate)
    if value is INJECTED:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"Invalid learning rate: {learning_rate!r} (expected a float >= 0, a "
            "scalar array or a schedule count -> lr)"
        )
    check_lr(value)


def learning_rate_at(learning_rate: Any, count: jax.Array) -> Any:
    if learning_rate is None:
        return 1.0
    return learning_rate(count) if callable(learning_rate) else learning_rate


def require_static(name: str, known: dict[str, Any], hyper: dict[str, Any],
                   structure: Structure) -> None:  # fmt: skip
    """Raise, naming them, if hyper-parameters needed at init arrived traced."""
    traced = [k for k in hyper if k not in known]
    traced += [k for k in ("rank", "seed") if getattr(structure, k) is INJECTED]
    if traced:
        raise ValueError(
            f"{name}.init got traced hyper-parameters {traced} (optax.inject_hyperparams "
            "inside jax.jit?): call init outside jit, or list them in "
            "inject_hyperparams(..., static_args=...)"
        )


@dataclass(frozen=True)
class Structure:
    """What decides the plans: rank, seed, projection, axis, param_indices."""

    rank: Any
    seed: Any
    projection: str
    axis: int | None
    param_indices: Any

    @classmethod
    def checked(cls, rank: Any, seed: Any, projection: Any, axis: Any,
                param_indices: Any) -> Structure:  # fmt: skip
        rank, seed = static_value(rank), static_value(seed)
        if rank is not INJECTED:
            policy.check_rank(rank)
        if seed is not INJECTED:
            seed = check_seed(seed)
        policy.check_distribution(projection)
        if axis is not None and (isinstance(axis, bool) or axis not in (0, 1, -1)):
            raise ValueError(f"Invalid axis: {axis!r} (expected 0, 1, -1 or None)")
        if isinstance(param_indices, list | tuple) and all(
            isinstance(i, int) for i in param_indices
        ):
            _check_index_list(param_indices)
        return cls(rank, seed, projection, axis, param_indices)

    @property
    def known(self) -> bool:
        return self.rank is not INJECTED and self.seed is not INJECTED

    def plans(self, tree: Any) -> tuple[Plans, Any]:
        """The plan of every leaf of ``tree`` (None for a MaskedNode), and its treedef."""
        leaves, treedef = flatten(tree)
        indices = _indices(self.param_indices, leaves, treedef)
        plans = tuple(
            None
            if is_masked(leaf)
            else policy.plan(
                shape_of(leaf),
                index,
                rank=self.rank,
                seed=self.seed,
                axis=self.axis,
                distribution=self.projection,
            )  # fmt: skip
            for leaf, index in zip(leaves, indices, strict=True)
        )
        policy.check_unique_streams([p for p in plans if p is not None])
        return plans, treedef


def _check_index_list(indices: Sequence[Any]) -> list[int]:
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int | np.integer):
            raise TypeError(f"Invalid param index: {i!r} (expected an int)")
        if not 0 <= int(i) <= policy.MAX_PARAM_INDEX:
            raise ValueError(
                f"Invalid param index: {i} (expected 0..{policy.MAX_PARAM_INDEX})"
            )
    seen: dict[int, int] = {}
    for position, i in enumerate(int(i) for i in indices):
        if i in seen:
            raise ValueError(
                f"Duplicate param index {i} (leaves {seen[i]} and {position}); "
                "param_indices must be unique"
            )
        seen[i] = position
    return [int(i) for i in indices]


def _indices(param_indices: Any, leaves: list[Any], treedef: Any) -> list[int]:
    if param_indices is None:
        return list(range(len(leaves)))
    if isinstance(param_indices, list | tuple) and len(param_indices) == len(leaves):
        flat = list(param_indices)
    else:
        try:
            flat = treedef.flatten_up_to(param_indices)
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"param_indices must be a list with one int per leaf ({len(leaves)}) "
                f"or a pytree shaped like the params: {error}"
            ) from None
    kept = [i for i, leaf in zip(flat, leaves, strict=True) if not is_masked(leaf)]
    _check_index_list(kept)
    return [
        0 if is_masked(leaf) else int(i) for i, leaf in zip(flat, leaves, strict=True)
    ]


def checked_plans(
    spec: FloraSpec, structure: Structure, updates: Any
) -> tuple[Plans, Any]:
    """The state's plans, checked against this transformation and these updates."""
    leaves, treedef = flatten(updates)
    if len(leaves) != len(spec.plans):
        raise ValueError(
            f"The updates have {len(leaves)} leaves but the state was initialised "
            f"for {len(spec.plans)}"
        )
    if structure.known:
        plans, _ = structure.plans(updates)
        for i, (mine, saved) in enumerate(zip(plans, spec.plans, strict=True)):
            if mine != saved:
                raise ValueError(
                    f"Leaf {i}: this transformation plans {mine}, but the state was "
                    f"initialised with {saved} (rank, seed, axis, projection or "
                    "param_indices differ)"
                )
    for i, (leaf, plan) in enumerate(zip(leaves, spec.plans, strict=True)):
        if plan is not None and shape_of(leaf) != plan.shape:
            raise ValueError(
                f"Leaf {i} has shape {shape_of(leaf)}, the state expects {plan.shape}"
            )
    return spec.plans, treedef


def check_param(param: Any) -> None:
    check_gradient(param if hasattr(param, "dtype") else jnp.asarray(param), xp=jnp,
                   name="parameter")  # fmt: skip


def leaf_mask(mask: Any, params: Any, treedef: Any, n: int) -> list[bool]:
    """A weight-decay mask (None, a pytree of bools, or a callable) per leaf."""
    if mask is None:
        return [True] * n
    tree = mask(params) if callable(mask) else mask
    return [True if is_masked(m) else bool(m) for m in treedef.flatten_up_to(tree)]


def zeros_placed(
    shape: tuple[int, ...], dtype: Any, param: Any, sharding: Any = None
) -> jax.Array:
    """Zeros, placed like the param when it is a committed array of the same shape
    (as ``jnp.zeros_like`` would; an uncommitted state keeps jit's cache at one
    entry when the params are uncommitted), or with ``sharding`` when given."""
    placed = (
        isinstance(param, jax.Array)
        and not isinstance(param, jax.core.Tracer)
        and param.committed
        and param.shape == shape
    )
    if placed:
        sharding = param.sharding
    return jnp.zeros(shape, dtype, device=sharding)


def derived_sharding(
    field: str, shape: tuple[int, ...], plan: policy.CompressionPlan, param: Any
) -> Any:
    """The sharding of a state field whose shape is not the param's (DESIGN §8).

    For a committed 2-D param under ``NamedSharding(mesh, P(s0, s1))``: a compressed
    ``mu``/``acc`` keeps the uncompressed axis, ``(n, r)`` -> ``P(s0, None)`` and
    ``(r, m)`` -> ``P(None, s1)``; a factored ``nu_row``/``nu_col`` keeps the axis of
    its length (``nu_row`` axis 0 when both match, as both rules factor that way).
    None otherwise (the state is then placed by jit).
    """
    from jax.sharding import NamedSharding, PartitionSpec

    sharding = getattr(param, "sharding", None)
    if (
        not isinstance(sharding, NamedSharding)
        or isinstance(param, jax.core.Tracer)
        or not param.committed
        or param.ndim != 2
    ):
        return None
    spec = tuple(sharding.spec) + (None,) * (2 - len(sharding.spec))
    n, m = param.shape
    if field in ("mu", "acc") and plan.compressed and len(shape) == 2:
        kept = (
            PartitionSpec(spec[0], None)
            if plan.axis == 1
            else PartitionSpec(None, spec[1])
        )
        return NamedSharding(sharding.mesh, kept)
    if field in ("nu_row", "nu_col") and len(shape) == 1:
        axis = 0 if (shape[0] == n and (field == "nu_row" or n != m)) else 1
        return NamedSharding(sharding.mesh, PartitionSpec(spec[axis]))
    return None


def compressed_zeros(
    field: str,
    shape_of_plan: Callable[[policy.CompressionPlan], tuple[int, ...]],
    params: Any,
    plans: list[Any],
    treedef: Any,
) -> Any:
    """A pytree of float32 zero states ``field`` (MaskedNode where a leaf has no plan),
    each shaped by ``shape_of_plan`` and placed like its parameter."""
    leaves = []
    for leaf, plan in zip(treedef.flatten_up_to(params), plans, strict=True):
        if plan is None:
            leaves.append(optax.MaskedNode())
            continue
        check_param(leaf)
        shape = shape_of_plan(plan)
        placement = derived_sharding(field, shape, plan, leaf)
        leaves.append(zeros_placed(shape, jnp.float32, leaf, placement))
    return treedef.unflatten(leaves)


def core_init(init: Callable[..., dict], plan: policy.CompressionPlan, config: Any,
              param: Any) -> dict[str, Any]:  # fmt: skip
    """The core's zero state of one leaf without ``count`` (the transformation keeps
    one shared count); fields are placed like the param (see ``derived_sharding``)."""
    shapes = jax.eval_shape(lambda: init(plan, config, xp=jnp))
    return {
        k: zeros_placed(
            tuple(s.shape),
            s.dtype,
            param,
            derived_sharding(k, tuple(s.shape), plan, param),
        )
        for k, s in shapes.items()
        if k != "count"
    }
