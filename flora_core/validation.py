"""Hyper-parameter and gradient checks shared by every rule and adapter.

Each check returns its value when valid and raises an error that names the bad value
otherwise, so adapters validate eagerly at construction with one call each.

NOTE [non-finite gradients]: the core never inspects gradient values (that would
force a device sync every step and cannot be done inside traced code). NaN or Inf
gradients propagate into the optimizer state exactly as in torch Adam or optax; skip
such steps with the host's tool: ``torch.amp.GradScaler``,
``optax.apply_if_finite`` or Keras' ``LossScaleOptimizer``.
"""

from __future__ import annotations

import math
from typing import Any

from flora_core._xp import Namespace


def _is_real_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_lr(lr: Any) -> Any:
    """A float >= 0, or a schedule/array the adapter resolves (not checked here)."""
    if _is_real_number(lr) and not (lr >= 0 and math.isfinite(lr)):
        raise ValueError(f"Invalid learning rate: {lr} (expected a finite value >= 0)")
    return lr


def check_nonnegative(name: str, value: object) -> float:
    if not _is_real_number(value) or not (value >= 0 and math.isfinite(value)):  # type: ignore[operator, arg-type]
        raise ValueError(f"Invalid {name}: {value!r} (expected a finite float >= 0)")
    return float(value)  # type: ignore[arg-type]


def check_beta(name: str, value: object) -> float:
    if not _is_real_number(value) or not 0.0 <= value < 1.0:  # type: ignore[operator]
        raise ValueError(f"Invalid {name}: {value!r} (expected a float in [0, 1))")
    return float(value)  # type: ignore[arg-type]


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r} (expected an int >= 1)")
    return value


def check_nonnegative_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Invalid {name}: {value!r} (expected an int >= 0)")
    return value


def check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"Invalid {name}: {value!r} (expected True or False)")
    return value


def check_positive(name: str, value: object) -> float:
    if not _is_real_number(value) or not (value > 0 and math.isfinite(value)):  # type: ignore[operator, arg-type]
        raise ValueError(f"Invalid {name}: {value!r} (expected a finite float > 0)")
    return float(value)  # type: ignore[arg-type]


def check_gradient(grad: Any, *, xp: Namespace, name: str = "gradient") -> None:
    """Raise for complex or non-floating gradients (checks the dtype only)."""
    dtype = grad.dtype
    if xp.isdtype(dtype, "complex floating"):
        raise TypeError(f"Complex {name} of dtype {dtype} is not supported")
    if not xp.isdtype(dtype, "real floating"):
        raise TypeError(f"The {name} must be floating point, got dtype {dtype}")
