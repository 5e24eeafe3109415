"""Checkpoints: torch ``state_dict`` loading, the portable npz form, DDP accumulators,
and whole-object copies (``copy.deepcopy``, ``pickle``, ``torch.save(optimizer)``).

``Optimizer.state_dict()`` already holds what the schema asks for (tensors and ints,
portable field names, plan metadata, torch's ``param_names``); this mixin makes
loading strict and dtype-preserving, and moves state to and from ``flora_core.state``.

NOTE [load hooks]: torch runs ``register_load_state_dict_pre_hook`` hooks first (they
may rewrite the state dict) and post hooks last (they see the loaded optimizer). The
checks and the float32 re-copy below are part of loading, so ``load_state_dict`` runs
the pre hooks itself before checking, lets the base class load with the hooks set
aside, and runs the post hooks after the re-copy.

NOTE [copies]: torch's ``Optimizer.__getstate__`` keeps only ``defaults``, ``state``
and ``param_groups``; a copy of a Flora optimizer would lose ``accumulation_steps``,
``layerwise``, ``max_grad_norm`` and the plans, and its ``step()`` would fail. So a
copy also keeps the attributes that each class lists in ``_copied_attrs`` (a test
checks that none is forgotten), and nothing else: not the backward hooks' handles,
which belong to the original parameters, nor what others set on the instance (an LR
scheduler's ``step`` wrapper calls the original optimizer). ``__setstate__`` hooks
the copy's own parameters again (``deepcopy`` and ``pickle`` copy the parameters
with the optimizer; a deep copy of ``(model, optimizer)`` shares them).
``load_state_dict`` also goes through ``__setstate__`` (with ``state`` and
``param_groups`` only) and keeps everything else.

NOTE [float32 state on load]: ``torch.optim.Optimizer.load_state_dict`` casts every
floating state tensor to its parameter's dtype. A bfloat16 parameter would then get
bfloat16 moments and lose the resume bits, so every tensor is re-copied from the
given state dict as float32 after the base class has loaded it.
"""

from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from collections.abc import Mapping
from itertools import chain
from typing import Any

import numpy as np
import torch

from flora_core import accumulation, state_files
from flora_core import state as portable
from flora_core._xp import namespace_for
from flora_core.state import plan_metadata

XP = namespace_for("torch")
ACCUMULATION_FIELDS = ("acc", "micro_step")


def metadata(plan: Any) -> dict[str, int]:
    """The plan metadata of the schema as Python ints (``shape`` is the param's)."""
    return {k: int(v) for k, v in plan_metadata(plan).items() if k != "shape"}


