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
rule reads them), and the rule's full-size temporaries are as large as the stack.
The per-tensor path's peak is set by its largest parameter ``L``: about ``k L``
for ``k`` full-size temporaries (two to three, NOTE [lean temporaries]), with no
copy. A bucket is therefore split into chunks of at most ``max(3/4 L,
GROUP_MIN_ELEMENTS)`` elements, and ``1/2 L`` when the rule reads the parameters
too (weight decay, Adafactor's parameter scale: a second stacked copy), so a
chunk's copies and temporaries stay near ``k L`` (measured on GPT-2 small:
``benchmarks/results/step_peak.md``); a stack of one parameter is a view, not a
copy. The floor of 4 Mi elements (16 MiB of float32)
keeps layers of models without a large embedding grouped; it can raise such a
model's peak by a few tens of MiB (``optimizer._chunk_elements`` sets it).

Where grouping does not apply, the per-tensor path runs: DTensor parameters (FSDP2,
tensor parallel: their states are sharded per parameter), the layer-wise update
(each parameter updates alone inside backward), and the compressed accumulation's
per-parameter hooks (the rule after the cycle is grouped; the decompression of each
``acc`` is per parameter).
"""

from __future__ import annotations

from typing import Any

import torch

from flora_core import policy, rng
from flora_core.policy import ROLE_MOMENTUM
from flora_torch import distributed
from flora_torch._checkpoint import XP

RULE_FIELDS = ("mu", "nu", "nu_row", "nu_col")
GROUP_MIN_ELEMENTS = 1 << 22  # 16 MiB of float32 per chunk at least (NOTE [chunks])


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

    # a copy keeps the flags; its layout starts empty (NOTE [copies of stacks])
    _copied_attrs = ("foreach", "capturable", "_chunk_elements")

    def _init_layout(self) -> None:
        """No stacks yet (NOTE [copies of stacks]).

        NOTE [copies of stacks]: the stacks reference parameters and state views; a
        deep copy would keep those links, but ``pickle`` does not keep one tensor a
        view of another, so a copy's layout is rebuilt from its own state at its
        first step (one restack), like after ``load_state_dict``.
        """
        self._stacks: dict[tuple[int, ...], _Stack] = {}  # NOTE [stacked state]
        self._stack_keys: dict[torch.Tensor, tuple[int, ...]] = {}
        self._layout: Any = None  # NOTE [step layout]

    def _grouped(self, p: torch.Tensor) -> bool:
        """Whether ``p`` can take the grouped path (NOTE [grouped step])."""
        return self.foreach is not False and not distributed.is_sharded(p)

    def _update_all(self, items: list[tuple[torch.Tensor, torch.Tensor, int]]) -> None:
        """Update every ``(param, grad, group index)``: grouped where it applies.

        NOTE [step layout]: which stacks to run and which gradients feed them is
        decided once (``_prepare``, eager even under ``torch.compile``: it creates
        state, reads counts and stacks) and reused while the same parameters have
        gradients and their state is the stacks' (checked in eager mode; loading a
        state dict or a per-tensor update resets it). A compiled step therefore
        traces only tensor math over fixed stacks.
        """
        grouped = []
        configs: dict[int, Any] = {}
        for p, grad, index in items:
            if index not in configs:
                configs[index] = self._config(self.param_groups[index])
            if self._grouped(p):
                grouped.append((p, grad, index))
            else:
                self._update(p, grad, self.param_groups[index], configs[index])
        if not grouped:
            return
        key = tuple(self._plans[p].param_index for p, _, _ in grouped)
        layout = self._layout
        compiling = torch.compiler.is_compiling()
        if (
            layout is None
            or layout[0] != key
            or (compiling and not self.capturable)
            or not self._layout_current(layout[1])
        ):
            layout = self._prepare(key, grouped, configs, compiling)
        for stack, positions, index in layout[1]:
            grads = [grouped[i][1] for i in positions]
            group = self.param_groups[index]
            self._update_stack(stack, grads, group, configs[index])

    def _layout_current(self, stacks: list) -> bool:
        if torch.compiler.is_compiling():  # NOTE [step layout]: reset explicitly
            return True
        return all(self._current(stack) for stack, _, _ in stacks)

    @torch.compiler.disable
    def _prepare(
        self, key: tuple, grouped: list, configs: dict[int, Any], compiling: bool
    ) -> tuple:
        """Buckets, chunks and stacks for these parameters (NOTE [step layout]).

        NOTE [compiled counts]: a Python int ``count`` is a constant to Dynamo,
        which would recompile ``step`` at every update; a step that is being
        compiled therefore switches the optimizer to ``capturable=True`` first
        (device-tensor counts, where-gated resamples: one graph for every step),
        as Dynamo does for torch's own optimizers.
        """
        if compiling and not self.capturable:
            self.capturable = True
            self._reset_layout()
            for p, state in self.state.items():
                if "count" in state:
                    state["count"] = self._count(int(state["count"]), p)
        buckets: dict[tuple, list[int]] = {}
        for position, (p, grad, index) in enumerate(grouped):
            self._check_grad(p, grad)
            state = self._state(p, configs[index])
            plan = self._plans[p]
            count = int(state["count"])  # a tensor when capturable: read here only
            bucket = (index, plan.shape, plan.rank, plan.axis, plan.distribution,
                      plan.seed, p.dtype, p.device, grad.dtype, count)  # fmt: skip
            buckets.setdefault(bucket, []).append(position)
        stacks = []
        for bucket, positions in buckets.items():
            copies = 1 + _needs_param(configs[bucket[0]])  # gradients (and params)
            for chunk in self._chunks(positions, grouped, copies):
                params = [grouped[i][0] for i in chunk]
                stacks.append((self._stack_for(params), chunk, bucket[0]))
        self._layout = (key, stacks)
        return self._layout

    def _reset_layout(self) -> None:
        """Forget the stacks (after the state was replaced)."""
        self._init_layout()

    def _chunks(
        self, positions: list[int], grouped: list, copies: int
    ) -> list[list[int]]:
        """Consecutive members, at most ``_chunk_elements`` elements each, 2/3 of
        that when the parameters are stacked too (NOTE [chunks])."""
        limit = self._chunk_elements * 2 // (1 + copies)
        chunks: list[list[int]] = [[]]
        size = 0
        for position in positions:
            n = grouped[position][0].numel()
            if chunks[-1] and size + n > limit:
                chunks.append([])
                size = 0
            chunks[-1].append(position)
            size += n
        return chunks

    def _stack_for(self, params: list[torch.Tensor]) -> _Stack:
        """The stack of ``params``, rebuilt unless every state view is still its own."""
        key = tuple(self._plans[p].param_index for p in params)
        stack = self._stacks.get(key)
        if stack is None or not self._current(stack):
            stack = self._restack(params, key)
        return stack

    def _current(self, stack: _Stack) -> bool:
        for p, mine in zip(stack.params, stack.views, strict=True):
            state = self.state[p]
            for name, view in mine.items():
                if state.get(name) is not view:
                    return False
        return True

    def _restack(self, params: list[torch.Tensor], key: tuple) -> _Stack:
        """Stack the members' state (one copy) and make each ``state[p]`` a view."""
        for p in params:  # drop the stacks these parameters belonged to
            old = self._stack_keys.pop(p, None)
            if old is not None and old in self._stacks:
                for q in self._stacks.pop(old).params:
                    self._stack_keys.pop(q, None)
        plan = policy.stack_plans([self._plans[p] for p in params])
        stack = _Stack(params, plan)
        states = [self.state[p] for p in params]
        for name in RULE_FIELDS:
            if name in states[0]:
                stack.fields[name] = torch.stack([s[name] for s in states])
                stack.bind(states, name, stack.fields[name])
        if self.capturable:
            counts = [torch.as_tensor(s["count"]) for s in states]
            stack.count = torch.stack(counts).to(params[0].device, torch.int64)
            stack.bind(states, "count", stack.count)
        if plan.compressed:  # ahead of a traced / captured step
            rng.device_streams(plan.stream(ROLE_MOMENTUM), XP, params[0].device)
        self._stacks[key] = stack
        for p in params:
            self._stack_keys[p] = key
        return stack

    def _update_stack(
        self, stack: _Stack, grads: list[torch.Tensor], group: dict, config: Any
    ) -> None:
        """One rule call for the whole stack, then one multi-tensor parameter add."""
        params = stack.params
        if len(params) == 1:  # a view: no copy (the largest parameter is often alone)
            grad = grads[0].unsqueeze(0)
            param = params[0].unsqueeze(0) if _needs_param(config) else None
        else:
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
        if stack.count is not None or torch.compiler.is_compiling():
            # NOTE [stacked state]: in place, fixed addresses
            for name, field in stack.fields.items():
                field.copy_(new_state[name])
            if stack.count is not None:
                stack.count.add_(1)
            else:
                for p in params:
                    self.state[p]["count"] += 1
        else:
            states = [self.state[p] for p in params]
            for name in stack.fields:
                stack.fields[name] = new_state[name]
                stack.bind(states, name, new_state[name])
            for state in states:
                state["count"] += 1
        # bf16/fp16: add_ computes in float32 and rounds once, as the per-tensor path
        torch._foreach_add_(params, update.unbind(0))
