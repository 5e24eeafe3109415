"""Parameter intake: torch's ``(name, tensor)`` pairs and checks made before planning.

``torch.optim.Optimizer.add_param_group`` accepts ``model.named_parameters()`` (torch
2.6+): the names go to the group's ``param_names`` (kept in ``state_dict``) and the
group keeps the tensors. ``FloraOptimizer`` plans every parameter *before* the base
class sees the group, so it splits the pairs and checks the tensors itself, with
torch's own errors and messages, first.
"""

from __future__ import annotations

from typing import Any

import torch

# Settings of the whole optimizer: a param group cannot change them.
OPTIMIZER_LEVEL = (
    "accumulation_steps", "layerwise", "max_grad_norm", "foreach", "capturable",
)  # fmt: skip


def split_names(params: list[Any]) -> tuple[list[Any], list[str] | None]:
    """``(tensors, names)`` of a group's params; ``names`` is None when unnamed.

    Raises ``ValueError`` (torch's message) for a mix of named and unnamed
    parameters, and ``TypeError`` (torch's message) for anything not a tensor.
    """
    names = [p[0] for p in params if isinstance(p, tuple)]
    if names and len(names) != len(params):
        raise ValueError(
            "all optimizer params should be with/without names. "
            "Some param names are missing"
        )
    tensors = [p[1] for p in params] if names else params
    for p in tensors:
        if not isinstance(p, torch.Tensor):
            raise TypeError(
                "optimizer can only optimize Tensors, but one of the params is "
                + torch.typename(p)
            )
    return tensors, (names or None)


def check_group_keys(param_group: dict[str, Any], optimizer: str) -> None:
    """A group may not carry an optimizer-level setting (it would be ignored)."""
    for key in OPTIMIZER_LEVEL:
        if key in param_group:
            raise ValueError(
                f"{key} is a setting of the whole {optimizer}, not of a param group; "
                f"pass it to {optimizer}(...) instead"
            )
