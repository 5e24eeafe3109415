"""Compressed accumulation and the layer-wise update, inside backward.

With ``accumulation_steps > 1`` or ``layerwise=True`` every parameter that requires
grad gets a post-accumulate-grad hook. The hook compresses ``p.grad`` into the
``acc`` state (FLORA Algorithm 1, ``flora_core.accumulation``) and frees it, so no
full-size gradient survives between micro-batches; with ``layerwise=True`` it also
applies the update as soon as the cycle is complete (with ``max_grad_norm``, in
``step()``: see ``flora_torch._clipping``). Hooks hold the optimizer by a weak
reference: a deleted optimizer leaves inert hooks behind; a copy (``deepcopy``,
``pickle``) hooks its own parameters again (``flora_torch._checkpoint``).

NOTE [one owner per parameter]: the first hook to run consumes ``p.grad``, so two
live optimizers hooking one parameter would race for it and the newer one (a
notebook cell run twice, a resumed optimizer built beside the old one, as torch's
own state-dict tests do) would silently get nothing. The optimizer that hooked a
parameter last owns it; the older one's hook leaves it alone while the owner lives.

NOTE [GradScaler with compressed accumulation]: with τ > 1 (or layerwise) the
micro-batch gradients are compressed and freed inside backward, so
``torch.amp.GradScaler`` finds no ``.grad`` to unscale or check. The optimizer then
declares ``_step_supports_amp_scaling``; ``GradScaler.step`` hands itself over as
``grad_scaler=`` (torch warns that this contract is deprecated) and ``step`` does
the scaler's part on the accumulators: one non-finite check over all of them (an
inf or NaN micro-batch gradient makes its compressed sum non-finite), the unscale
by ``1 / scale`` and the found-inf record that ``GradScaler.update`` reads to back
off the scale (written to the scaler's private ``_per_optimizer_states``, the only
private field used; torch 2.13). A skipped step drops the cycle's micro-batches, as ``zero_grad``
does after a skipped plain step.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from flora_core import accumulation
from flora_torch import distributed
from flora_torch._checkpoint import XP

# id(p) -> (p, owner), both weakly (NOTE [one owner per parameter])
_OWNERS: dict[int, tuple[weakref.ref, weakref.ref]] = {}


class HooksMixin:
    """The hook side of ``FloraOptimizer`` (see the module docstring)."""

    def _ensure_hooks(self) -> None:
        """Hook every parameter that requires grad (again after unfreezing)."""
        if not self._uses_hooks:
            return
        ref = weakref.ref(self)
        for p in self._plans:
            if p.requires_grad and p not in self._hooks:
                self._hooks[p] = p.register_post_accumulate_grad_hook(_make_hook(ref))
                _OWNERS[id(p)] = (weakref.ref(p), ref)

    def _on_grad_ready(self, p: torch.Tensor) -> None:
        """Inside backward: compress into ``acc`` (τ > 1) and/or update (layerwise)."""
        if p.grad is None or p not in self._plans:
            return
        group = self.param_groups[self._group_index[p]]
        config = self._config(group)
        with torch.no_grad():
            if self.accumulation_steps == 1:
                self._update(p, p.grad, group, config)
                p.grad = None
                return
            state = self._accumulate(p, config, micro_batches=1)
            full = state["micro_step"] == self.accumulation_steps
            if self.layerwise and full and not self._clips_in_step:
                self._update(p, self._take_accumulated(p, state, None), group, config)

    def _accumulate(self, p: torch.Tensor, config: Any, micro_batches: int) -> dict:
        """``acc += compress(p.grad, A_count)`` (Algorithm 1), then free ``p.grad``."""
        grad = p.grad
        self._check_grad(p, grad)
        state = self._state(p, config)
        if micro_batches == 1 and state["micro_step"] >= self.accumulation_steps:
            raise RuntimeError(
                f"Parameter {self._plans[p].param_index} received more than "
                f"accumulation_steps={self.accumulation_steps} micro-batch gradients "
                f"without an optimizer step; call step() after every "
                f"{self.accumulation_steps} backward passes"
            )
        with distributed.sharded_context(p):  # NOTE [DTensor parameters]
            state["acc"] = accumulation.accumulate(
                state["acc"],
                grad,
                state["count"],
                plan=self._plans[p],
                xp=XP,
                device=p.device,
            )
        state["micro_step"] += micro_batches
        self._cycle_micro_steps = max(self._cycle_micro_steps, state["micro_step"])
        p.grad = None
        return state

    def _take_accumulated(
        self, p: torch.Tensor, state: dict, inv_scale: float | None
    ) -> torch.Tensor:
        """The cycle's mean gradient ``decompress(acc) / n``; resets ``acc``.

        NOTE [accumulation divisor]: ``n`` is the number of micro-batches in the
        cycle (backward passes since the last update, counted over all parameters:
        τ for a full cycle), never the parameter's own count. A parameter that got
        a gradient in only some micro-batches (a mixture-of-experts expert, a
        conditional branch) receives the cycle's mean, ``sum / τ``, as Algorithm 1,
        ``flora_multi_steps`` and Keras do. A short cycle (``step()`` after
        ``n < τ`` backward passes, e.g. the end of an epoch in HF ``Trainer``)
        divides by its ``n``: the mean of the micro-batches it has.
        """
        micro_batches = max(self._cycle_micro_steps, state["micro_step"])
        acc = state["acc"] if inv_scale is None else state["acc"] * inv_scale
        with distributed.sharded_context(p):
            grad = accumulation.accumulated_gradient(
                acc, state["count"], micro_batches, plan=self._plans[p], xp=XP,
                device=p.device,
            )  # fmt: skip
        _reset(state)
        return grad

    def _param_states(self) -> list[dict[str, Any]]:
        """The parameters' states (a hook may store other keys in ``self.state``)."""
        return [self.state[p] for p in self._plans if p in self.state]

    def _drop_cycle(self) -> None:
        """Forget the cycle's micro-batches (a step skipped by GradScaler)."""
        for state in self._param_states():
            if state.get("micro_step"):
                _reset(state)
        self._cycle_micro_steps = 0

    def _amp_unscale(self, scaler: Any) -> float | None:
        """1 / scale, or None when an accumulator is not finite (records found-inf)."""
        found: dict[torch.device, torch.Tensor] = {}
        for state in self._param_states():
            if state.get("micro_step"):
                acc = state["acc"]
                if acc.device not in found:
                    found[acc.device] = torch.zeros((), device=acc.device)
                found[acc.device].add_((~torch.isfinite(acc).all()).float())
        scaler._per_optimizer_states[id(self)]["found_inf_per_device"] = found
        if any(bool(flag.item()) for flag in found.values()):
            return None
        return 1.0 / float(scaler.get_scale())


def _reset(state: dict[str, Any]) -> None:
    state["acc"] = torch.zeros_like(state["acc"])
    state["micro_step"] = 0


def _owner(p: torch.Tensor) -> Any:
    entry = _OWNERS.get(id(p))
    return entry[1]() if entry is not None and entry[0]() is p else None


def _make_hook(ref: weakref.ref) -> Callable[[torch.Tensor], None]:
    def hook(p: torch.Tensor) -> None:
        optimizer = ref()
        owner = _owner(p)  # None once the owner is gone: the others act again
        if optimizer is not None and (owner is None or owner is optimizer):
            optimizer._on_grad_ready(p)

    return hook
