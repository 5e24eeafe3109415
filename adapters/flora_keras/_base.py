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

NOTE [accumulation as Keras']: with ``accumulation_steps`` a Flora optimizer follows
Keras' own ``gradient_accumulation_steps``: ``_iterations`` counts calls
(micro-batches; learning-rate schedules read it) and ``iterations`` the updates
applied (``_iterations // τ``), which the EMA reads; a weight marked
``overwrite_with_gradient`` (float8 scales) keeps the cycle's element-wise maximum
and is written on the applied step; and ``clipnorm`` / ``clipvalue`` /
``global_clipnorm`` clip the accumulated mean, the gradient the update uses, not each
micro-batch. The global norm of the means is computed from the compressed
accumulators in ``r x r`` space (``flora_core.accumulation.accumulated_square_norm``),
so nothing full-size is held for it.
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
        self._overwrite_slots = {}
        for index, (variable, plan, config) in enumerate(
            zip(var_list, self._plans, self._configs, strict=True)
        ):
            if self._overwrite_variable_with_gradient(variable):
                # No Flora state; under accumulation, the cycle's maximum (Keras').
                self._slots.append(None)
                if self._accumulating:
                    self._overwrite_slots[index] = self.add_variable(
                        shape=tuple(variable.shape),
                        dtype=variable.dtype,
                        name=f"{_prefix(variable)}_overwrite_acc",
                    )
                continue
            shapes = {
                name: tuple(value.shape)
                for name, value in self._init(plan, config, xp=np_xp).items()
                if name != "count"
            }
            if self._accumulating:
                shapes["acc"] = accumulation.accumulator_shape(plan)
            self._slots.append(
                {
                    name: self.add_variable(
                        shape=shape, dtype="float32", name=f"{_prefix(variable)}_{name}"
                    )
                    for name, shape in shapes.items()
                }
            )

    @property
    def _accumulating(self) -> bool:
        steps = getattr(self, "accumulation_steps", None)
        return bool(steps) and steps > 1

    @property
    def iterations(self) -> Any:
        """Updates applied: with ``accumulation_steps = τ``, ``_iterations // τ``
        (``_iterations`` counts calls), as Keras' own gradient accumulation counts
        (NOTE [accumulation as Keras'])."""
        if self._accumulating:
            return ops.floor_divide(self._iterations, self.accumulation_steps)
        return self._iterations

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

    def _clip_gradients(self, grads: Any) -> Any:
        # Accumulating, the mean is clipped in update_step (NOTE [accumulation as
        # Keras']); Keras calls this on each micro-batch's gradients.
        if self._accumulating:
            return grads
        return super()._clip_gradients(grads)

    def _overwrite_variables_directly_with_gradients(
        self, grads: Any, variables: Any
    ) -> tuple[Any, Any]:
        if not self._accumulating or not any(
            self._overwrite_variable_with_gradient(v) for v in variables
        ):
            return super()._overwrite_variables_directly_with_gradients(
                grads, variables
            )
        # NOTE [accumulation as Keras']: the cycle's element-wise maximum, written on
        # the applied step.
        emit = ops.equal((self._iterations + 1) % self.accumulation_steps, 0)
        kept_grads, kept_variables = [], []
        for grad, variable in zip(grads, variables, strict=True):
            if not self._overwrite_variable_with_gradient(variable):
                kept_grads.append(grad)
                kept_variables.append(variable)
                continue
            acc = self._overwrite_slots[self._get_variable_index(variable)]
            largest = ops.maximum(ops.cast(grad, acc.dtype), ops.convert_to_tensor(acc))
            variable.assign(ops.where(emit, largest, ops.convert_to_tensor(variable)))
            acc.assign(ops.where(emit, ops.zeros_like(largest), largest))
        return kept_grads, kept_variables

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
        self._accumulated = None
        try:
            if self._accumulating and self.global_clipnorm:
                self._accumulated = self._accumulate_all(grads, variables)
            super()._backend_update_step(grads, variables, learning_rate)
        finally:
            self._eager_step = None
            self._accumulated = None

    def _step(self) -> Any:
        step = getattr(self, "_eager_step", None)
        return ops.convert_to_tensor(self._iterations) if step is None else step

    def _core(self, index: int, grad: Any) -> dict[str, Any]:
        backend = keras.backend.backend()
        return {
            "plan": self._plans[index],
            "xp": _namespace(backend),
            "device": _xp.device_of(grad) if backend == "torch" else None,
        }

    def _accumulate_all(self, grads: Any, variables: Any) -> dict[str, Any]:
        """Every weight's new accumulator, and the scale that clips the means to
        ``global_clipnorm`` (Keras' ``clip_by_global_norm``, on the means)."""
        backend = keras.backend.backend()
        tau, step = self.accumulation_steps, self._step()
        cycle = step // tau
        # Eager torch knows whether this call emits; traced code computes it anyway.
        emits = not isinstance(step, int) or step % tau == tau - 1
        sums, squares = {}, []
        for grad, variable in zip(grads, variables, strict=True):
            index = self._get_variable_index(variable)
            grad = _dense(grad, backend)
            core = self._core(index, grad)
            acc = ops.convert_to_tensor(self._slots[index]["acc"])
            sums[index] = accumulation.accumulate(acc, grad, cycle, **core)
            if emits:
                squares.append(
                    accumulation.accumulated_square_norm(sums[index], cycle, **core)
                )
        if not squares:
            return {"sums": sums, "scale": None}
        norm = ops.sqrt(sum(squares[1:], squares[0])) / tau
        clip = self.global_clipnorm
        scale = clip * ops.minimum(1.0 / norm, 1.0 / clip) + (norm - norm)
        return {"sums": sums, "scale": scale}

    def _clipped_mean(self, mean: Any) -> Any:
        """The accumulated mean clipped as Keras clips gradients."""
        if self.clipnorm and self.clipnorm > 0:
            return self._clip_by_norm(mean)
        if self.global_clipnorm and self.global_clipnorm > 0:
            return mean * ops.cast(self._accumulated["scale"], mean.dtype)  # type: ignore[index]
        if self.clipvalue and self.clipvalue > 0:
            return ops.clip(mean, -self.clipvalue, self.clipvalue)
        return mean

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """One call of the core rule for ``variable``; results assigned to slots."""
        index = self._get_variable_index(variable)
        slots = self._slots[index]
        grad = _dense(gradient, keras.backend.backend())
        core = self._core(index, grad)
        lr = ops.cast(learning_rate, "float32")
        step = self._step()
        if not self._accumulating:
            self._apply_rule(grad, variable, index, step, lr, core)
            return
        # NOTE [gated accumulation] (module docstring).
        tau = self.accumulation_steps
        cycle = step // tau
        accumulated = getattr(self, "_accumulated", None)
        if accumulated is not None:
            acc = accumulated["sums"][index]
        else:
            acc = accumulation.accumulate(
                ops.convert_to_tensor(slots["acc"]), grad, cycle, **core
            )
        mean = accumulation.accumulated_gradient
        if isinstance(step, int):
            if step % tau == tau - 1:
                grad = self._clipped_mean(mean(acc, cycle, tau, **core))
                self._apply_rule(grad, variable, index, cycle, lr, core)
                acc = ops.zeros_like(acc)
            self.assign(slots["acc"], acc)
            return
        emit = ops.equal(step % tau, tau - 1)
        grad = self._clipped_mean(mean(acc, cycle, tau, **core))
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

    def load_own_variables(self, store: Any) -> None:
        """Keras' restore (``load_model``, ``load_weights``), then the range checks
        of ``import_state`` (docs/spec.md §5.6): a negative ``iterations``, a
        non-finite or negative statistic is refused, naming it."""
        super().load_own_variables(store)
        if self.built:
            from flora_keras.checkpoint import check_restored

            check_restored(self)

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


def _prefix(variable: Any) -> str:
    return str(getattr(variable, "path", variable.name)).replace("/", "_")


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
