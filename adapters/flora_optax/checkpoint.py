"""Portable checkpoints of Flora optimizer states (docs/spec.md §5) via ``flora_core.state``.

:func:`export_state` turns any optax state that holds Flora states (bare, or inside
``chain``, ``masked``, ``multi_transform``, ``inject_hyperparams``, ``MultiSteps``,
:func:`flora_multi_steps`) into the flat, framework-free form of format 2 (the
arrays, the plans' metadata, a header and a checksum), which loads into
``flora_torch`` and ``flora_keras`` too, and with ``path=`` writes it atomically
(``.npz`` / ``.safetensors``); :func:`import_state` puts such a dict, or a file read
bounded by the template's layout, back into a state of the same transformation.
Everything that is not a Flora state (schedules' counts, other transformations'
states) is left to the host's own checkpointing.

The header is made from what the state records (``FloraSpec``): each
parameter's rule (``"adam"``, ``"adafactor"``, ``"momentum"``, or
``"accumulation"`` for :func:`flora_multi_steps` around another optimizer), its
hyper-parameters (a value traced at init is taken from an enclosing
``inject_hyperparams`` state), τ from :func:`flora_multi_steps` (1 without it), and
the leaf's tree path (``jax.tree_util.keystr``) as its name. Import refuses, naming
the field and both values, what the template would misread (docs/spec.md §5.6).

NOTE [orbax and the seed]: the plans (seed, rank, axis, projection) are static, in
the state's ``FloraSpec``, not arrays: orbax (or any checkpointer of the leaves)
saves and restores only the arrays, so a restore into a template built with another
seed takes the template's spec, and nothing in orbax's file could tell. For a
checkpoint that carries and checks the plans, use ``export_state(state, path=...)``
and ``import_state(path, template)``, which refuse another seed by name.

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

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flora_core import policy, state_files
from flora_core import state as portable
from flora_optax import _common
from flora_optax._rule import FIELDS, FloraAdafactorState, FloraAdamState
from flora_optax.accumulation import FloraMultiStepsState
from flora_optax.momentum import FloraMomentumState

STATES = (FloraAdamState, FloraAdafactorState, FloraMomentumState, FloraMultiStepsState)
KINDS = {FloraAdamState: "adam", FloraAdafactorState: "adafactor",
         FloraMomentumState: "momentum"}  # fmt: skip
INJECTED_STATES = tuple(
    getattr(optax, name)
    for name in ("InjectHyperparamsState", "InjectStatefulHyperparamsState")
    if hasattr(optax, name)
)
NOT_HYPERPARAMETERS = (*_common.STRUCTURE_FIELDS, "every_k_schedule")
Source = Mapping[str, Any] | str | os.PathLike[str]


@dataclass
class _Entry:
    """One parameter of the portable state: its plan, fields and header entries."""

    plan: policy.CompressionPlan
    values: dict[str, Any]
    name: str
    kind: str = "accumulation"
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    tau: int = 1


Entries = dict[int, _Entry]


def _is_flora(x: Any) -> bool:
    return isinstance(x, STATES)


def _is_node(x: Any) -> bool:
    return _is_flora(x) or isinstance(x, INJECTED_STATES)


def _walk(tree: Any, injected: Mapping[str, Any]) -> Iterator[tuple[Any, Mapping]]:
    """Every Flora state in ``tree``, with the hyper-parameters of the
    ``inject_hyperparams`` states around it."""
    for node in jax.tree.leaves(tree, is_leaf=_is_node):
        if isinstance(node, INJECTED_STATES):
            values = {k: _common.static_value(v) for k, v in node.hyperparams.items()}
            yield from _walk(node.inner_state, {**injected, **values})
        elif _is_flora(node):
            yield node, injected
            if isinstance(node, FloraMultiStepsState):
                yield from _walk(node.inner_state, injected)


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


def _names(treedef: Any) -> list[str]:
    """The tree path of every leaf of ``treedef`` (``jax.tree_util.keystr``)."""
    paths = jax.tree_util.tree_flatten_with_path(
        treedef.unflatten(range(treedef.num_leaves))
    )[0]
    return [jax.tree_util.keystr(path) for path, _ in paths]


def _hyperparameters(state: Any, injected: Mapping[str, Any]) -> dict[str, Any]:
    """The rule's hyper-parameters the state records (traced at init: the enclosing
    ``inject_hyperparams``' current value; unknown ones are left out)."""
    out = {}
    for key, value in (*state.spec.settings, *state.spec.hyperparameters):
        if key in NOT_HYPERPARAMETERS:
            continue
        if value is _common.INJECTED:
            value = injected.get(key, value)
        if value is not _common.INJECTED:
            out[key] = value
    return out


