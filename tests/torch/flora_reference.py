"""The reference the torch adapter is compared with: flora_core on numpy, one parameter
at a time (torch's "forloop" implementation, which its "foreach" path must equal).

It replays what ``FloraAdam`` / ``FloraAdafactor`` promise with the core's pure
functions only: the plan of each parameter from ``flora_core.policy``, lazy zero
state at the first gradient, FLORA's compressed accumulation (Algorithm 1) with the
cycle's micro-batch count as divisor (a gradient set by hand counts as all the
cycle's micro-batches), global-norm clipping of the *materialised* mean gradients
(``torch.nn.utils.clip_grad_norm_``'s formula), the rule, and ``p + update`` in the
parameter's dtype (through float32 for bfloat16 and float16).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from flora_torch import FloraAdafactor, FloraAdam

from flora_core import accumulation, policy, rules
from flora_core._xp import namespace_for

NP = namespace_for("numpy")
RULES = {
    FloraAdam: (rules.flora_adam_init, rules.flora_adam),
    FloraAdafactor: (rules.flora_adafactor_init, rules.flora_adafactor),
}


class CoreReference:
    """One param group of ``params`` under ``config`` and the group's settings."""

    def __init__(
        self, cls: type, params: list[torch.Tensor], group: dict[str, Any],
        config: Any, *, tau: int, max_grad_norm: float | None,
    ) -> None:  # fmt: skip
        self.init, self.rule = RULES[cls]
        self.params, self.group, self.config, self.tau = params, group, config, tau
        self.max_grad_norm = max_grad_norm
        self.plans = [
            policy.plan(
                tuple(p.shape),
                k,
                rank=group["rank"],
                seed=group["seed"],
                axis=group["axis"],
                distribution=group["projection"],
            )  # fmt: skip
            for k, p in enumerate(params)
        ]
        self.states: list[dict[str, Any] | None] = [None] * len(params)
        self.pending: list[Any] = [None] * len(params)  # τ = 1: this step's grad
        self.cycle = 0  # backward passes since the last step

    def _state(self, k: int) -> dict[str, Any]:
        if self.states[k] is None:
            state = self.init(self.plans[k], self.config, xp=NP)
            state["count"] = 0
            if self.tau > 1:
                state["acc"] = np.zeros(
                    accumulation.accumulator_shape(self.plans[k]), np.float32
                )
                state["micro_step"] = 0
            self.states[k] = state
        return self.states[k]

    def _add(self, k: int, grad: np.ndarray, micro_batches: int) -> None:
        state = self._state(k)
        state["acc"] = accumulation.accumulate(
            state["acc"], grad, state["count"], plan=self.plans[k], xp=NP
        )
        state["micro_step"] += micro_batches

    def backward(self, grads: list[torch.Tensor | None]) -> None:
        """One micro-batch's gradients (None where a parameter got none)."""
        self.cycle += 1
        for k, grad in enumerate(grads):
            if grad is None:
                continue
            g = grad.detach().double().clone().numpy()  # no alias: torch clips in place
            if self.tau > 1:
                self._add(k, g, 1)
            else:
                self.pending[k] = g if self.pending[k] is None else self.pending[k] + g

    def set_grad(self, k: int, grad: torch.Tensor) -> None:
        """A gradient set by hand (no backward reaches it)."""
        g = grad.detach().double().clone().numpy()  # no alias: torch clips in place
        if self.tau > 1:
            self._add(k, g, max(1, self.cycle))
        else:
            self.pending[k] = g

    def step(self) -> None:
        grads: list[np.ndarray | None] = []
        for k in range(len(self.params)):
            state = self.states[k]
            if self.tau > 1 and state is not None and state["micro_step"]:
                steps = max(self.cycle, state["micro_step"])
                grads.append(accumulation.accumulated_gradient(
                    state["acc"], state["count"], steps, plan=self.plans[k], xp=NP
                ))  # fmt: skip
                state["acc"] = np.zeros_like(state["acc"])
                state["micro_step"] = 0
            elif self.tau == 1 and self.pending[k] is not None:
                grads.append(torch.from_numpy(self.pending[k]).to(self.params[k].dtype))
            else:
                grads.append(None)
        if self.max_grad_norm is not None and math.isfinite(self.max_grad_norm):
            grads = self._clipped(grads)
        lr = float(self.group["lr"])
        for k, (p, grad) in enumerate(zip(self.params, grads, strict=True)):
            if grad is None:
                continue
            state = self._state(k)
            grad = grad.double().numpy() if torch.is_tensor(grad) else grad
            param = p.detach().double().numpy()
            update, new = self.rule(
                grad.astype(np.float32), state, param.astype(np.float32),
                plan=self.plans[k], config=self.config, lr=lr, xp=NP,
            )  # fmt: skip
            state.update(new)
            with torch.no_grad():
                if p.dtype in (torch.bfloat16, torch.float16):
                    p.copy_(p.float() + torch.from_numpy(np.asarray(update)))
                else:
                    p.add_(torch.from_numpy(np.asarray(update)).to(p.dtype))
        self.pending = [None] * len(self.params)
        self.cycle = 0

    def _clipped(self, grads: list[Any]) -> list[Any]:
        """``min(1, c / (norm + 1e-6))`` times every gradient, the norm global.

        τ = 1: ``p.grad`` in the parameter's dtype, clipped in that dtype as
        ``torch.nn.utils.clip_grad_norm_`` does; τ > 1: the materialised float32
        mean gradients, their norm in float64.
        """
        present = [g for g in grads if g is not None]
        if not present:
            return grads
        if self.tau == 1:
            norms = torch.stack([torch.linalg.vector_norm(g) for g in present])
            total = torch.linalg.vector_norm(norms)
            coef = torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)
            return [None if g is None else g * coef for g in grads]
        norm = math.sqrt(
            sum(float(np.sum(np.square(g, dtype=np.float64))) for g in present)
        )
        coef = min(1.0, self.max_grad_norm / (norm + 1e-6))
        return [None if g is None else g * np.float32(coef) for g in grads]
