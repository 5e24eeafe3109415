"""The portable Flora state (DESIGN §5) of a Keras optimizer: export and import.

``model.save`` / ``keras.models.load_model`` already restore a Flora optimizer on the
same backend (its slots are ordinary optimizer variables). These two functions move
the state between frameworks: ``export_state`` gives ``flora_core.state``'s flat
``param.{i}.{field}`` arrays (savable as npz or safetensors) that flora_torch and
flora_optax read, and ``import_state`` loads such arrays into a built optimizer.

Keras keeps one counter of calls per optimizer (``_iterations``; ``iterations`` is
``_iterations // τ``, the updates applied), so ``count`` and ``micro_step`` are
exported for every weight from it (``count = _iterations // τ``, ``micro_step =
_iterations % τ``), and an imported state must have one count.

Example:
    >>> import keras, numpy as np
    >>> from flora_keras import FloraAdam, export_state, import_state
    >>> w = keras.Variable(np.ones((64, 48), "float32"))
    >>> opt = FloraAdam(kappa=2)
    >>> _ = opt.apply_gradients([(np.ones((64, 48), "float32"), w)])
    >>> flat = export_state(opt)
    >>> int(flat["param.0.count"]), flat["param.0.mu"].shape
    (1, (64, 12))
    >>> other = FloraAdam(kappa=2)
    >>> other.build([w])
    >>> import_state(other, flat)
    >>> int(other.iterations)
    1
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from keras import ops

from flora_core import state as core_state
from flora_keras._base import FloraOptimizer


def _flora(optimizer: Any) -> FloraOptimizer:
    """The Flora optimizer itself, also when wrapped by a ``LossScaleOptimizer``."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if not isinstance(inner, FloraOptimizer):
        raise TypeError(f"Expected a Flora optimizer, got {type(optimizer).__name__}")
    if not inner.built:
        raise ValueError(
            f"{type(inner).__name__} is not built; call optimizer.build(variables)"
        )
    return inner


def _tau(optimizer: FloraOptimizer) -> int:
    return int(optimizer.accumulation_steps) if optimizer._accumulating else 1


def export_state(optimizer: Any) -> dict[str, np.ndarray]:
    """The flat portable state of a built Flora optimizer (numpy arrays)."""
    opt = _flora(optimizer)
    step, tau = int(ops.convert_to_numpy(opt._iterations)), _tau(opt)
    plans, states = [], []
    for plan, slots in zip(opt._plans, opt._slots, strict=True):
        if slots is None:  # a weight Keras overwrites with its gradient
            continue
        fields = {n: np.asarray(ops.convert_to_numpy(v)) for n, v in slots.items()}
        fields["count"] = np.asarray(step // tau, dtype=np.int64)
        if tau > 1:
            fields["micro_step"] = np.asarray(step % tau, dtype=np.int64)
        plans.append(plan)
        states.append(fields)
    return core_state.export_state(plans, states)


def import_state(optimizer: Any, flat: Mapping[str, Any]) -> None:
    """Load a flat portable state into a built Flora optimizer (checked first).

    Raises:
        ValueError: the state does not fit (format or RNG version, shapes, rank,
            axis, seed, distribution, state fields), or its weights have different
            update counts.
    """
    opt = _flora(optimizer)
    pairs = [
        (p, s) for p, s in zip(opt._plans, opt._slots, strict=True) if s is not None
    ]
    states = core_state.import_state(flat, [p for p, _ in pairs])
    tau = _tau(opt)
    counts = {int(s["count"]) for s in states}
    micro = {int(s.get("micro_step", 0)) for s in states}
    if len(counts) != 1 or len(micro) != 1:
        raise ValueError(
            f"The state's weights have different counts {sorted(counts)} or "
            f"micro_steps {sorted(micro)}; a Keras optimizer has one counter"
        )
    micro_step = micro.pop()
    if micro_step >= tau:
        raise ValueError(
            f"The state is at micro_step {micro_step} of an accumulation cycle but "
            f"the optimizer has accumulation_steps={opt.accumulation_steps}"
        )
    for (plan, slots), fields in zip(pairs, states, strict=True):
        missing = [n for n in slots if n not in fields and n != "acc"]
        unused = [n for n in fields if n not in slots and n not in _IGNORABLE]
        if missing or unused:
            raise ValueError(
                f"Parameter {plan.param_index}: the state has fields {sorted(fields)}"
                f" but the optimizer needs {sorted(slots)}"
            )
    for (_, slots), fields in zip(pairs, states, strict=True):
        for name, variable in slots.items():
            value = fields.get(name)
            variable.assign(np.zeros(variable.shape) if value is None else value)
    for accumulator in opt._overwrite_slots.values():  # the cycle restarts for them
        accumulator.assign(np.zeros(accumulator.shape))
    opt._iterations.assign(counts.pop() * tau + micro_step)


_IGNORABLE = ("count", "micro_step", "acc")
