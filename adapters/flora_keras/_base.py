"""``FloraOptimizer``: the Keras glue shared by FloraAdam and FloraAdafactor.

A subclass names its pure update rule and state initialiser from ``flora_core.rules``
and holds its validated config; this class does the rest in Keras' idiom:

* ``build(var_list)`` asks ``flora_core.policy.plan`` about every weight, in the
  order of ``var_list`` (the weight's ``param_index`` and hence its RNG streams), and
  creates one float32 slot per state array the core's initialiser returns (``mu``
  compressed, ``nu`` or ``nu_row``/``nu_col``) plus ``acc`` when accumulating.
* ``update_step`` reads the slots as backend tensors, calls the core rule with the
  backend's namespace and assigns the results. Nothing here does optimizer math.

NOTE [stateless randomness]: the projections are a pure function of
``(seed, param_index, count)``, with ``count`` read from ``self.iterations`` at
every update (a tensor in traced code, a Python int in eager torch: NOTE [eager
count]), so they advance under JAX's stateless ``fit`` (where a ``SeedGenerator``
held by the optimizer would not) and inside ``tf.function``.

NOTE [gated accumulation]: with ``accumulation_steps = τ`` every call accumulates and
also evaluates the update from the running sum; ``where(emit, new, old)`` keeps the
weights and moments unchanged except on the τ-th call. No value-dependent branch, so
the same code runs eagerly, under ``jit`` and inside ``tf.function``.
"""

from __future__ import annotations

import functools
from typing import Any

import array_api_compat.numpy as np_xp
import keras
from keras import ops

from flora_core import _xp, accumulation, policy, rng
from flora_core.projection import check_transfer
from flora_core.validation import check_lr, check_positive_int


def _check_accumulation_steps(steps: object) -> int | None:
    if steps is None:
        return None
    return check_positive_int("accumulation_steps", steps)


