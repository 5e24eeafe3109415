"""Plumbing shared by the Flora transformations: leaves, plans, the static spec and
hyper-parameter handling. No optimizer math lives here (that is ``flora_core``).

Leaves are taken in ``jax.tree_util`` flatten order with ``optax.MaskedNode`` counted
as a leaf, so under ``optax.masked`` / ``optax.multi_transform`` a parameter keeps its
position in the full tree (hence its RNG stream).
"""

from __future__ import annotations

import copy
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


# NOTE [static spec]: a Flora state's static part compares by the transformation's
# settings alone, never by the params. ``optax.tree.map_params`` (what maps a state
# onto the params' shardings) initialises the transformation with a placeholder that
# has no leaves and no shapes, and requires the result to have the real state's
# pytree structure; a spec holding the params' plans could never match it. The plans
# and treedef a spec carries are derived from its settings and the params' shapes:
# ``update`` re-derives them from the updates (never reads them), so a state whose
# spec carries none (the placeholder's) trains the same, and they serve export,
# import and ``flora_optax.plans``. Every place that compares a spec also sees the
# shapes (jit keys on the updates' and state's avals), so leaving the plans out of the
# comparison loses nothing. One caveat: a jitted function of a state alone, called on
# states of two param trees whose states have equal avals (e.g. factored
# ``(16, 4, 3, 3)`` and ``(16, 36)``), reuses the first trace's spec; import then
# refuses the export of the second (shape mismatch) rather than misreading it.


@jax.tree_util.register_static
@dataclass(frozen=True, eq=False)
class FloraSpec:
    """Static part of a Flora state: no leaves, compared by ``settings`` only.

    Attributes:
        settings: ``((name, value), ...)``: what fixes the plans (rank, seed,
            projection, axis, param_indices) and the hyper-parameters flora_core
            needs as Python numbers (kept for ``optax.inject_hyperparams``, NOTE
            [injected hyper-parameters]); ``INJECTED`` where a value arrived traced
            at init.
        plans: one :class:`~flora_core.policy.CompressionPlan` per leaf (None where
            the leaf is an ``optax.MaskedNode``), or None when unknown (a traced
            seed at init). Carried, not compared (NOTE [static spec]).
        treedef: the params' structure (``MaskedNode`` counted as a leaf), or None
            with the plans. Carried, not compared.
        hyperparameters: ``((name, value), ...)``: every hyper-parameter as init
            saw it (``INJECTED`` where traced; flora_multi_steps: its
            ``every_k_schedule``), for the portable header. Carried, not compared:
            a state initialised with traced values has the structure of one
            initialised with concrete ones, as optax's contract asks.
    """

    settings: tuple[tuple[str, Any], ...]
    plans: Plans | None = None
    treedef: Any = None
    hyperparameters: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        # jit hashes the static parts of its arguments on every call: hash once.
        object.__setattr__(self, "_hash", hash(self.settings))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FloraSpec):
            return NotImplemented
        return self.settings == other.settings

    def __hash__(self) -> int:
        return self._hash  # type: ignore[attr-defined,no-any-return]

    def setting(self, name: str) -> Any:
        return dict(self.settings).get(name, INJECTED)

    def known_plans(self) -> Plans:
        """The carried plans (export, import, ``flora_optax.plans``)."""
        if self.plans is None:
            raise ValueError(
                "This Flora state does not carry its plans (it was made by "
                "optax.tree.map_params, or initialised with a traced seed): pass the "
                "params too, e.g. flora_optax.export_state(opt_state, params)"
            )
        return self.plans

    def structure(self) -> Structure:
        """The :class:`Structure` these settings record (for re-deriving plans)."""
        saved = {k: self.setting(k) for k in STRUCTURE_FIELDS}
        unknown = [k for k, v in saved.items() if v is INJECTED]
        if unknown:
            raise ValueError(
                f"This Flora state does not record {unknown} (initialised under "
                "jax.jit with them traced): list them in static_args"
            )
        saved["param_indices"] = _unhashable(saved["param_indices"])
        return Structure(**saved)


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


# NOTE [injected hyper-parameters]: under ``optax.inject_hyperparams`` every numeric
# argument reaches the transformation as an array, traced inside ``jax.jit``. init
# needs only what fixes the state's shapes (rank, axis, Adafactor's
# min_dim_size_to_factor: ``SHAPE_ARGS``), so ``jax.jit(tx.init)`` works. update
# passes a traced value into flora_core where the core's math takes arrays (each
# rule's ``traceable``: eps, kappa, Adafactor's decays, clipping and momentum, the
# EMA's b1), so injected values and schedules are followed. The others are needed as
# Python numbers: the seed keys the RNG (a uint64, which a JAX int32 cannot hold),
# and flora_core's FloraAdam takes ``log(b1)``, ``log(b2)`` for its bias corrections
# and branches on ``weight_decay``. For those the state records the value init saw
# (``FloraSpec.settings``), and a traced value at update falls back to it; when init
# saw it traced too (init under jit), update raises naming it: list it in
# ``static_args``. The spec also carries every hyper-parameter as init saw it
# (``FloraSpec.hyperparameters``, not compared), for the portable state's header.

