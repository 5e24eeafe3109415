"""The base class of FloraAdam and FloraAdafactor: groups, plans, lazy state, step.

A subclass names its pure rule pair from ``flora_core.rules`` (``_init``, ``_rule``)
and turns a param group into the rule's config (``_config``); everything else is
here and in the hook and checkpoint mixins. The math is the core's: this package only
feeds it torch tensors (namespace ``array_api_compat.torch``, resolved once) and
stores what it returns.

NOTE [state tensors are rebound]: the core is pure and returns new arrays; the
optimizer stores them in place of the old ones (no extra copy pass), so a state
tensor is a new object after every step. ``count`` and ``micro_step`` are Python
ints, so the momentum transfer of the core is a Python branch.

NOTE [DTensor parameters]: a DTensor parameter (FSDP2, tensor parallel) gets DTensor
states sharded like itself and the core rule runs on DTensors; see
``flora_torch.distributed`` (which also picks its compressed axis).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from flora_core import accumulation, momentum, policy
from flora_core.validation import (
    check_flag,
    check_gradient,
    check_lr,
    check_positive_int,
)
from flora_torch import distributed
from flora_torch._checkpoint import XP, CheckpointMixin, metadata
from flora_torch._clipping import ClippingMixin
from flora_torch._hooks import HooksMixin
from flora_torch._params import check_group_keys, split_names

PLAN_KEYS = ("rank", "seed", "axis", "projection")
LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_group_lr(lr: object) -> None:
    """A float or 1-element float tensor, finite and >= 0 (read once, here: at
    construction and in ``load_state_dict``, never in ``step``)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(
                f"Invalid learning rate: a tensor lr must be 1 float, got {lr}"
            )
        check_lr(float(lr.detach().reshape(()).float().cpu()))
        return
    if isinstance(lr, bool) or not isinstance(lr, int | float):
        raise TypeError(f"Invalid learning rate: {lr!r} (expected a float >= 0)")
    check_lr(lr)