class FloraOptimizer(keras.optimizers.Optimizer):
    """Base class; see :class:`flora_keras.FloraAdam` for the public arguments."""

    # Subclasses: staticmethod(flora_core.rules.flora_adam) and its *_init, etc.
    _rule: Any = None
    _init: Any = None

    def __init__(
        self,
        learning_rate: Any,
        *,
        rank: int | str | None,
        kappa: int,
        transfer: str,
        seed: int,
        projection: str,
        accumulation_steps: int | None,
        **kwargs: Any,
    ) -> None:
        keras_steps = kwargs.pop("gradient_accumulation_steps", None)
        if keras_steps is not None:
            raise ValueError(
                f"Invalid gradient_accumulation_steps: {keras_steps!r}. Flora "
                "optimizers accumulate in compressed slots; pass "
                f"accumulation_steps={keras_steps!r} instead (Keras' "
                "gradient_accumulation_steps allocates a full-size accumulator "
                "per weight)."
            )
        check_lr(learning_rate)
        policy.check_rank(rank)
        check_positive_int("kappa", kappa)
        check_transfer(transfer)
        rng.check_seed(seed)
        policy.check_distribution(projection)
        _check_accumulation_steps(accumulation_steps)
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.rank = rank
        self.kappa = kappa
        self.transfer = transfer
        self.seed = int(seed)
        self.projection = projection
        self.accumulation_steps = accumulation_steps

    # ----------------------------------------------------------------- building

    def _config_for(self, variable: Any) -> Any:
        """The core config of one weight (subclasses drop excluded weight decay)."""
        raise NotImplementedError

    def build(self, var_list: list[Any]) -> None:
        """Plan every weight and create its (compressed) state slots."""
        if self.built:
            return
        super().build(var_list)
        self._plans = [
            policy.plan(
                tuple(v.shape),
                i,
                rank=self.rank,
                seed=self.seed,
                distribution=self.projection,
            )
            for i, v in enumerate(var_list)
        ]
        self._configs = [self._config_for(v) for v in var_list]
        self._slots = []
        for variable, plan, config in zip(
            var_list, self._plans, self._configs, strict=True
        ):
            if self._overwrite_variable_with_gradient(variable):
                self._slots.append(None)
                continue
            shapes = {
                name: tuple(value.shape)
                for name, value in self._init(plan, config, xp=np_xp).items()
                if name != "count"
            }
            if self._accumulating:
                shapes["acc"] = accumulation.accumulator_shape(plan)
            prefix = str(getattr(variable, "path", variable.name)).replace("/", "_")
            self._slots.append(
                {
                    name: self.add_variable(
                        shape=shape, dtype="float32", name=f"{prefix}_{name}"
                    )
                    for name, shape in shapes.items()
                }
            )

    @property
    def _accumulating(self) -> bool:
        return bool(self.accumulation_steps) and self.accumulation_steps > 1

    @property
    def plans(self) -> list[policy.CompressionPlan]:
        """The compression plan of every weight, in ``param_index`` order."""
        if not self.built:
            raise ValueError(f"{type(self).__name__} is not built yet")
        return list(self._plans)

    # ------------------------------------------------------------------ updating

    def _apply_weight_decay(self, variables: Any) -> None:
        # Decoupled weight decay is part of the core rule (gated with accumulation);
        # Keras' own pre-update decay must not run a second time.
        return None

    def _backend_update_step(
        self, grads: Any, variables: Any, learning_rate: Any
    ) -> None:
        if keras.backend.backend() == "torch":
            import torch

            # Under Keras' jit_compile=True (torch.compile) the model's step is
            # compiled and the optimizer update runs eagerly (NOTE [eager count]).
            update = torch.compiler.disable(self._update_all)
            update(grads, variables, learning_rate)
        else:
            self._update_all(grads, variables, learning_rate)

    def _update_all(self, grads: Any, variables: Any, learning_rate: Any) -> None:
        # NOTE [eager count]: eager torch reads the counter once per apply as a
        # Python int, so the core takes Python branches (no where-gated transfer
        # or update on micro-steps); traced code keeps it a tensor.
        self._eager_step = _eager_step(self._iterations)
        try:
            super()._backend_update_step(grads, variables, learning_rate)
        finally:
            self._eager_step = None

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """One call of the core rule for ``variable``; results assigned to slots."""
        index = self._get_variable_index(variable)
        slots = self._slots[index]
        backend = keras.backend.backend()
        grad = _dense(gradient, backend)
        core = {
            "plan": self._plans[index],
            "xp": _namespace(backend),
            "device": _xp.device_of(grad) if backend == "torch" else None,
        }
        lr = ops.cast(learning_rate, "float32")
        step = getattr(self, "_eager_step", None)
        if step is None:
            step = ops.convert_to_tensor(self._iterations)
        if not self._accumulating:
            self._apply_rule(grad, variable, index, step, lr, core)
            return
        # NOTE [gated accumulation] (module docstring).
        tau = self.accumulation_steps
        cycle = step // tau
        acc = accumulation.accumulate(
            ops.convert_to_tensor(slots["acc"]), grad, cycle, **core
        )
        mean = accumulation.accumulated_gradient
        if isinstance(step, int):
            if step % tau == tau - 1:
                grad = mean(acc, cycle, tau, **core)
                self._apply_rule(grad, variable, index, cycle, lr, core)
                acc = ops.zeros_like(acc)
            self.assign(slots["acc"], acc)
            return
        emit = ops.equal(step % tau, tau - 1)
        grad = mean(acc, cycle, tau, **core)
        self._apply_rule(grad, variable, index, cycle, lr, core, emit)
        self.assign(slots["acc"], ops.where(emit, ops.zeros_like(acc), acc))

    def _apply_rule(
        self, grad: Any, variable: Any, index: int, count: Any, lr: Any,
        core: dict[str, Any], emit: Any = None,
    ) -> None:  # fmt: skip
        """The core rule on one weight; with ``emit``, results kept only where true."""
        slots = self._slots[index]
        state = {n: ops.convert_to_tensor(v) for n, v in slots.items() if n != "acc"}
        param = ops.convert_to_tensor(variable)
        update, new = self._rule(
            grad,
            {"count": count, **state},
            param,
            config=self._configs[index],
            lr=lr,
            **core,
        )
        new_param = param + ops.cast(update, variable.dtype)
        if emit is not None:
            new_param = ops.where(emit, new_param, param)
            new = {n: ops.where(emit, new[n], state[n]) for n in state}
        self.assign(variable, new_param)
        for name in state:
            self.assign(slots[name], new[name])

    # ------------------------------------------------------------- serializing

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "rank": self.rank,
                "kappa": self.kappa,
                "transfer": self.transfer,
                "seed": self.seed,
                "projection": self.projection,
                "accumulation_steps": self.accumulation_steps,
            }
        )
        return config


@functools.cache
def _namespace(backend: str) -> Any:
    """The core's namespace for a Keras backend (resolved once: no imports in
    traced code)."""
    return _xp.namespace_for(backend)


def _eager_step(iterations: Any) -> int | None:
    """The counter as a Python int in eager torch (see NOTE [eager count]), else None."""
    if keras.backend.backend() != "torch":
        return None
    return int(iterations.value)


def _dense(gradient: Any, backend: str) -> Any:
    """The gradient as a dense tensor (TensorFlow gives embeddings IndexedSlices)."""
    if backend == "tensorflow":
        import tensorflow as tf

        if isinstance(gradient, tf.IndexedSlices):
            return tf.convert_to_tensor(gradient)
    return ops.convert_to_tensor(gradient)