def _tau(state: FloraMultiStepsState) -> int:
    k = dict(state.spec.hyperparameters).get("every_k_schedule", _common.INJECTED)
    if callable(k):  # the cycle in progress
        k = k(state.count)
    if k is _common.INJECTED:
        raise ValueError("This flora_multi_steps state does not record its k")
    return int(k)


def _entries(opt_state: Any, params: Any = None) -> Entries:
    entries: Entries = {}
    for state, injected in _walk(opt_state, {}):
        scalars, trees = _fields(state)
        state_plans, treedef = _layout(state, trees, params)
        leaves = {f: treedef.flatten_up_to(t) for f, t in trees.items()}
        names = _names(treedef)
        for i, plan in enumerate(state_plans):
            if plan is None:
                continue
            values = dict(scalars)
            values.update({f: v[i] for f, v in leaves.items() if v[i] is not None})
            entry = entries.setdefault(plan.param_index, _Entry(plan, {}, names[i]))
            if entry.plan != plan:
                raise ValueError(
                    f"Parameter {plan.param_index} has two plans ({entry.plan} and "
                    f"{plan}); the portable state holds one plan per parameter"
                )
            for name, value in values.items():
                entry.values.setdefault(name, value)
            if isinstance(state, FloraMultiStepsState):
                entry.tau = _tau(state)
            else:
                entry.kind = KINDS[type(state)]
                entry.hyperparameters = _hyperparameters(state, injected)
    return entries


def _ordered(opt_state: Any, params: Any) -> list[_Entry]:
    entries = _entries(opt_state, params)
    if not entries:
        raise ValueError("The optimizer state holds no Flora state")
    return [entries[i] for i in sorted(entries)]


def _header(ordered: list[_Entry]) -> portable.Header:
    return portable.Header(
        tuple(e.kind for e in ordered),
        tuple(e.hyperparameters for e in ordered),
        tuple(e.tau for e in ordered),
        tuple(e.name for e in ordered),
        "optax",
    )


def plans(opt_state: Any, params: Any = None) -> list[policy.CompressionPlan]:
    """The plans (seed, stream, rank, axis, distribution per parameter) of every
    Flora state inside ``opt_state``, by ``param_index``. ``params`` is needed only
    for a state whose spec carries no plans (one made by ``optax.tree.map_params``,
    before its next update)."""
    entries = _entries(opt_state, params)
    return [entries[i].plan for i in sorted(entries)]


def state_header(opt_state: Any, params: Any = None) -> portable.Header:
    """What gives the Flora states inside ``opt_state`` their meaning (docs/spec.md
    §5.3): each parameter's rule, hyper-parameters, τ and tree path."""
    return _header(_ordered(opt_state, params))


def export_state(
    opt_state: Any, params: Any = None, *, path: str | os.PathLike[str] | None = None
) -> dict[str, np.ndarray]:
    """The portable flat form (format 2) of the Flora states inside ``opt_state``
    (see module), also written to ``path`` (``.npz`` / ``.safetensors``, atomically)
    when given; ``params`` as in :func:`plans`."""
    ordered = _ordered(opt_state, params)
    flat = portable.export_state(
        [e.plan for e in ordered], [e.values for e in ordered], _header(ordered)
    )
    if path is not None:
        state_files.save_state(flat, path)
    return flat


def import_state(source: Source, opt_state: Any, params: Any = None) -> Any:
    """``opt_state`` (a template, e.g. ``tx.init(params)``) with its Flora states
    replaced by those of ``source``: a flat mapping or a ``.npz`` / ``.safetensors``
    path (read bounded by the template's layout). Arrays keep the template's dtype
    and sharding. ``params`` as in :func:`plans`.

    Raises:
        ValueError: naming the field, the file's value and the template's
            (docs/spec.md §5.6): the format or checksum, the rule or a
            hyper-parameter that changes the state's meaning (kappa, betas,
            factored...), τ (``micro_step`` not below :func:`flora_multi_steps`' k,
            or a partial cycle into a state without accumulation), the number of
            parameters, a parameter's tree path, shape, rank, axis, seed or
            distribution, a counter out of range, a non-finite or negative
            statistic, a missing field.
    """
    ordered = _ordered(opt_state, params)
    plans = [e.plan for e in ordered]
    if isinstance(source, str | os.PathLike):
        shapes = [
            {k: tuple(np.shape(v)) for k, v in e.values.items()
             if k not in portable.COUNTERS}
            for e in ordered
        ]  # fmt: skip
        source = state_files.load_state(source, like=portable.layout_for(plans, shapes))
    loaded = portable.import_state(source, plans, _header(ordered))
    by_index = {p.param_index: s for p, s in zip(plans, loaded, strict=True)}
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
