"""Registers ``flora_optax`` with the conformance suite (see ``registry``).

Gradients come from ``jax.grad`` of the linear loss ``sum_i sum(p_i * g_i)``; each
step is jitted; accumulation problems (``accumulation_steps > 1``) run through
:func:`flora_optax.flora_multi_steps`. Identity-mode problems are checked against
``optax.adamw`` / ``optax.adam`` and ``optax.adafactor(momentum=0.9, ...)``.
"""

from __future__ import annotations

from typing import Any

import flora_optax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from conformance.optax_reference import adafactor_official_order
from conformance.problems import Problem
from conformance.registry import AdapterEntry, Trajectory, register
from flora_core import rules


def flora_transformation(problem: Problem) -> optax.GradientTransformation:
    """The flora_optax optimizer that ``problem`` describes."""
    config = problem.config()
    flora = dict(
        rank=problem.rank, seed=problem.seed, projection=problem.projection,
        kappa=problem.kappa, axis=problem.axis,
    )  # fmt: skip
    if isinstance(config, rules.AdamConfig):
        tx = flora_optax.flora_adam(
            problem.lr, config.b1, config.b2, config.eps, config.weight_decay,
            factored=config.factored, second_moment=config.second_moment,
            transfer=config.transfer, **flora,
        )  # fmt: skip
    else:
        tx = flora_optax.flora_adafactor(
            **_adafactor_args(problem, config), transfer=config.transfer,
            clip_after_momentum=config.clip_after_momentum, **flora,
        )  # fmt: skip
    if problem.accumulation_steps > 1:
        del flora["kappa"]
        tx = flora_optax.flora_multi_steps(tx, problem.accumulation_steps, **flora)
    return tx


def reference_transformation(problem: Problem) -> optax.GradientTransformation:
    """optax's own optimizer for an identity-mode ``problem``."""
    config = problem.config()
    if isinstance(config, rules.AdamConfig):
        if config.weight_decay:
            return optax.adamw(
                problem.lr, config.b1, config.b2, config.eps,
                weight_decay=config.weight_decay,
            )  # fmt: skip
        return optax.adam(problem.lr, config.b1, config.b2, config.eps)
    if config.clip_after_momentum and config.momentum is not None:
        return adafactor_official_order(problem.lr, config)
    return optax.adafactor(**_adafactor_args(problem, config))


def _adafactor_args(problem: Problem, config: rules.AdafactorConfig) -> dict[str, Any]:
    return dict(
        learning_rate=problem.lr, min_dim_size_to_factor=config.min_dim_size_to_factor,
        decay_rate=config.decay_rate, decay_offset=config.decay_offset,
        multiply_by_parameter_scale=config.multiply_by_parameter_scale,
        clipping_threshold=config.clipping_threshold, momentum=config.momentum,
        weight_decay_rate=config.weight_decay_rate, eps=config.eps,
        factored=config.factored,
    )  # fmt: skip


def _linear_loss(params: list[jax.Array], grads: list[jax.Array]) -> jax.Array:
    return sum(jnp.sum(p * g) for p, g in zip(params, grads, strict=True))


def train(problem: Problem, tx: optax.GradientTransformation) -> Trajectory:
    """Run ``problem`` with ``tx``: jitted steps, ``jax.grad`` gradients."""

    @jax.jit
    def step(params: list, state: Any, batch: list) -> tuple[list, Any]:
        grads = jax.grad(_linear_loss)(params, batch)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = [jnp.asarray(p) for p in problem.initial_params()]
    state = tx.init(params)
    trajectory = []
    for micro_batches in problem.grads():
        for batch in micro_batches:
            params, state = step(params, state, [jnp.asarray(g) for g in batch])
        trajectory.append([np.asarray(p) for p in params])
    return trajectory


def run(problem: Problem) -> Trajectory:
    return train(problem, flora_transformation(problem))


def run_reference(problem: Problem) -> Trajectory:
    return train(problem, reference_transformation(problem))


def supports(problem: Problem) -> bool:
    """Every problem but Keras' epsilon (flora_adam takes optax's eps)."""
    return not problem.eps_before_bias_correction


register(AdapterEntry("optax", run, run_reference, supports))