SHAPE_ARGS = ("rank", "axis", "min_dim_size_to_factor")


def recorded(value: Any) -> Any:
    """A setting as the spec records it: floats rounded to float32, as
    ``inject_hyperparams`` hands them, so plain and injected states compare equal."""
    value = static_value(value)
    if isinstance(value, float):
        return float(np.float32(value))
    return value


def recorded_hyperparameters(hyper: dict[str, Any], traceable: frozenset[str]
                             ) -> tuple[tuple[str, Any], ...]:  # fmt: skip
    """The settings of the hyper-parameters the core needs as Python values."""
    return tuple((k, recorded(v)) for k, v in hyper.items() if k not in traceable)


def carried_hyperparameters(hyper: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """Every hyper-parameter as init saw it (``INJECTED`` where traced): what gives
    the state its meaning, for the portable header (``FloraSpec.hyperparameters``)."""
    return tuple((k, recorded(v)) for k, v in hyper.items())


def check_recorded(name: str, spec: FloraSpec, structure: Structure,
                   hyper: dict[str, Any], traceable: frozenset[str]) -> None:  # fmt: skip
    """Raise, naming all of them, if update needs a Python value that arrived traced
    and the state does not record it (NOTE [injected hyper-parameters])."""
    mine = dict(structure.settings())
    missing = [k for k in STRUCTURE_FIELDS if mine[k] is INJECTED]
    missing += [
        k for k, v in hyper.items()
        if k not in traceable and static_value(v) is INJECTED
    ]  # fmt: skip
    missing = [k for k in missing if spec.setting(k) is INJECTED]
    if missing:
        raise ValueError(
            f"{name}.update got traced hyper-parameters {missing} that flora_core "
            "needs as Python values, and the state does not record them (its init "
            "ran under jax.jit with them traced): list them in "
            "optax.inject_hyperparams(..., static_args=...)"
        )


def step_config(name: str, config_cls: type, hyper: dict[str, Any],
                traceable: frozenset[str], spec: FloraSpec) -> Any:  # fmt: skip
    """The config of one update: concrete values as given, traced ones passed to
    the core where ``traceable``, else the state's record (NOTE [injected
    hyper-parameters]; ``check_recorded`` has made sure it holds them)."""
    values = {}
    for key, value in hyper.items():
        static = static_value(value)
        if static is not INJECTED:
            values[key] = static
        elif key in traceable:
            values[key] = value
        else:
            values[key] = spec.setting(key)
    return with_arrays(config_cls, values)


def with_arrays(config_cls: type, values: dict[str, Any]) -> Any:
    """``config_cls(**values)`` where some values are traced arrays: the config
    validates the Python ones; traced ones replace (valid) defaults afterwards."""
    traced = {k: v for k, v in values.items() if isinstance(v, jax.core.Tracer)}
    config = config_cls(**{k: v for k, v in values.items() if k not in traced})
    return replaced(config, **traced)


def replaced(config: Any, **changes: Any) -> Any:
    """A copy of a frozen config with ``changes``, without re-validating (a traced
    field would fail the config's Python checks)."""
    if not changes:
        return config
    changed = copy.copy(config)
    for key, value in changes.items():
        object.__setattr__(changed, key, value)
    return changed


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


def require_static(name: str, hyper: dict[str, Any], structure: Structure) -> None:
    """Raise, naming them, if arguments that fix the state's shapes arrive traced."""
    traced = [k for k in ("rank", "axis") if getattr(structure, k) is INJECTED]
    traced += [
        k for k in SHAPE_ARGS if k in hyper and static_value(hyper[k]) is INJECTED
    ]
    if traced:
        raise ValueError(
            f"{name}.init got traced {traced}, which fix the state's shapes "
            "(optax.inject_hyperparams inside jax.jit?): list them in "
            "inject_hyperparams(..., static_args=...)"
        )


STRUCTURE_FIELDS = ("rank", "seed", "projection", "axis", "param_indices")


@dataclass(frozen=True)
class Structure:
    """What decides the plans: rank, seed, projection, axis, param_indices."""

    rank: Any
    seed: Any
    projection: str
    axis: Any
    param_indices: Any

    @classmethod
    def checked(cls, rank: Any, seed: Any, projection: Any, axis: Any,
                param_indices: Any) -> Structure:  # fmt: skip
        rank, seed, axis = static_value(rank), static_value(seed), static_value(axis)
        if rank is not INJECTED:
            policy.check_rank(rank)
        if seed is not INJECTED:
            seed = check_seed(seed)
        policy.check_distribution(projection)
        if (
            axis is not INJECTED
            and axis is not None
            and (isinstance(axis, bool) or axis not in (0, 1, -1))
        ):
            raise ValueError(f"Invalid axis: {axis!r} (expected 0, 1, -1 or None)")
        if isinstance(param_indices, list | tuple) and all(
            isinstance(i, int) for i in param_indices
        ):
            _check_index_list(param_indices)
        return cls(rank, seed, projection, axis, param_indices)

    def settings(self) -> tuple[tuple[str, Any], ...]:
        """The spec's record of this structure (hashable)."""
        return (
            ("rank", self.rank), ("seed", self.seed), ("projection", self.projection),
            ("axis", self.axis), ("param_indices", _hashable(self.param_indices)),
        )  # fmt: skip

    def resolved(self, spec: FloraSpec) -> Structure:
        """This structure with traced values taken from the state's record
        (``check_recorded`` has made sure it holds them); raises if a known value
        differs from the one the state was initialised with."""
        values = {}
        mine = dict(self.settings())
        for key in STRUCTURE_FIELDS:
            saved, value = spec.setting(key), mine[key]
            if value is INJECTED:
                value = saved
            elif saved is not INJECTED and saved != value:
                raise ValueError(
                    f"This transformation has {key}={value!r} but the state was "
                    f"initialised with {key}={saved!r} (rank, seed, axis, projection "
                    "or param_indices differ)"
                )
            values[key] = value
        values["param_indices"] = self.param_indices
        return Structure(**values)

    def plans(self, tree: Any) -> tuple[Plans, Any]:
        """The plan of every leaf of ``tree`` (None for a MaskedNode), and its treedef.

        With a traced seed (init under jit) the plans are drawn up with seed 0: their
        shapes are right, and the caller must not keep them.
        """
        leaves, treedef = flatten(tree)
        if not leaves:  # e.g. optax.tree.map_params's placeholder
            return (), treedef
        indices = _indices(self.param_indices, leaves, treedef)
        seed = 0 if self.seed is INJECTED else self.seed
        plans = tuple(
            None
            if is_masked(leaf)
            else policy.plan(
                shape_of(leaf),
                index,
                rank=self.rank,
                seed=seed,
                axis=self.axis,
                distribution=self.projection,
            )  # fmt: skip
            for leaf, index in zip(leaves, indices, strict=True)
        )
        policy.check_unique_streams([p for p in plans if p is not None])
        return plans, treedef

    def spec(self, plans: Plans, treedef: Any,
             extra: tuple[tuple[str, Any], ...] = (),
             hyperparameters: tuple[tuple[str, Any], ...] = ()) -> FloraSpec:  # fmt: skip
        """The spec of a state initialised with these plans: carried when the seed
        is known and there are leaves (``map_params``'s placeholder has none)."""
        if self.seed is INJECTED or not plans:
            return FloraSpec(self.settings() + extra, hyperparameters=hyperparameters)
        return FloraSpec(self.settings() + extra, plans, treedef, hyperparameters)


def _hashable(param_indices: Any) -> Any:
    """``param_indices`` as a hashable value (a list, or a pytree of ints)."""
    if param_indices is None:
        return None
    if isinstance(param_indices, list | tuple) and all(
        isinstance(i, int | np.integer) for i in param_indices
    ):
        return tuple(int(i) for i in param_indices)
    leaves, treedef = jax.tree.flatten(param_indices)
    return treedef, tuple(int(i) for i in leaves)


def _unhashable(saved: Any) -> Any:
    """The inverse of ``_hashable`` (a list, or the pytree of ints)."""
    if saved is None:
        return None
    if saved and isinstance(saved[0], jax.tree_util.PyTreeDef):
        return saved[0].unflatten(list(saved[1]))
    return list(saved)


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


def update_plans(spec: FloraSpec, structure: Structure, updates: Any, name: str,
                 hyper: dict[str, Any] | None = None,
                 traceable: frozenset[str] = frozenset()) -> tuple[Plans, Any]:  # fmt: skip
    """The plans of ``updates`` under this transformation and this state's settings,
    checked against the state's carried plans (NOTE [static spec])."""
    check_recorded(name, spec, structure, hyper or {}, traceable)
    plans, treedef = structure.resolved(spec).plans(updates)
    saved = spec.plans
    if saved is None:  # not carried (map_params's placeholder, a traced seed)
        return plans, treedef
    if len(plans) != len(saved):
        raise ValueError(
            f"The updates have {len(plans)} leaves but the state was initialised "
            f"for {len(saved)}"
        )
    for i, (mine, old) in enumerate(zip(plans, saved, strict=True)):
        if mine is not None and old is not None and mine.shape != old.shape:
            raise ValueError(
                f"Leaf {i} has shape {mine.shape}, the state expects {old.shape}"
            )
    return plans, treedef


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
    """The sharding of a state field whose shape is not the param's (docs/scale.md).

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
