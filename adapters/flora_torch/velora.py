"""VeLoRA for torch: a linear layer that keeps rank-1 sub-token projections.

``VeLoRALinearFunction`` computes ``y = x Wᵀ + b`` and saves for backward only
``z = group(x) · v`` (one scalar per sub-token of size M), the weight (a parameter,
not an activation) and ``v``. Backward rebuilds ``x̂ = ungroup(z vᵀ)`` and returns
``∂W = ∂yᵀ x̂`` (summed over all leading axes), ``∂b = Σ ∂y`` and the exact
``∂x = ∂y W``. The math is ``flora_core.velora``; this module is plumbing.

``VeLoRALinear`` swaps in for an ``nn.Linear`` and shares its Parameters (state-dict
keys and optimizers keep working); ``apply_velora`` swaps the layers of a model by
name. Works with ``torch.utils.checkpoint``, ``torch.compile`` and PEFT LoRA.

Example:
    >>> import torch
    >>> from flora_torch.velora import apply_velora
    >>> model = torch.nn.Sequential()
    >>> model.add_module("v_proj", torch.nn.Linear(64, 64))
    >>> apply_velora(model, group_size=16)
    ['v_proj']
    >>> model(torch.randn(2, 5, 64)).sum().backward()
    >>> model.v_proj.v.shape
    torch.Size([16])

References:
    Miles et al., "VeLoRA: Memory Efficient Training using Rank-1 Sub-Token
    Projections", NeurIPS 2024 (Algorithm 1; value and down projections, §4).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flora_core import velora
from flora_core._xp import namespace_for

_XP = namespace_for("torch")

#: The paper's layers (§4, Table 6): the value projection and the MLP down projection,
#: named as in LLaMA / Mistral / Qwen. On a PEFT LoRA model these names belong to the
#: LoRA wrapper, so the pattern also matches its input adapter ``<name>.lora_A.<key>``
#: (the layer that keeps the activation; the frozen base layer keeps none).
DEFAULT_TARGETS: tuple[str, ...] = (r"(^|\.)(v_proj|down_proj)(\.lora_A\.[^.]+)?$",)

#: The same choice for other naming schemes (only ``nn.Linear`` layers are swapped:
#: HF GPT-2 uses ``Conv1D`` with a fused ``c_attn`` and ``mlp.c_proj``, which this
#: adapter does not handle; convert them to ``nn.Linear`` first).
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "llama": DEFAULT_TARGETS,
    "bert": (r"attention\.self\.value$", r"layer\.\d+\.output\.dense$"),
    "gpt_neox": (r"mlp\.dense_4h_to_h$",),  # q, k, v are fused in query_key_value
}


class VeLoRALinearFunction(torch.autograd.Function):
    """``y = x Wᵀ + b`` that saves ``z = group(x) · v`` instead of ``x``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        v: torch.Tensor,
        group_size: int,
    ) -> torch.Tensor:
        needs_x, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # A frozen weight needs no activation at all, like F.linear.
        z = velora.compress(x, v, group_size, xp=_XP) if needs_w else None
        ctx.save_for_backward(z, weight if needs_x else None, v if needs_w else None)
        ctx.group_size = group_size
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        ctx.b_dtype = None if bias is None else bias.dtype
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        z, weight, v = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        rows = grad_y.reshape(-1, grad_y.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = torch.matmul(grad_y, weight.to(grad_y.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            x_hat = velora.reconstruct(z, v, ctx.group_size, xp=_XP)
            x_rows = x_hat.reshape(-1, x_hat.shape[-1]).to(grad_y.dtype)
            grad_w = torch.matmul(rows.t(), x_rows).to(ctx.w_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = rows.sum(dim=0).to(ctx.b_dtype)
        return grad_x, grad_w, grad_b, None, None


def velora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    v: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """Functional VeLoRA linear layer (``F.linear`` layout: weight is ``(out, in)``)."""
    velora.check_features(x.shape[-1], group_size)
    return VeLoRALinearFunction.apply(x, weight, bias, v.detach(), group_size)


class VeLoRALinear(nn.Linear):
    """An ``nn.Linear`` whose backward uses rank-1 sub-token projections of its input.

    It shares ``weight`` and ``bias`` with the layer it replaces, so state-dict keys
    are unchanged apart from the new buffer ``v`` (a checkpoint without ``v`` loads,
    and ``v`` is then initialised from the next training batch). In training mode with
    grad enabled, ``v`` is set from the first batch (``init="mean"``, the paper's
    default) and then fixed; ``init="running"`` moves it each batch with ``momentum``
    (not during a checkpoint's recomputation); ``init="random"`` draws it at
    construction from FLORA-RNG (``seed``, ``stream``). In eval mode or under
    ``torch.no_grad`` the layer is a plain ``F.linear``.

    Args:
        linear: the ``nn.Linear`` to wrap.
        group_size: the sub-token size M (must divide ``in_features``).
        init: ``"mean"``, ``"random"`` or ``"running"``.
        momentum: running-average β for ``init="running"``.
        seed: seed for ``init="random"``.
        stream: stream for ``init="random"`` (``apply_velora`` uses the layer index).
    """

    def __init__(
        self,
        linear: nn.Linear,
        group_size: int = 32,
        *,
        init: str = "mean",
        momentum: float = 0.99,
        seed: int = 0,
        stream: int = 0,
    ) -> None:
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"VeLoRALinear wraps an nn.Linear, got {type(linear)!r}")
        if init not in velora.INITS:
            raise ValueError(f"Invalid init: {init!r} (expected one of {velora.INITS})")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"Invalid momentum: {momentum!r} (expected [0, 1])")
        velora.check_features(linear.in_features, group_size)
        nn.Module.__init__(self)  # not nn.Linear.__init__: no new parameters
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.group_size, self.init, self.momentum = int(group_size), init, momentum
        w = linear.weight
        if init == "random":
            v = velora.init_v_random(seed, group_size, stream=stream, xp=_XP)
            v = v.to(device=w.device)
        else:
            v = torch.zeros(group_size, device=w.device)
        self.register_buffer("v", v.to(w.dtype if w.is_floating_point() else v.dtype))
        self.v_ready = init == "random"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return F.linear(x, self.weight, self.bias)
        if not self.v_ready or self.init == "running":
            self._update_v(x.detach())
        return velora_linear(x, self.weight, self.bias, self.v, self.group_size)

    @torch.compiler.disable  # runs once (or once a batch): keep it out of graphs
    @torch.no_grad()
    def _update_v(self, x: torch.Tensor) -> None:
        if not self.v_ready:
            new = velora.init_v_mean(x, self.group_size)
        elif _recomputing():  # a checkpoint re-running forward: v moved already
            return
        else:
            new = velora.update_v_running(self.v, x, self.group_size, self.momentum)
        self.v.copy_(new)
        self.v_ready = True

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        key = prefix + "v"
        present = key in state_dict
        super()._load_from_state_dict(state_dict, prefix, *args)
        missing_keys = args[2]
        if present:  # an all-zero v was saved before the first training batch
            self.v_ready = bool(torch.any(self.v != 0))
        elif key in missing_keys:  # a plain nn.Linear checkpoint
            missing_keys.remove(key)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}, init={self.init}"


def _recomputing() -> bool:
    """Whether autograd is running a backward (a checkpoint recomputes in there)."""
    return torch._C._current_graph_task_id() != -1


def apply_velora(
    model: nn.Module,
    target_modules: Sequence[str | re.Pattern[str]] = DEFAULT_TARGETS,
    group_size: int = 32,
    *,
    init: str = "mean",
    momentum: float = 0.99,
    seed: int = 0,
) -> list[str]:
    """Replace the ``nn.Linear`` layers of ``model`` whose names match by VeLoRALinear.

    A layer matches when ``re.search(pattern, name)`` succeeds for one pattern, so a
    plain substring works too. Only ``nn.Linear`` layers are swapped.

    Args:
        model: the model, modified in place.
        target_modules: substrings or regexes; default ``DEFAULT_TARGETS`` (value and
            MLP down projections, LLaMA names; see ``TARGET_PRESETS``).
        group_size: the sub-token size M (must divide each layer's ``in_features``).
        init, momentum, seed: as in ``VeLoRALinear``.

    Returns:
        The qualified names of the replaced layers.
    """
    if isinstance(target_modules, str | re.Pattern):
        target_modules = (target_modules,)
    patterns = [re.compile(p) for p in target_modules]
    chosen = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and not isinstance(module, VeLoRALinear)
        and any(p.search(name) for p in patterns)
    ]
    if not chosen:
        raise ValueError(
            f"No nn.Linear matched target_modules={list(target_modules)!r} (only "
            "nn.Linear is handled; HF GPT-2's Conv1D layers are not)"
        )
    layers = {}
    for index, name in enumerate(chosen):  # build all first: a bad layer changes none
        try:
            layers[name] = VeLoRALinear(
                model.get_submodule(name),  # type: ignore[arg-type]
                group_size,
                init=init,
                momentum=momentum,
                seed=seed,
                stream=index,
            )
        except ValueError as err:
            raise ValueError(f"Cannot apply VeLoRA to {name!r}: {err}") from err
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
    return chosen
