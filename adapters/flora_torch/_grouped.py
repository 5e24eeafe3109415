"""The grouped (multi-tensor) step: parameters that share a plan update as one stack.

torch's optimizers have tiers: a per-tensor reference, a multi-tensor (``foreach``)
path and a fused one. Here the per-tensor path (``FloraOptimizer._update``) is the
reference and this is the multi-tensor one, the default where it applies
(``foreach=None``, as ``torch.optim.AdamW`` spells it; ``foreach=False`` forces the
reference).

NOTE [grouped step]: parameters of one param group with the same plan up to
``param_index`` (shape, compressed axis, rank, distribution, seed), dtype and device,
and the same ``count`` form a bucket. The core runs its rule once per bucket on a
:class:`~flora_core.policy.StackedPlan` (NOTE [stacked plans]): every member's
projection comes from one RNG call, compress / decompress / transfer are batched
matmuls, the elementwise math runs once over the stack. The number of kernels per
step grows with the number of buckets, not of parameters (a GPT-2 has about ten).
There is one copy of each rule: the core's, with a leading batch axis.

NOTE [stacked state]: the rule's state fields (``mu``, ``nu``, ``nu_row``,
``nu_col``) of a bucket live in one ``(B, ...)`` tensor per field, and each
parameter's ``state[p][field]`` is a view of its row, so ``state_dict()`` and every
per-parameter reader see the usual tensors. A step checks that the views are still
the ones it made (``load_state_dict``, the per-tensor path or a user may have
replaced them) and re-stacks otherwise (one copy, at that step only). Eager
(``capturable=False``) steps rebind the new stacks (NOTE [state tensors are
rebound]); ``capturable=True`` copies into them, so their addresses never change (a
CUDA graph replays on the same memory).

NOTE [chunks]: stacking copies the bucket's gradients (and parameters, where the
rule reads them) and the rule's full-size temporaries are as large as the stack. A
bucket is therefore split into chunks of at most ``max(largest parameter,
GROUP_MIN_ELEMENTS)`` elements: the temporaries of a chunk are never larger than
those the per-tensor path makes for the largest parameter, plus at most 32 MiB.

Where grouping does not apply, the per-tensor path runs: DTensor parameters (FSDP2,
tensor parallel: their states are sharded per parameter), the layer-wise update
(each parameter updates alone inside backward), and the compressed accumulation's
per-parameter hooks (the rule after the cycle is grouped; the decompression of each
``acc`` is per parameter).
"""

from __future__ import annotations

from typing import Any

import torch

from flora_core import policy
from flora_torch import distributed
from flora_torch._checkpoint import XP

RULE_FIELDS = ("mu", "nu", "nu_row", "nu_col")
GROUP_MIN_ELEMENTS = 1 << 23  # 32 MiB of float32 per chunk at least (NOTE [chunks])


class _Stack:
    """One chunk of a bucket: its parameters, stacked plan and stacked state."""

    __slots__ = ("count", "fields", "params", "plan", "views")

    def __init__(self, params: list[torch.Tensor], plan: policy.StackedPlan) -> None:
        self.params = params
        self.plan = plan
        self.fields: dict[str, torch.Tensor] = {}
        self.count: torch.Tensor | None = None  # (B,) with capturable=True
        self.views: list[dict[str, Any]] = [{} for _ in params]  # what state[p] holds

    def bind(self, states: list[dict], name: str, stacked: torch.Tensor) -> None:
        """Make ``state[name]`` of each member its row of ``stacked`` (a view)."""
        for state, mine, view in zip(
            states, self.views, stacked.unbind(0), strict=True
        ):
            state[name] = mine[name] = view


def _needs_param(config: Any) -> bool:
    """Whether the rule reads the parameter (weight decay, parameter scale)."""
    return bool(
        getattr(config, "weight_decay", 0.0)
        or getattr(config, "multiply_by_parameter_scale", False)
        or getattr(config, "weight_decay_rate", None) is not None
    )