class CheckpointMixin:
    """``load_state_dict``, ``export_state``, ``import_state``, ``all_reduce_accumulators``."""

    def _fields_check(
        self, p: torch.Tensor, arrays: dict[str, Any], config: Any
    ) -> None:
        """Raise unless ``arrays`` holds exactly the rule's fields, in its shapes."""
        plan = self._plans[p]
        expected = self._expected_fields(p, config)
        where = f"Parameter {plan.param_index} (shape {plan.shape})"
        for name, want in expected.items():
            if name == "acc" and name not in arrays:
                continue  # a state saved without accumulation starts a fresh cycle
            if name not in arrays:
                raise ValueError(f"{where}: the state has no {name!r} field")
            got = tuple(arrays[name].shape)
            if got != tuple(want.shape):
                raise ValueError(
                    f"{where}: {name} has shape {got}, expected {tuple(want.shape)}"
                )
        rule_fields = set(portable.ARRAY_FIELDS) - {"count", *ACCUMULATION_FIELDS}
        extra = sorted(rule_fields & set(arrays) - set(expected))
        if extra:
            raise ValueError(
                f"{where}: unexpected state fields {extra} for {type(self).__name__}"
            )
        pending = int(arrays.get("micro_step", 0))
        if self.accumulation_steps == 1 and pending:
            raise ValueError(
                f"{where}: the state holds {pending} accumulated micro-batches but this "
                "optimizer has accumulation_steps=1"
            )

    def _installed(self, p: torch.Tensor, arrays: dict[str, Any]) -> dict[str, Any]:
        """A live state for ``p``: float32 tensors on its device, ints, metadata."""
        state: dict[str, Any] = {"count": self._count(int(arrays["count"]), p)}
        for name, value in arrays.items():
            if name in ("count", "micro_step") or name not in portable.ARRAY_FIELDS:
                continue
            if name == "acc" and self.accumulation_steps == 1:
                continue
            tensor = (
                torch.as_tensor(np.asarray(value))
                if not torch.is_tensor(value)
                else value
            )
            state[name] = tensor.to(device=p.device, dtype=torch.float32, copy=True)
        if self.accumulation_steps > 1:
            plan = self._plans[p]
            if "acc" not in state:
                shape = accumulation.accumulator_shape(plan)
                state["acc"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
            state["micro_step"] = int(arrays.get("micro_step", 0))
        state.update(metadata(self._plans[p]))
        return state

    def _ordered(self) -> list[tuple[torch.Tensor, Any]]:
        return [(p, self._config(g)) for g in self.param_groups for p in g["params"]]

    def __getstate__(self) -> dict[str, Any]:
        """torch's fields and every class's ``_copied_attrs`` (NOTE [copies])."""
        state = super().__getstate__()  # type: ignore[misc]
        for cls in type(self).__mro__:
            for name in cls.__dict__.get("_copied_attrs", ()):
                state[name] = self.__dict__[name]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        if "_hooks" in self.__dict__:  # load_state_dict: the same optimizer
            return
        if "_plans" not in self.__dict__:
            raise TypeError(
                f"This {type(self).__name__} was pickled without its configuration "
                "(by flora_torch before named parameters and copies were "
                "supported); build the optimizer again and load its state_dict()"
            )
        self._hooks = {}
        self._init_layout()  # NOTE [copies of stacks] in flora_torch._grouped
        self._ensure_hooks()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; checks plans and metadata, keeps the state float32.

        torch's load hooks run around the whole load (NOTE [load hooks]).
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        pre, post = (
            self._optimizer_load_state_dict_pre_hooks,
            self._optimizer_load_state_dict_post_hooks,
        )
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        try:
            self._load_checked(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre
            self._optimizer_load_state_dict_post_hooks = post
        for post_hook in post.values():
            post_hook(self)

    def _load_checked(self, state_dict: dict[str, Any]) -> None:
        for key in ("state", "param_groups"):
            if not isinstance(state_dict, Mapping) or key not in state_dict:
                raise ValueError(
                    f"Cannot load: the state dict has no {key!r} (expected what "
                    f"{type(self).__name__}.state_dict() returns)"
                )
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"Cannot load: param_groups: state dict {len(saved_groups)}, "
                f"optimizer {len(self.param_groups)}"
            )
        for index, group in enumerate(saved_groups):
            self._check_saved_group(index, group)
        saved_states = state_dict["state"]
        self._check_saved_states(saved_states, saved_groups)
        saved_ids = list(chain.from_iterable(g["params"] for g in saved_groups))
        ordered = self._ordered()
        super().load_state_dict(state_dict)  # type: ignore[misc]
        self._reset_layout()  # NOTE [step layout]
        for pid, (p, _) in zip(saved_ids, ordered, strict=True):
            if pid in saved_states:  # NOTE [float32 state on load]
                self.state[p] = self._installed(p, saved_states[pid])
        self._resume_cycle()

    def _check_saved_group(self, index: int, group: Mapping[str, Any]) -> None:
        """A saved group's hyper-parameters pass the constructor's checks; its plan
        keys and parameter names are this optimizer's."""
        mine = self.param_groups[index]
        if "params" not in group:
            raise ValueError(f"Cannot load: param_groups[{index}] has no 'params'")
        self._check_group({**mine, **group})
        for key, value in self._plan_args[index].items():
            if key in group and group[key] != value:
                raise ValueError(
                    f"Cannot load: param group {index} was saved with {key}="
                    f"{group[key]!r}, this optimizer has {key}={value!r}"
                )
        saved, names = group.get("param_names"), mine.get("param_names")
        if (
            saved is not None
            and names is not None
            and len(saved) == len(names)
            and list(saved) != list(names)
        ):
            k = next(
                i for i, (a, b) in enumerate(zip(saved, names, strict=True)) if a != b
            )
            raise ValueError(
                f"Cannot load: param group {index} parameter {k} name: state dict "
                f"{saved[k]!r}, optimizer {names[k]!r} (the parameters are in another "
                "order, or another model's; a load_state_dict pre-hook may rename them)"
            )

    def _check_saved_states(
        self, saved_states: Mapping[Any, Any], saved_groups: list[Any]
    ) -> None:
        """Each saved parameter state: metadata, fields and shapes, value ranges."""
        saved_ids = list(chain.from_iterable(g["params"] for g in saved_groups))
        ordered = self._ordered()
        if len(saved_ids) != len(ordered):
            raise ValueError(
                f"loaded state dict has {len(saved_ids)} parameters, the optimizer "
                f"{len(ordered)}"
            )
        for pid, (p, config) in zip(saved_ids, ordered, strict=True):
            if pid not in saved_states:
                continue
            saved = saved_states[pid]
            _check_metadata(self._plans[p], saved)
            self._fields_check(p, saved, config)
            fields = {k: v for k, v in saved.items() if k in portable.ARRAY_FIELDS}
            portable.check_values(
                fields, self._plans[p], self.accumulation_steps, xp=XP
            )

    def _resume_cycle(self) -> None:
        """The cycle's micro-batch count (NOTE [accumulation divisor]) after a load."""
        self._cycle_micro_steps = max(
            (s.get("micro_step", 0) for s in self._param_states()), default=0
        )

    def state_header(self) -> portable.Header:
        """What gives this optimizer's state its meaning (docs/spec.md §5.3): its
        kind, each parameter's hyper-parameters and name, τ."""
        names: list[str | None] = []
        configs = []
        for group in self.param_groups:
            names += group.get("param_names") or [None] * len(group["params"])
            configs += [dataclasses.asdict(self._config(group))] * len(group["params"])
        return portable.Header(
            self._kind, tuple(configs), self.accumulation_steps,
            tuple(names) if any(n is not None for n in names) else (), "torch",
        )  # fmt: skip

    def _expected_fields(self, p: torch.Tensor, config: Any) -> dict[str, Any]:
        """The rule's float fields of ``p`` as meta tensors (shapes, no memory)."""
        plan = self._plans[p]
        fields = self._init(plan, config, xp=XP, device=torch.device("meta"))
        fields.pop("count")
        if self.accumulation_steps > 1:
            shape = accumulation.accumulator_shape(plan)
            fields["acc"] = torch.empty(shape, device="meta")
        return fields

    def export_state(self, path: str | os.PathLike[str] | None = None) -> dict:
        """The state in the portable form of ``flora_core.state`` (format 2), also
        written to ``path`` (``.npz`` / ``.safetensors``, atomically) when given.

        Every parameter is included; one not updated yet gets its zero state.
        """
        plans, states = [], []
        for p, config in self._ordered():
            state = self.state.get(p)
            if not state:
                state = self._init(self._plans[p], config, xp=XP, device="cpu")
                state["count"] = 0
            plans.append(self._plans[p])
            states.append(
                {k: v for k, v in state.items() if k in portable.ARRAY_FIELDS}
            )
        flat = portable.export_state(plans, states, self.state_header())
        if path is not None:
            state_files.save_state(flat, path)
        return flat

    def import_state(self, source: Mapping[str, Any] | str | os.PathLike[str]) -> None:
        """Load a portable state written by any Flora adapter: a flat mapping or a
        ``.npz`` / ``.safetensors`` path (read bounded by this optimizer's layout).

        Raises:
            ValueError: naming what would be misread (docs/spec.md §5.6): the
                optimizer, a meaningful hyper-parameter, τ, a parameter's plan or
                name, a counter out of range, a non-finite or negative statistic.
        """
        ordered = self._ordered()
        plans = [self._plans[p] for p, _ in ordered]
        if isinstance(source, str | os.PathLike):
            shapes = [
                {k: tuple(v.shape) for k, v in self._expected_fields(p, c).items()}
                for p, c in ordered
            ]
            source = state_files.load_state(
                source, like=portable.layout_for(plans, shapes)
            )
        arrays = portable.import_state(source, plans, self.state_header())
        for (p, config), fields in zip(ordered, arrays, strict=True):
            self._fields_check(p, fields, config)
        for (p, _), fields in zip(ordered, arrays, strict=True):
            self.state[p] = self._installed(p, fields)
        self._reset_layout()  # NOTE [step layout]
        self._resume_cycle()

    def all_reduce_accumulators(self, group: Any = None) -> None:
        """Average the compressed accumulators over the ranks of ``group``.

        DDP with τ > 1: run the τ backward passes under ``model.no_sync()`` (DDP's
        own all-reduce would read gradients the hooks already freed), then call
        this before ``step()``. It moves ``r/d`` of the gradient traffic; every rank
        must run the same number of micro-batches.
        """
        if self.accumulation_steps == 1:
            raise RuntimeError("all_reduce_accumulators() needs accumulation_steps > 1")
        import torch.distributed as dist

        world = dist.get_world_size(group)
        for p, config in self._ordered():
            if p.requires_grad:
                acc = self._state(p, config)["acc"]
                dist.all_reduce(acc, op=dist.ReduceOp.SUM, group=group)
                acc.div_(world)


def _check_metadata(plan: Any, saved: dict[str, Any]) -> None:
    for key, value in metadata(plan).items():
        if key not in saved:
            raise ValueError(
                f"Parameter {plan.param_index}: the saved state has no {key!r} "
                "(not a Flora optimizer state?)"
            )
        if int(saved[key]) != value:
            raise ValueError(
                f"Parameter {plan.param_index}: saved {key} {int(saved[key])} != "
                f"optimizer's {value}"
            )
