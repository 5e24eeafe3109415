"""The portable Flora state (docs/spec.md §5) of a Keras optimizer: export and import.

``model.save`` / ``keras.models.load_model`` already restore a Flora optimizer on the
same backend (its slots are ordinary optimizer variables). These two functions move
the state between frameworks: ``export_state`` gives ``flora_core.state``'s flat
format 2 (the ``param.{i}.{field}`` arrays, the plans' metadata, a header and a
checksum) that flora_torch and flora_optax read, and writes it atomically to a
``.npz`` / ``.safetensors`` path when given one; ``import_state`` loads such arrays,
or such a file read bounded by the optimizer's layout, into a built optimizer.

The header holds what the optimizer knows: its rule (``"adam"`` / ``"adafactor"``),
each weight's core config (``beta_1`` is the config's ``b1``, ...), τ
(``accumulation_steps``, 1 without) and each weight's ``path`` as its name (without
Keras' ``_1``, ``_2`` suffixes, which change when a model is built again). Import
refuses, naming the field, the file's value and the optimizer's (``kappa: file 1000,
optimizer 10``), what the optimizer would misread (docs/spec.md §5.6).

Keras keeps one counter of calls per optimizer (``_iterations``; ``iterations`` is
``_iterations // τ``, the updates applied), so ``count`` and ``micro_step`` are
exported for every weight from it (``count = _iterations // τ``, ``micro_step =
_iterations % τ``), and an imported state must have one count (range-checked by the
core: ``0 <= count < 2**31``, ``0 <= micro_step < τ``).

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

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import keras
import numpy as np
from keras import ops

from flora_core import state as core_state
from flora_core import state_files
from flora_keras._base import FloraOptimizer

Source = Mapping[str, Any] | str | os.PathLike[str]


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


def _kind(optimizer: FloraOptimizer) -> str:
    from flora_keras.adafactor import FloraAdafactor
    from flora_keras.adam import FloraAdam

    for cls, kind in ((FloraAdam, "adam"), (FloraAdafactor, "adafactor")):
        if isinstance(optimizer, cls):
            return kind
    raise TypeError(f"No portable state for {type(optimizer).__name__}")


def _weights(opt: FloraOptimizer) -> list[tuple[Any, Any, Any, dict[str, Any]]]:
    """``(plan, config, variable, slots)`` of every weight with a Flora state (not
    those Keras overwrites with their gradient)."""
    return [
        (plan, config, variable, slots)
        for plan, config, variable, slots in zip(
            opt._plans, opt._configs, opt._trainable_variables, opt._slots, strict=True
        )
        if slots is not None
    ]


def _name(variable: Any) -> str:
    """The variable's ``path`` without Keras' uniquifying suffixes: the same model
    built again in one process is ``sequential_1/dense_2/kernel`` where the saved
    one was ``sequential/dense/kernel``. So a kernel and a bias, or two layers of
    other kinds, are told apart; two auto-named layers of one kind by order only."""
    path = str(getattr(variable, "path", variable.name))
    return "/".join(re.sub(r"_\d+$", "", part) for part in path.split("/"))


def state_header(optimizer: Any) -> core_state.Header:
    """What gives a built Flora optimizer's state its meaning (docs/spec.md §5.3):
    its rule, each weight's config and ``path``, τ."""
    opt = _flora(optimizer)
    weights = _weights(opt)
    return core_state.Header(
        _kind(opt),
        tuple(dataclasses.asdict(config) for _, config, _, _ in weights),
        _tau(opt),
        tuple(_name(v) for _, _, v, _ in weights),
        f"keras-{keras.backend.backend()}",
    )