class GroupedMixin:
    """The grouped step of ``FloraOptimizer`` (see the module docstring)."""

    def _grouped(self, p: torch.Tensor) -> bool:
        """Whether ``p`` can take the grouped path (NOTE [grouped step])."""
        return self.foreach is not False and not distributed.is_sharded(p)

    def _update_all(self, items: list[tuple[torch.Tensor, torch.Tensor, int]]) -> None:
        """Update every ``(param, grad, group index)``: grouped where it applies."""
        buckets: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        configs = {}
        for p, grad, index in items:
            group = self.param_groups[index]
            if index not in configs:
                configs[index] = self._config(group)
            config = configs[index]
            if not self._grouped(p):
                self._update(p, grad, group, config)
                continue
            self._check_grad(p, grad)
            state = self._state(p, config)
            plan = self._plans[p]
            count = None if self.capturable else state["count"]
            key = (index, plan.shape, plan.rank, plan.axis, plan.distribution,
                   plan.seed, p.dtype, p.device, grad.dtype, count)  # fmt: skip
            buckets.setdefault(key, []).append((p, grad))
        for key, members in buckets.items():
            index = key[0]
            for chunk in self._chunks(members):
                self._update_chunk(chunk, self.param_groups[index], configs[index])

    def _chunks(
        self, members: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Consecutive members, at most ``_chunk_elements`` elements each."""
        chunks: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[]]
        size = 0
        for member in members:
            n = member[0].numel()
            if chunks[-1] and size + n > self._chunk_elements:
                chunks.append([])
                size = 0
            chunks[-1].append(member)
            size += n
        return chunks

    def _stacks_for(self, params: list[torch.Tensor], config: Any) -> list[_Stack]:
        """The stacks of ``params``, rebuilt unless every state view is still theirs."""
        key = tuple(self._plans[p].param_index for p in params)
        stacks = self._stacks.get(key)
        if stacks is None or not all(self._current(s) for s in stacks):
            stacks = self._restack(params, key)
        return stacks

    def _current(self, stack: _Stack) -> bool:
        for p, mine in zip(stack.params, stack.views, strict=True):
            state = self.state[p]
            for name, view in mine.items():
                if state.get(name) is not view:
                    return False
        return True

    def _restack(self, params: list[torch.Tensor], key: tuple) -> list[_Stack]:
        """Stack the members' state (one copy) and make each ``state[p]`` a view."""
        for p in params:  # drop the stacks these parameters belonged to
            old = self._stack_keys.pop(p, None)
            if old is not None:
                for q in self._stacks.pop(old, ()):
                    for r in q.params:
                        self._stack_keys.pop(r, None)
        parts = [params]
        if self.capturable:  # members must share the count (a sync, at restack only)
            counts = [int(self.state[p]["count"]) for p in params]
            parts = [[p for p, c in zip(params, counts, strict=True) if c == value]
                     for value in dict.fromkeys(counts)]  # fmt: skip
        stacks = []
        for members in parts:
            plan = policy.stack_plans([self._plans[p] for p in members])
            stack = _Stack(members, plan)
            states = [self.state[p] for p in members]
            for name in RULE_FIELDS:
                if name in states[0]:
                    stack.fields[name] = torch.stack([s[name] for s in states])
                    stack.bind(states, name, stack.fields[name])
            if self.capturable:
                counts = [torch.as_tensor(s["count"]) for s in states]
                stack.count = torch.stack(counts).to(members[0].device, torch.int64)
                stack.bind(states, "count", stack.count)
            stacks.append(stack)
        self._stacks[key] = stacks
        for p in params:
            self._stack_keys[p] = key
        return stacks

    def _update_chunk(
        self, chunk: list[tuple[torch.Tensor, torch.Tensor]], group: dict, config: Any
    ) -> None:
        for stack in self._stacks_for([p for p, _ in chunk], config):
            grads = [g for p, g in chunk if any(p is q for q in stack.params)]
            self._update_stack(stack, grads, group, config)

    def _update_stack(
        self, stack: _Stack, grads: list[torch.Tensor], group: dict, config: Any
    ) -> None:
        """One rule call for the whole stack, then one multi-tensor parameter add."""
        params = stack.params
        grad = torch.stack(grads)
        param = torch.stack(params) if _needs_param(config) else None
        if stack.count is not None:
            count: Any = stack.count[0]
        else:
            count = self.state[params[0]]["count"]
        update, new_state = self._rule(
            grad, {"count": count, **stack.fields}, param, plan=stack.plan,
            config=config, lr=group["lr"], xp=XP, device=params[0].device,
        )  # fmt: skip
        del grad, param
        if stack.count is not None:  # NOTE [stacked state]: in place, fixed addresses
            for name, field in stack.fields.items():
                field.copy_(new_state[name])
            stack.count.add_(1)
        else:
            states = [self.state[p] for p in params]
            for name in stack.fields:
                stack.fields[name] = new_state[name]
                stack.bind(states, name, new_state[name])
            for state in states:
                state["count"] += 1
        # bf16/fp16: add_ computes in float32 and rounds once, as the per-tensor path
        torch._foreach_add_(params, update.unbind(0))
