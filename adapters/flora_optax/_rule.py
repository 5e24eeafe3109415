"""One builder for the transformations that run a ``flora_core.rules`` rule per leaf.

The per-leaf math is the core's (``flora_adam`` / ``flora_adafactor`` with
``xp=jax.numpy``); this module maps it over the pytree, keeps one shared ``count``,
resolves the learning rate (float, array or schedule) and casts each update to its
parameter's dtype (state stays float32).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from flora_core import rules
from flora_optax import _common
from flora_optax._common import FloraSpec

FIELDS = ("mu", "nu", "nu_row", "nu_col")


class FloraAdamState(NamedTuple):
    """State of :func:`flora_optax.flora_adam` (docs/spec.md §5 names).

    Attributes:
        count: int32 scalar, updates applied so far.
        mu: per leaf, the compressed first moment (``k x r`` or ``r x k``), or the
            full one where the leaf is not compressed.
        nu: per leaf, the second moment (None where factored).
        nu_row, nu_col: per leaf, the factored second moment (None where not).
        spec: static (no leaves): the settings, and the plans derived from them
            (NOTE [static spec] in ``flora_optax._common``).
    """

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    nu_row: optax.Updates
    nu_col: optax.Updates
    spec: FloraSpec


class FloraAdafactorState(NamedTuple):
    """State of :func:`flora_optax.flora_adafactor` (docs/spec.md §5 names).

    Attributes:
        count: int32 scalar, updates applied so far.
        mu: per leaf, the compressed momentum (None when ``momentum=None``).
        nu: per leaf, the unfactored second moment (None where factored).
        nu_row, nu_col: per leaf, the factored second moment (None where not).
        spec: static (no leaves): the settings, and the plans derived from them
            (NOTE [static spec] in ``flora_optax._common``).
    """

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    nu_row: optax.Updates
    nu_col: optax.Updates
    spec: FloraSpec


@dataclass(frozen=True)
class Rule:
    """A core rule and what the adapter needs to know about it."""

    name: str
    state_cls: type
    init: Callable[..., dict]
    update: Callable[..., tuple[Any, dict]]
    config_cls: type
    undecayed: Callable[[Any], Any]
    needs_param: Callable[[Any], bool]
    # Hyper-parameters flora_core's math takes as (traced) arrays; the others are
    # recorded in the state (NOTE [injected hyper-parameters] in _common).
    traceable: frozenset[str]


ADAM = Rule(
    "flora_adam", FloraAdamState, rules.flora_adam_init, rules.flora_adam,
    rules.AdamConfig, lambda c: _common.replaced(c, weight_decay=0.0),
    lambda c: bool(c.weight_decay), frozenset({"eps", "kappa"}),
)  # fmt: skip
ADAFACTOR = Rule(
    "flora_adafactor", FloraAdafactorState, rules.flora_adafactor_init,
    rules.flora_adafactor, rules.AdafactorConfig,
    lambda c: _common.replaced(c, weight_decay_rate=None),
    lambda c: c.multiply_by_parameter_scale or c.weight_decay_rate is not None,
    frozenset({"momentum", "decay_rate", "decay_offset", "clipping_threshold",
               "weight_decay_rate", "eps", "kappa"}),
)  # fmt: skip


def transformation(
    rule: Rule,
    learning_rate: Any,
    hyper: dict[str, Any],
    structure: _common.Structure,
    decay_mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """The optax transformation running ``rule`` on every leaf (see module doc)."""
    known = _common.known_hyperparameters(rule.config_cls, **hyper)

    def init_fn(params: optax.Params) -> Any:
        _common.require_static(rule.name, hyper, structure)
        # Traced hyper-parameters take valid defaults here: only shapes matter.
        config = rule.config_cls(**known)
        plans, treedef = structure.plans(params)
        fields: dict[str, list[Any]] = {f: [] for f in FIELDS}
        for leaf, plan in zip(treedef.flatten_up_to(params), plans, strict=True):
            if plan is None:
                state = dict.fromkeys(FIELDS, optax.MaskedNode())
            else:
                _common.check_param(leaf)
                state = _common.core_init(rule.init, plan, config, leaf)
            for f in FIELDS:
                fields[f].append(state.get(f))
        extra = _common.recorded_hyperparameters(hyper, rule.traceable)
        return rule.state_cls(
            count=jnp.zeros([], jnp.int32),
            **{f: treedef.unflatten(v) for f, v in fields.items()},
            spec=structure.spec(
                plans, treedef, extra, _common.carried_hyperparameters(hyper)
            ),
        )

    def update_fn(
        updates: optax.Updates, state: Any, params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, Any]:  # fmt: skip
        del extra_args
        plans, treedef = _common.update_plans(
            state.spec, structure, updates, rule.name, hyper, rule.traceable
        )
        config = _common.step_config(
            rule.name, rule.config_cls, hyper, rule.traceable, state.spec
        )
        undecayed = rule.undecayed(config)
        n = len(plans)
        grads = treedef.flatten_up_to(updates)
        param_leaves = [None] * n if params is None else treedef.flatten_up_to(params)
        decay = _common.leaf_mask(
            decay_mask, updates if params is None else params, treedef, n
        )
        old = {f: treedef.flatten_up_to(getattr(state, f)) for f in FIELDS}
        lr = _common.learning_rate_at(learning_rate, state.count)
        out, new = [], {f: [] for f in FIELDS}
        for i, (grad, plan) in enumerate(zip(grads, plans, strict=True)):
            if plan is None:
                out.append(grad)
                for f in FIELDS:
                    new[f].append(old[f][i])
                continue
            leaf_config = config if decay[i] else undecayed
            param = param_leaves[i]
            if param is None and rule.needs_param(leaf_config):
                raise ValueError(
                    f"{rule.name} with weight decay or parameter scaling needs the "
                    "params: call update(updates, state, params)"
                )
            leaf_state = {f: old[f][i] for f in FIELDS if old[f][i] is not None}
            update, leaf_state = rule.update(
                grad, {"count": state.count, **leaf_state},
                grad if param is None else param,
                plan=plan, config=leaf_config, lr=lr, xp=jnp,
            )  # fmt: skip
            out.append(update.astype((grad if param is None else param).dtype))
            for f in FIELDS:
                new[f].append(leaf_state.get(f))
        return treedef.unflatten(out), rule.state_cls(
            count=state.count + 1,
            **{f: treedef.unflatten(v) for f, v in new.items()},
            spec=_common.FloraSpec(
                state.spec.settings, plans, treedef, state.spec.hyperparameters
            ),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
