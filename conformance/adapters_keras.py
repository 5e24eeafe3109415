"""flora_keras in the conformance registry, on the Keras backend of this process.

``run`` trains a problem with ``flora_keras.FloraAdam`` / ``FloraAdafactor`` the way
``fit`` does on the current backend: gradients of the linear loss
``sum_i sum(p_i * g_i)`` (exactly ``g_i``) from the backend's own autodiff, applied
by the optimizer inside ``tf.function`` (TensorFlow), inside ``jax.jit`` through
``stateless_apply`` (JAX, as the JAX trainer does) or eagerly under ``no_grad``
(torch). Accumulation problems make ``τ`` calls per update with the optimizer's
compressed ``accumulation_steps``.

FloraAdam takes Keras' epsilon, added to ``sqrt(v)`` before the bias correction
(``eps_before_bias_correction=True`` in the core, NOTE [epsilon placement]), so
against the reference it solves every ``adam`` problem with that convention
(``solves``). The committed vectors use the core's default; on their problems
(``eps = 1e-8``, ``|g| >= 0.5``) the two differ by < 1e-6 relative.

``run_reference`` is ``keras.optimizers.AdamW`` for ``adam`` identity problems.
Keras has no faithful Adafactor
reference: ``keras.optimizers.Adafactor`` has no momentum, always factors the last
two axes and keeps a full-size velocity, so ``adafactor`` identity problems are
skipped here (the oracle comparison still covers FloraAdafactor's identity mode,
and ``tests/keras`` checks the momentum-free case against Keras' Adafactor).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flora_keras
import keras
import numpy as np
import pytest

from conformance.problems import Problem
from conformance.registry import AdapterEntry, Trajectory, register


def flora_optimizer(problem: Problem) -> keras.optimizers.Optimizer:
    """The Flora optimizer a problem describes (the oracle's hyper-parameters)."""
    config = problem.config()
    common: dict[str, Any] = {
        "learning_rate": problem.lr,
        "rank": problem.rank,
        "kappa": problem.kappa,
        "seed": problem.seed,
        "projection": problem.projection,
        "accumulation_steps": problem.accumulation_steps,
    }
    if problem.rule == "adam":
        return flora_keras.FloraAdam(
            beta_1=config.b1,
            beta_2=config.b2,
            epsilon=config.eps,
            factored=config.factored,
            second_moment=config.second_moment,
            transfer=config.transfer,
            weight_decay=config.weight_decay or None,
            **common,
        )
    return flora_keras.FloraAdafactor(
        momentum=config.momentum,
        decay_rate=config.decay_rate,
        decay_offset=config.decay_offset,
        min_dim_size_to_factor=config.min_dim_size_to_factor,
        clipping_threshold=config.clipping_threshold,
        multiply_by_parameter_scale=config.multiply_by_parameter_scale,
        weight_decay_rate=config.weight_decay_rate,
        eps=config.eps,
        factored=config.factored,
        transfer=config.transfer,
        clip_after_momentum=config.clip_after_momentum,
        **common,
    )


def make_step(
    optimizer: keras.optimizers.Optimizer, variables: Sequence[keras.Variable]
) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    """``step(g)``: one backward of the linear loss and one ``apply``; new params."""
    backend = keras.backend.backend()
    variables = list(variables)
    optimizer.build(variables)
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        def loss(params: list[Any], g: list[Any]) -> Any:
            return sum(jnp.sum(p * gi) for p, gi in zip(params, g, strict=True))

        @jax.jit
        def jax_step(params: list[Any], opt_values: list[Any], g: list[Any]) -> Any:
            grads = jax.grad(loss)(params, g)
            return optimizer.stateless_apply(opt_values, grads, params)

        values = [[v.value for v in variables], [v.value for v in optimizer.variables]]

        def step(g: list[np.ndarray]) -> list[np.ndarray]:
            values[0], values[1] = jax_step(values[0], values[1], g)
            return [np.asarray(p) for p in values[0]]

        return step
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function
        def tf_step(g: list[Any]) -> None:
            with tf.GradientTape() as tape:
                loss = tf.add_n(
                    [
                        tf.reduce_sum(v.value * gi)
                        for v, gi in zip(variables, g, strict=True)
                    ]
                )
            grads = tape.gradient(loss, [v.value for v in variables])
            optimizer.apply_gradients(zip(grads, variables, strict=True))

        def step(g: list[np.ndarray]) -> list[np.ndarray]:
            tf_step([tf.constant(gi) for gi in g])
            return [keras.ops.convert_to_numpy(v) for v in variables]

        return step
    import torch

    def step(g: list[np.ndarray]) -> list[np.ndarray]:
        params = [v.value for v in variables]
        loss = sum(
            torch.sum(p * torch.from_numpy(gi)) for p, gi in zip(params, g, strict=True)
        )
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            optimizer.apply_gradients(zip(grads, variables, strict=True))
        return [v.value.detach().cpu().numpy().copy() for v in variables]

    return step


def train(problem: Problem, optimizer: keras.optimizers.Optimizer) -> Trajectory:
    """Parameters after every update of ``problem`` trained with ``optimizer``."""
    variables = [keras.Variable(p) for p in problem.initial_params()]
    step = make_step(optimizer, variables)
    trajectory = []
    for micro_batches in problem.grads():
        for g in micro_batches:
            params = step(g)
        trajectory.append([np.array(p, dtype=np.float32) for p in params])
    return trajectory


def run(problem: Problem) -> Trajectory:
    return train(problem, flora_optimizer(problem))


def run_reference(problem: Problem) -> Trajectory:
    """Keras' own AdamW on an ``adam`` identity problem (see the module docstring)."""
    if problem.rule != "adam" or problem.accumulation_steps != 1:
        pytest.skip(
            "keras.optimizers.Adafactor has no momentum and factors differently; "
            "no faithful Keras reference for FloraAdafactor"
        )
    config = problem.config()
    reference = keras.optimizers.AdamW(
        learning_rate=problem.lr,
        beta_1=config.b1,
        beta_2=config.b2,
        epsilon=config.eps,
        weight_decay=config.weight_decay,
    )
    return train(problem, reference)


def supports(problem: Problem) -> bool:
    """Every problem but those forcing the compressed axis: ``flora_keras`` has no
    ``axis`` option (it always compresses the policy's default axis, spec §1.1)."""
    return problem.axis is None


def solves(problem: Problem) -> Problem:
    """The problem with Keras' epsilon convention (see the module docstring)."""
    if problem.rule != "adam":
        return problem
    return dataclasses.replace(problem, eps_before_bias_correction=True)


ENTRY = register(AdapterEntry("keras", run, run_reference, supports, solves=solves))
