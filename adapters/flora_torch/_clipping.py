"""Global-norm gradient clipping of the gradient the update uses, in every mode.

With ``accumulation_steps > 1`` or ``layerwise=True`` the backward hooks compress and
free every ``p.grad`` (``flora_torch._hooks``), so ``torch.nn.utils.clip_grad_norm_``
(and what calls it: HF ``Trainer``'s ``max_grad_norm``, accelerate's
``clip_grad_norm_``) finds no gradient, returns 0 and clips nothing. This mixin
clips where the gradient is:

* ``max_grad_norm=c`` (constructor): ``step()`` clips the global norm to ``c`` before
  any update, after ``GradScaler``'s unscale, in every mode. With ``layerwise=True``
  and τ > 1 the hooks then leave the τ-th micro-batch's update to ``step()``
  (the global norm is only known once every accumulator is complete); with
  ``layerwise=True`` and τ = 1 no global norm exists before the updates made inside
  backward, so a finite ``c`` raises at construction.
* ``optimizer.clip_grad_norm_(c)``: clips now and returns the norm (torch's
  ``clip_grad_norm_`` without ``parameters``), for loops that log it.
* No clipping configured while the hooks consume gradients: one ``UserWarning``
  per optimizer names the fix (at the first such ``step()``; at construction for
  ``layerwise=True``). ``max_grad_norm=float("inf")`` declares "no clipping" and
  silences it.

The clipped quantity is the gradient the rule receives: ``p.grad`` with τ = 1, and
with τ > 1 the cycle's mean ``decompress(acc) / n`` (NOTE [accumulation divisor]),
which for a compressed parameter is the projected gradient ``Ĝ = G Aᵀ A``. Its
norm is about ``sqrt(1 + (d + 1) / r)`` times the full mean gradient's
(``flora_core.projection.transfer_gain``): clipping it bounds the update's input
exactly, as ``clip_grad_norm_`` does for an optimizer without compression.

The norm of the accumulated mean is computed in ``r x r`` space
(``flora_core.accumulation.accumulated_square_norm``, NOTE [norm in r x r space]
there): exact, with no full-size gradient built. Rounding can make the sum of a
nearly zero accumulator slightly negative, so it is clamped at 0.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from flora_core import accumulation
from flora_torch import distributed
from flora_torch._checkpoint import XP


def accumulated_square_norm(
    acc: torch.Tensor, cycle: int, steps: int, *, plan: Any, device: Any = None
) -> torch.Tensor:
    """``‖decompress(acc, A_cycle) / steps‖²``, float32, summed over DTensor shards."""
    square = accumulation.accumulated_square_norm(acc, cycle, plan=plan, xp=XP,
                                                  device=device)  # fmt: skip
    if distributed.is_sharded(square):  # a Partial sum over the shards
        square = square.full_tensor()
    return square.clamp(min=0.0) / float(steps) ** 2


def check_max_grad_norm(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(
            f"Invalid max_grad_norm: {value!r} (expected a float > 0, "
            "float('inf') for no clipping, or None)"
        )
    return float(value)


class ClippingMixin:
    """The clipping side of ``FloraOptimizer`` (see the module docstring)."""

    _copied_attrs = ("max_grad_norm", "_clip_called", "_warned_unclipped")

    def _init_clipping(self, max_grad_norm: object) -> None:
        self.max_grad_norm = check_max_grad_norm(max_grad_norm)
        self._clip_called = False  # clip_grad_norm_() since the last step()
        self._warned_unclipped = False
        name = type(self).__name__
        if self.layerwise and self.accumulation_steps == 1 and self._clips_in_step:
            raise ValueError(
                f"{name}(layerwise=True, max_grad_norm={self.max_grad_norm}) cannot "
                "clip: each update is applied inside backward, before the global "
                "gradient norm exists. Use accumulation_steps >= 2 (the updates "
                "then wait for step(), which clips) or layerwise=False"
            )
        if self.layerwise and self.max_grad_norm is None:
            self._warn_unclipped(
                f"{name}(layerwise=True) applies each update inside backward",
                stacklevel=5,  # the user's FloraAdam(...) / FloraAdafactor(...)
            )

    @property
    def _clips_in_step(self) -> bool:
        return self.max_grad_norm is not None and math.isfinite(self.max_grad_norm)

    def _warn_unclipped(self, why: str, stacklevel: int) -> None:
        """One warning per optimizer that no clipping can act (NOTE in the module)."""
        if self._warned_unclipped:
            return
        self._warned_unclipped = True
        name = type(self).__name__
        fix = (
            f"pass max_grad_norm=<norm> to {name}(...)"
            if self.accumulation_steps > 1
            else f"use {name}(..., accumulation_steps=2 or more, max_grad_norm="
            "<norm>) or layerwise=False"
        )
        warnings.warn(
            f"{why}, so torch.nn.utils.clip_grad_norm_ (and HF Trainer's "
            "max_grad_norm, accelerate's clip_grad_norm_) find no gradient and clip "
            f"nothing. To clip the global gradient norm, {fix}; pass "
            "max_grad_norm=float('inf') to declare that you do not clip.",
            UserWarning,
            stacklevel=stacklevel,
        )

    @torch.no_grad()
    def clip_grad_norm_(
        self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False
    ) -> torch.Tensor:
        """Clip the global norm of the gradient the next ``step()`` applies.

        ``torch.nn.utils.clip_grad_norm_`` for this optimizer's parameters (same
        arguments but ``parameters``, same scaling ``min(1, max_norm / (norm +
        1e-6))``), also where the hooks have consumed ``p.grad`` (τ > 1): there it
        scales the compressed accumulators, whose norm it computes exactly without
        a full-size gradient (NOTE [norm in r x r space]). Call it after the
        cycle's last backward and before ``step()``. With ``torch.amp.GradScaler``
        pass ``max_grad_norm=`` to the constructor instead (the accumulators are
        unscaled only inside ``step()``; ``step()`` raises otherwise).

        Returns:
            The norm before clipping (a float32 0-d tensor).
        """
        name = type(self).__name__
        if self.layerwise:
            raise RuntimeError(
                f"{name}(layerwise=True) applies its updates inside backward, before "
                "clip_grad_norm_() can run; pass max_grad_norm=<norm> (with "
                "accumulation_steps >= 2) to the constructor instead"
            )
        if float(norm_type) != 2.0:
            raise ValueError(
                f"{name}.clip_grad_norm_ supports norm_type=2 only, got {norm_type!r}"
            )
        if not float(max_norm) >= 0:
            raise ValueError(f"Invalid max_norm: {max_norm!r} (expected >= 0)")
        total = self._clip(float(max_norm), None, error_if_nonfinite)
        self._clip_called = self._uses_hooks
        return total

    def _clip_before_update(self, inv_scale: float | None) -> None:
        """``step()``'s clipping, before any update and after GradScaler's unscale."""
        called, self._clip_called = self._clip_called, False
        if called and inv_scale is not None:
            raise RuntimeError(
                f"clip_grad_norm_() clipped accumulators that torch.amp.GradScaler "
                f"had not unscaled; with GradScaler pass max_grad_norm=<norm> to "
                f"{type(self).__name__} (step() clips after unscaling)"
            )
        if self._clips_in_step:
            self._clip(self.max_grad_norm, inv_scale, False)
        elif (
            self.max_grad_norm is None
            and not called
            and self._uses_hooks
            and self._cycle_micro_steps > 0
        ):
            self._warn_unclipped(
                f"{type(self).__name__}(accumulation_steps="
                f"{self.accumulation_steps}) compresses and frees every gradient "
                "inside backward",
                stacklevel=6,  # the user's step() (through no_grad and torch's hooks)
            )

    def _clip(
        self, max_norm: float, inv_scale: float | None, error_if_nonfinite: bool
    ) -> torch.Tensor:
        if not self._uses_hooks:
            params = [p for g in self.param_groups for p in g["params"]]
            return torch.nn.utils.clip_grad_norm_(
                params, max_norm, error_if_nonfinite=error_if_nonfinite
            )
        squares, pending = [], []
        for group in self.param_groups:
            config = self._config(group)
            for p in group["params"]:
                if p.grad is not None:  # set by hand: folded in as step() would
                    micro_batches = max(1, self._cycle_micro_steps)
                    self._accumulate(p, config, micro_batches=micro_batches)
                state = self.state.get(p)
                if state and state.get("micro_step"):
                    steps = max(self._cycle_micro_steps, state["micro_step"])
                    with distributed.sharded_context(p):
                        squares.append(accumulated_square_norm(
                            state["acc"], state["count"], steps, plan=self._plans[p],
                            device=p.device,
                        ))  # fmt: skip
                    pending.append(state)
        if not squares:
            return torch.tensor(0.0)
        first = squares[0].device
        total = torch.stack([s.to(first) for s in squares]).sum().sqrt()
        if inv_scale is not None:
            total = total * inv_scale
        if error_if_nonfinite and not torch.isfinite(total):
            raise RuntimeError(
                "The total norm of order 2.0 for the accumulated gradients is "
                "non-finite, so it cannot be clipped. To disable this error and "
                "scale the gradients by the non-finite norm anyway, set "
                "error_if_nonfinite=False"
            )
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for state in pending:
            with distributed.sharded_context(state["acc"]):
                state["acc"].mul_(coef.to(state["acc"].device))
        return total