def export_state(
    optimizer: Any, path: str | os.PathLike[str] | None = None
) -> dict[str, np.ndarray]:
    """The flat portable state (format 2) of a built Flora optimizer, also written
    to ``path`` (``.npz`` / ``.safetensors``, atomically) when given."""
    opt = _flora(optimizer)
    step, tau = int(ops.convert_to_numpy(opt._iterations)), _tau(opt)
    plans, states = [], []
    for plan, _, _, slots in _weights(opt):
        fields = {n: np.asarray(ops.convert_to_numpy(v)) for n, v in slots.items()}
        fields["count"] = np.asarray(step // tau, dtype=np.int64)
        if tau > 1:
            fields["micro_step"] = np.asarray(step % tau, dtype=np.int64)
        plans.append(plan)
        states.append(fields)
    flat = core_state.export_state(plans, states, state_header(opt))
    if path is not None:
        state_files.save_state(flat, path)
    return flat


def import_state(optimizer: Any, source: Source) -> None:
    """Load a portable state into a built Flora optimizer (checked first): a flat
    mapping or a ``.npz`` / ``.safetensors`` path (read bounded by the optimizer's
    layout).

    Raises:
        ValueError: naming the field, the file's value and the optimizer's
            (docs/spec.md §5.6): the format or checksum, the rule or a
            hyper-parameter that changes the state's meaning, τ (a ``micro_step``
            not below ``accumulation_steps``, or a partial cycle into an optimizer
            without accumulation), a weight's path, shape, rank, axis, seed or
            distribution, a missing or unexpected field, a counter out of range,
            a non-finite or negative statistic; or the weights' counts differ.
    """
    opt = _flora(optimizer)
    weights = _weights(opt)
    plans = [plan for plan, _, _, _ in weights]
    if isinstance(source, str | os.PathLike):
        shapes = [
            {n: tuple(v.shape) for n, v in slots.items()} for _, _, _, slots in weights
        ]
        source = state_files.load_state(
            source, like=core_state.layout_for(plans, shapes)
        )
    states = core_state.import_state(source, plans, state_header(opt))
    tau = _tau(opt)
    counts = {int(s["count"]) for s in states}
    micro = {int(s.get("micro_step", 0)) for s in states}
    if len(counts) != 1 or len(micro) != 1:
        raise ValueError(
            f"The state's weights have different counts {sorted(counts)} or "
            f"micro_steps {sorted(micro)}; a Keras optimizer has one counter"
        )
    for (plan, _, _, slots), fields in zip(weights, states, strict=True):
        missing = [n for n in slots if n not in fields and n != "acc"]
        unused = [n for n in fields if n not in slots and n not in _IGNORABLE]
        if missing or unused:
            raise ValueError(
                f"Parameter {plan.param_index}: the state has fields {sorted(fields)}"
                f" but the optimizer needs {sorted(slots)}"
            )
    for (_, _, _, slots), fields in zip(weights, states, strict=True):
        for name, variable in slots.items():
            value = fields.get(name)
            variable.assign(np.zeros(variable.shape) if value is None else value)
    for accumulator in opt._overwrite_slots.values():  # the cycle restarts for them
        accumulator.assign(np.zeros(accumulator.shape))
    opt._iterations.assign(counts.pop() * tau + micro.pop())


_IGNORABLE = ("count", "micro_step", "acc")


def check_restored(optimizer: FloraOptimizer) -> None:
    """The range checks of :func:`import_state` on a state Keras restored itself
    (``load_own_variables``): ``iterations`` >= 0, each weight's statistics finite
    and its second moments non-negative."""
    step, tau = int(ops.convert_to_numpy(optimizer._iterations)), _tau(optimizer)
    if step < 0:
        raise ValueError(f"iterations: the restored counter is negative ({step})")
    for plan, _, _, slots in _weights(optimizer):
        fields = {n: np.asarray(ops.convert_to_numpy(v)) for n, v in slots.items()}
        fields["count"] = np.asarray(step // tau, dtype=np.int64)
        if tau > 1:
            fields["micro_step"] = np.asarray(step % tau, dtype=np.int64)
        core_state.check_values(fields, plan, tau)
