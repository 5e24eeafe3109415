"""Stacked plans: one rule call for B parameters equals B calls (NOTE [stacked plans])."""

from __future__ import annotations

import array_api_compat.numpy as xp
import numpy as np
import pytest

from flora_core import accumulation, policy, rng, rules

SHAPES = [(48, 40), (24, 56), (40,), (16, 4, 3, 3), (200, 130)]
INDICES = (0, 3, 7)


@pytest.mark.parametrize("draw", ["random_bits", "uniform", "rademacher", "gaussian"])
@pytest.mark.parametrize("step", [5, np.asarray(5, dtype=np.uint32)])  # host / traced
def test_stacked_streams_are_the_single_blocks(draw: str, step) -> None:
    fn = getattr(rng, draw)
    streams = (4, 9, 2**32 - 1)
    got = fn(2**40 + 3, step, streams, (5, 11), xp=np, offset=(1, 3))
    assert got.shape == (3, 5, 11)
    for b, stream in enumerate(streams):
        want = fn(2**40 + 3, 5, stream, (5, 11), xp=np, offset=(1, 3))
        np.testing.assert_array_equal(got[b].view(np.uint32), want.view(np.uint32))


def test_stacked_streams_are_checked() -> None:
    with pytest.raises(ValueError, match="Invalid stream: 4294967296"):
        rng.random_bits(0, 0, (1, 2**32), (2, 2), xp=np)


def test_stack_plans_refuses_different_plans() -> None:
    a = policy.plan((48, 40), 0, rank=6)
    b = policy.plan((48, 40), 1, rank=5)
    with pytest.raises(ValueError, match="Cannot stack plans of parameters 0 and 1"):
        policy.stack_plans([a, b])
    stacked = policy.stack_plans([a, policy.plan((48, 40), 4, rank=6)])
    assert stacked.batch == (2,) and stacked.stream(1) == (1, 17)
    assert [m.param_index for m in stacked.members] == [0, 4]


CONFIGS = [
    (
        rules.flora_adam,
        rules.flora_adam_init,
        rules.AdamConfig(kappa=2, weight_decay=0.1),
    ),
    (rules.flora_adam, rules.flora_adam_init, rules.AdamConfig(kappa=2, factored=True)),
    (
        rules.flora_adafactor,
        rules.flora_adafactor_init,
        rules.AdafactorConfig(
            kappa=2, min_dim_size_to_factor=16, weight_decay_rate=0.01
        ),
    ),
    (
        rules.flora_adafactor,
        rules.flora_adafactor_init,
        rules.AdafactorConfig(kappa=2, clip_after_momentum=False),
    ),
]


@pytest.mark.parametrize("traced", [False, True])
@pytest.mark.parametrize("config_index", range(len(CONFIGS)))
@pytest.mark.parametrize("shape", SHAPES)
def test_stacked_rule_equals_members(shape, config_index: int, traced: bool) -> None:
    rule, init, config = CONFIGS[config_index]
    plans = [policy.plan(shape, i, rank=6, seed=3) for i in INDICES]
    stacked = policy.stack_plans(plans)
    states = [init(p, config, xp=xp) for p in plans]
    together = init(stacked, config, xp=xp)
    if not traced:
        for state in [*states, together]:
            state["count"] = 0
    rs = np.random.default_rng(0)
    params = [rs.standard_normal(shape).astype(np.float32) for _ in plans]
    stacked_params = np.stack(params)
    for _ in range(5):  # two resamples at kappa = 2
        grads = [rs.standard_normal(shape).astype(np.float32) for _ in plans]
        for i, plan in enumerate(plans):
            update, states[i] = rule(grads[i], states[i], params[i], plan=plan,
                                     config=config, lr=0.01, xp=xp)  # fmt: skip
            params[i] = params[i] + update
        update, together = rule(np.stack(grads), together, stacked_params,
                                plan=stacked, config=config, lr=0.01, xp=xp)  # fmt: skip
        stacked_params = stacked_params + update
    for i in range(len(plans)):
        np.testing.assert_allclose(stacked_params[i], params[i], rtol=1e-5, atol=1e-6)
        for name, value in states[i].items():
            if name != "count":
                np.testing.assert_allclose(
                    together[name][i], value, rtol=1e-5, atol=1e-6
                )
    assert int(together["count"]) == 5


@pytest.mark.parametrize("shape", [(48, 40), (24, 56), (40,)])
def test_stacked_accumulation_equals_members(shape) -> None:
    plans = [policy.plan(shape, i, rank=6) for i in INDICES]
    stacked = policy.stack_plans(plans)
    rs = np.random.default_rng(1)
    grads = [
        [rs.standard_normal(shape).astype(np.float32) for _ in plans] for _ in range(3)
    ]
    acc = np.zeros(accumulation.accumulator_shape(stacked), np.float32)
    for micro in grads:
        acc = accumulation.accumulate(acc, np.stack(micro), 4, plan=stacked, xp=xp)
    mean = accumulation.accumulated_gradient(acc, 4, 3, plan=stacked, xp=xp)
    for i, plan in enumerate(plans):
        one = np.zeros(accumulation.accumulator_shape(plan), np.float32)
        for micro in grads:
            one = accumulation.accumulate(one, micro[i], 4, plan=plan, xp=xp)
        want = accumulation.accumulated_gradient(one, 4, 3, plan=plan, xp=xp)
        np.testing.assert_allclose(mean[i], want, rtol=1e-5, atol=1e-6)