class FloraOptimizer(HooksMixin, ClippingMixin, CheckpointMixin, torch.optim.Optimizer):
    """Base class of the FLORA optimizers (see the module docstring)."""

    _init: Callable[..., dict[str, Any]]
    _rule: Callable[..., tuple[torch.Tensor, dict[str, Any]]]
    # what __init__ sets that a copy keeps (NOTE [copies] in flora_torch._checkpoint)
    _copied_attrs = (
        "accumulation_steps", "layerwise", "_plans", "_group_index", "_plan_args",
        "_cycle_micro_steps", "_step_supports_amp_scaling",
    )  # fmt: skip

    def __init__(
        self, params: Any, defaults: dict[str, Any], *, accumulation_steps: int,
        layerwise: bool, max_grad_norm: float | None = None,
    ) -> None:  # fmt: skip
        self.accumulation_steps = check_positive_int(
            "accumulation_steps", accumulation_steps
        )
        self.layerwise = check_flag("layerwise", layerwise)
        self._init_clipping(max_grad_norm)
        self._plans: dict[torch.Tensor, policy.CompressionPlan] = {}
        self._group_index: dict[torch.Tensor, int] = {}
        self._hooks: dict[torch.Tensor, Any] = {}
        self._plan_args: list[dict[str, Any]] = []
        self._cycle_micro_steps = 0
        super().__init__(params, defaults)
        # NOTE [GradScaler with compressed accumulation]
        self._step_supports_amp_scaling = self._uses_hooks

    # ------------------------------------------------------------------ groups
    @property
    def _uses_hooks(self) -> bool:
        return self.accumulation_steps > 1 or self.layerwise

    def _config(self, group: dict[str, Any]) -> Any:
        raise NotImplementedError

    def _check_group(self, group: dict[str, Any]) -> None:
        """Validate a group's hyper-parameters eagerly, naming any bad value."""
        check_group_lr(group["lr"])
        policy.check_rank(group["rank"])
        policy.check_distribution(group["projection"])
        if group["axis"] not in (None, 0, 1, -1):
            raise ValueError(
                f"Invalid axis: {group['axis']!r} (expected 0, 1, -1 or None)"
            )
        self._config(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its parameters continue the stream count (param_index)."""
        if not isinstance(param_group, dict):
            raise TypeError(
                f"param_group must be a dict, got {type(param_group).__name__}"
            )
        check_group_keys(param_group, type(self).__name__)
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif not isinstance(params, set):  # torch raises its own error for a set
            params, names = split_names(list(params))  # model.named_parameters()
            if names is not None:
                param_group["param_names"] = names
        param_group["params"] = params
        group = {**self.defaults, **param_group}
        self._check_group(group)
        first = len(self._plans)
        plans = []
        for k, p in enumerate(params):
            if isinstance(p, torch.Tensor) and p.is_complex():
                raise ValueError(
                    f"Complex parameters are not supported (parameter {first + k}, "
                    f"shape {tuple(p.shape)}, dtype {p.dtype}); optimize its real view"
                )
            if distributed.is_sharded(p) and self.layerwise:
                raise NotImplementedError(
                    f"{type(self).__name__}(layerwise=True) does not support DTensor "
                    f"parameters yet (parameter {first + k}, placements {p.placements})"
                )
            plans.append(policy.plan(
                tuple(p.shape), first + k, rank=group["rank"], seed=group["seed"],
                axis=distributed.plan_axis(p, group["axis"]),
                distribution=group["projection"],
            ))  # fmt: skip
        policy.check_unique_streams([*self._plans.values(), *plans])
        config = self._config(group)
        momentum.warn_undamped(
            plans, getattr(config, "b1", getattr(config, "momentum", None)),
            config.kappa, config.transfer, param_group.get("param_names"),
        )  # fmt: skip
        super().add_param_group(param_group)
        self._plan_args.append({k: group[k] for k in PLAN_KEYS})
        for p, plan in zip(params, plans, strict=True):
            self._plans[p] = plan
            self._group_index[p] = len(self.param_groups) - 1
        self._ensure_hooks()

    def _check_plan_keys(self, group: dict[str, Any], index: int) -> None:
        """``rank``, ``seed``, ``axis`` and ``projection`` decide the state shapes."""
        for key, value in self._plan_args[index].items():
            if group[key] != value:
                raise ValueError(
                    f"param_groups[{index}][{key!r}] changed from {value!r} to "
                    f"{group[key]!r}; {', '.join(PLAN_KEYS)} are fixed when a group is added"
                )

    # ------------------------------------------------------------------- state
    def plan_of(self, p: torch.Tensor) -> policy.CompressionPlan:
        """The compression plan of parameter ``p`` (rank, axis, stream, shapes)."""
        return self._plans[p]

    def _state(self, p: torch.Tensor, config: Any) -> dict[str, Any]:
        """``p``'s state, created at its first gradient (frozen params start late)."""
        state = self.state[p]
        if "count" not in state:
            plan = self._plans[p]
            sharded = distributed.is_sharded(p)  # NOTE [DTensor parameters]
            device = torch.device("meta") if sharded else p.device
            state.update(self._init(plan, config, xp=XP, device=device))
            if self.accumulation_steps > 1:
                shape = accumulation.accumulator_shape(plan)
                state["acc"] = torch.zeros(shape, dtype=torch.float32, device=device)
                state["micro_step"] = 0
            if sharded:
                fields = {
                    k: v
                    for k, v in state.items()
                    if torch.is_tensor(v) and k != "count"
                }
                state.update(
                    distributed.sharded_state(p, plan, fields, self._rule, config)
                )
            state["count"] = 0
            state.update(metadata(plan))
        return state

    def _check_grad(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        if grad.is_sparse:
            raise RuntimeError(
                f"{type(self).__name__} does not support sparse gradients (parameter "
                f"{self._plans[p].param_index}, shape {tuple(p.shape)}); use a dense "
                "layer (e.g. nn.Embedding(..., sparse=False))"
            )
        check_gradient(
            grad, xp=XP, name=f"gradient of parameter {self._plans[p].param_index}"
        )

    # -------------------------------------------------------------------- step
    def _update(
        self, p: torch.Tensor, grad: torch.Tensor, group: dict, config: Any
    ) -> None:
        self._check_grad(p, grad)
        state = self._state(p, config)
        with distributed.sharded_context(p):
            update, new_state = self._rule(
                grad, state, p, plan=self._plans[p], config=config, lr=group["lr"],
                xp=XP, device=p.device,
            )  # fmt: skip
        if distributed.is_sharded(p):
            new_state = distributed.keep_placements(new_state, state)
        state.update(new_state)  # NOTE [state tensors are rebound]
        if p.dtype in LOW_PRECISION:
            p.copy_(p.float().add_(update))
        else:
            p.add_(update)

    @torch.no_grad()
    def step(
        self, closure: Callable[[], Any] | None = None, grad_scaler: Any = None
    ) -> Any:
        """One update of every parameter that has a gradient (or accumulated ones).

        Args:
            closure: re-evaluates the model and returns the loss (not with
                ``layerwise=True``).
            grad_scaler: passed by ``torch.amp.GradScaler.step`` when τ > 1; see
                NOTE [GradScaler with compressed accumulation].
        """
        if self.layerwise and (closure is not None or grad_scaler is not None):
            what = "a closure" if closure is not None else "torch.amp.GradScaler"
            raise RuntimeError(
                f"{type(self).__name__}(layerwise=True) cannot be used with {what}: "
                "each update is applied inside backward, before step() runs"
            )
        if grad_scaler is not None and not self._uses_hooks:
            raise ValueError("grad_scaler is only used with accumulation_steps > 1")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._ensure_hooks()
        inv_scale = None
        if grad_scaler is not None and grad_scaler.is_enabled():
            inv_scale = self._amp_unscale(grad_scaler)
            if inv_scale is None:  # non-finite: skip and drop the cycle
                self._drop_cycle()
                return loss
        self._clip_before_update(inv_scale)  # see flora_torch._clipping
        for index, group in enumerate(self.param_groups):
            self._check_plan_keys(group, index)
            config = self._config(group)
            for p in group["params"]:
                grad = self._gradient(p, config, inv_scale)
                if grad is not None:
                    self._update(p, grad, group, config)
        self._cycle_micro_steps = 0
        return loss

    def _gradient(self, p: torch.Tensor, config: Any, inv_scale: float | None) -> Any:
        if self.accumulation_steps == 1:
            return p.grad
        if p.grad is not None:  # reached .grad without the hook (set by hand, or
            # accumulated before the parameter was unfrozen): all micro-batches at once
            self._accumulate(p, config, micro_batches=max(1, self._cycle_micro_steps))
        state = self.state.get(p)
        if not state or not state.get("micro_step"):
            return None
        return self._take_accumulated(p, state, inv_scale)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._ensure_hooks()
