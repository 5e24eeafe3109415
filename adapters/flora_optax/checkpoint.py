"""Portable checkpoints of Flora optimizer states (DESIGN §5) via ``flora_core.state``.

:func:`export_state` turns any optax state that holds Flora states (bare, or inside
``chain``, ``masked``, ``multi_transform``, ``inject_hyperparams``, ``MultiSteps``,
:func:`flora_multi_steps`) into the flat, framework-free form (``param.{i}.{field}``
plus the metadata of every plan), which loads into ``flora_torch`` and
``flora_keras`` too; :func:`import_state` puts such a dict back into a state of the
same transformation. Everything that is not a Flora state (schedules' counts,
other transformations' states) is left to the host's own checkpointing.

Example:
    >>> import jax.numpy as jnp, numpy as np, flora_optax
    >>> params = {"w": jnp.ones((64, 48))}
    >>> tx = flora_optax.flora_adam(1e-3, rank=8)
    >>> state = tx.init(params)
    >>> flat = flora_optax.export_state(state)
    >>> flat["param.0.mu"].shape, int(flat["param.0.rank"])
    ((64, 8), 8)
    >>> state = flora_optax.import_state(flat, tx.init(params))
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flora_core import policy
from flora_core import state as portable
from flora_optax import _common
from flora_optax._rule import FIELDS, FloraAdafactorState, FloraAdamState
from flora_optax.accumulation import FloraMultiStepsState
from flora_optax.momentum import FloraMomentumState

STATES = (FloraAdamState, FloraAdafactorState, FloraMomentumState, FloraMultiStepsState)
Entries = dict[int, tuple[policy.CompressionPlan, dict[str, Any]]]


def _is_flora(x: Any) -> bool:
    return isinstance(x, STATES)


def _walk(tree: Any) -> Iterator[Any]:
    for node in jax.tree.leaves(tree, is_leaf=_is_flora):
        if _is_flora(node):
            yield node
            if isinstance(node, FloraMultiStepsState):
                yield from _walk(node.inner_state)


def _fields(state: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(shared scalars, per-leaf trees) of one Flora state, by portable name."""
    if isinstance(state, FloraMultiStepsState):
        return {"count": state.count, "micro_step": state.micro_step}, {
            "acc": state.acc
        }
    trees = {f: getattr(state, f) for f in FIELDS if hasattr(state, f)}
    return {"count": state.count}, trees


def _layout(state: Any, trees: dict[str, Any], params: Any) -> tuple[Any, Any]:
    """``(plans, treedef)`` of one Flora state: the ones its spec carries, else
    re-derived from its settings and ``params`` (NOTE [static spec])."""
    spec = state.spec
    if spec.plans is not None or params is None:
        return spec.known_plans(), spec.treedef
    leaves, treedef = _common.flatten(params)
    markers = treedef.flatten_up_to(next(iter(trees.values())))
    shapes = treedef.unflatten(
        [m if _common.is_masked(m) else p for m, p in zip(markers, leaves, strict=True)]
    )
    return spec.structure().plans(shapes)


def _entries(opt_state: Any, params: Any = None) -> Entries:
    entries: Entries = {}
    for state in _walk(opt_state):
        scalars, trees = _fields(state)
        state_plans, treedef = _layout(state, trees, params)
        leaves = {f: treedef.flatten_up_to(t) for f, t in trees.items()}
        for i, plan in enumerate(state_plans):
            if plan is None:
                continue
            values = dict(scalars)
            values.update({f: v[i] for f, v in leaves.items() if v[i] is not None})
            if plan.param_index in entries:
                known, merged = entries[plan.param_index]
                if known != plan:
                    raise ValueError(
                        f"Parameter {plan.param_index} has two plans ({known} and "
                        f"{plan}); the portable state holds one plan per parameter"
                    )
                for name, value in values.items():
                    merged.setdefault(name, value)
            else:
                entries[plan.param_index] = (plan, values)
    return entries


def plans(opt_state: Any, params: Any = None) -> list[policy.CompressionPlan]:
    """The plans (seed, stream, rank, axis, distribution per parameter) of every
    Flora state inside ``opt_state``, by ``param_index``. ``params`` is needed only
    for a state whose spec carries no plans (one made by ``optax.tree.map_params``,
    before its next update)."""
    entries = _entries(opt_state, params)
    return [entries[i][0] for i in sorted(entries)]


def export_state(opt_state: Any, params: Any = None) -> dict[str, np.ndarray]:
    """The portable flat form of the Flora states inside ``opt_state`` (see module);
    ``params`` as in :func:`plans`."""
    entries = _entries(opt_state, params)
    if not entries:
        raise ValueError("The optimizer state holds no Flora state to export")
    ordered = [entries[i] for i in sorted(entries)]
    return portable.export_state([p for p, _ in ordered], [v for _, v in ordered])


def import_state(flat: Mapping[str, Any], opt_state: Any, params: Any = None) -> Any:
    """``opt_state`` (a template, e.g. ``tx.init(params)``) with its Flora states
    replaced by those of ``flat``; arrays keep the template's dtype and sharding.
    ``params`` as in :func:`plans`.

    Raises:
        ValueError: naming what differs (format version, number of parameters, a
            parameter's shape, rank, axis, seed or distribution, a missing field).
    """
    ordered = plans(opt_state, params)
    loaded = portable.import_state(flat, ordered)
    by_index = {p.param_index: s for p, s in zip(ordered, loaded, strict=True)}
    return _restore(opt_state, by_index, params)


def _restore(tree: Any, by_index: dict[int, dict[str, np.ndarray]],
             params: Any) -> Any:  # fmt: skip
    def restore(node: Any) -> Any:
        if not _is_flora(node):
            return node
        scalars, trees = _fields(node)
        plans, treedef = _layout(node, trees, params)
        indices = [p.param_index for p in plans if p is not None]
        changes = {
            name: _scalar(name, value, [by_index[i] for i in indices])
            for name, value in scalars.items()
        }
        for name, template in trees.items():
            slots = treedef.flatten_up_to(template)
            changes[name] = treedef.unflatten(
                [
                    slot if plan is None or slot is None
                    else _array(name, plan, slot, by_index[plan.param_index])
                    for plan, slot in zip(plans, slots, strict=True)
                ]
            )  # fmt: skip
        if isinstance(node, FloraMultiStepsState):
            changes["inner_state"] = _restore(node.inner_state, by_index, params)
        return node._replace(**changes)

    return jax.tree.map(restore, tree, is_leaf=_is_flora)


def _scalar(name: str, template: Any, states: list[dict[str, np.ndarray]]) -> Any:
    values = {int(s[name]) for s in states if name in s}
    if len(values) > 1:
        raise ValueError(
            f"The parameters' {name} differ ({sorted(values)}); expected one"
        )
    if not values:
        return template
    return _placed(np.asarray(values.pop(), template.dtype), template)


def _array(name: str, plan: Any, template: Any, state: dict[str, np.ndarray]) -> Any:
    if name not in state:
        raise ValueError(f"Parameter {plan.param_index}: the state has no {name!r}")
    value = np.asarray(state[name])
    if value.shape != tuple(template.shape):
        raise ValueError(
            f"Parameter {plan.param_index}: saved {name} has shape {value.shape}, "
            f"expected {tuple(template.shape)}"
        )
    return _placed(value.astype(template.dtype), template)


def _placed(value: np.ndarray, template: jax.Array) -> jax.Array:
    """On the template's sharding if it is committed (else uncommitted, like it)."""
    if template.committed:
        return jax.device_put(value, template.sharding)
    return jnp.asarray(value)
