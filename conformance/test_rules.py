"""Full update rules: every backend follows the oracle; identity mode equals the real
Adam / AdamW / Adafactor; nothing is mutated; compiled equals eager."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from conformance.make_vectors import load_oracle
from conformance.optax_reference import adafactor_official_order
from conformance.problems import PROBLEMS, Problem, oracle
from flora_core import policy, rules

RTOL, ATOL = 1e-4, 1e-5


def close(got, want, rtol=RTOL, atol=ATOL, label=""):
    for t, (gs, ws) in enumerate(zip(got, want, strict=True)):
        for i, (g, w) in enumerate(zip(gs, ws, strict=True)):
            np.testing.assert_allclose(
                g, w, rtol=rtol, atol=atol, err_msg=f"{label} t={t} i={i}"
            )


@pytest.mark.parametrize("traced", [False, True], ids=["python_count", "array_count"])
@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_core_follows_committed_oracle(backend, name, traced):
    got = oracle(PROBLEMS[name], traced_count=traced, backend=backend)
    close(got, load_oracle(name), label=name)


def numpy_adamw(problem: Problem) -> list[list[np.ndarray]]:
    """Textbook AdamW, independent of the core."""
    params = problem.initial_params()
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    out = []
    for t, micro in enumerate(problem.grads(), start=1):
        for i, g in enumerate(micro[0]):
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            step = (m[i] / (1 - 0.9**t)) / (np.sqrt(v[i] / (1 - 0.999**t)) + 1e-8)
            params[i] = params[i] - problem.lr * (
                step + problem.weight_decay * params[i]
            )
        out.append([p.copy() for p in params])
    return out


ADAM_IDENTITY = Problem(
    "adam_identity", "adam", projection="identity", weight_decay=0.01
)
ADAFACTOR_IDENTITY = Problem(
    "adafactor_identity", "adafactor", projection="identity", factored=True,
    clip_after_momentum=False,
)  # fmt: skip
ADAFACTOR_IDENTITY_OFFICIAL = Problem(
    "adafactor_identity_official", "adafactor", projection="identity", factored=True,
    weight_decay=0.01,
)  # fmt: skip


def test_identity_adam_equals_textbook_adamw():
    close(oracle(ADAM_IDENTITY), numpy_adamw(ADAM_IDENTITY), label="numpy AdamW")


def test_identity_adam_equals_torch_adamw():
    torch = pytest.importorskip("torch")
    params = [
        torch.nn.Parameter(torch.from_numpy(p)) for p in ADAM_IDENTITY.initial_params()
    ]
    opt = torch.optim.AdamW(
        params, lr=ADAM_IDENTITY.lr, weight_decay=ADAM_IDENTITY.weight_decay
    )
    out = []
    for micro in ADAM_IDENTITY.grads():
        for p, g in zip(params, micro[0], strict=True):
            p.grad = torch.from_numpy(g)
        opt.step()
        out.append([p.detach().numpy().copy() for p in params])
    close(oracle(ADAM_IDENTITY), out, label="torch.optim.AdamW")


@pytest.mark.parametrize(
    "problem",
    [ADAM_IDENTITY, ADAFACTOR_IDENTITY, ADAFACTOR_IDENTITY_OFFICIAL],
    ids=lambda p: p.name,
)
def test_identity_equals_optax(problem):
    if importlib.util.find_spec("optax") is None:
        pytest.skip("optax is not installed in this session")
    import jax.numpy as jnp
    import optax

    if problem.rule == "adam":
        tx = optax.adamw(problem.lr, weight_decay=problem.weight_decay)
    elif problem.clip_after_momentum:
        tx = adafactor_official_order(problem.lr, problem.config())
    else:
        tx = optax.adafactor(problem.lr, momentum=0.9, min_dim_size_to_factor=16)
    params = [jnp.asarray(p) for p in problem.initial_params()]
    state = tx.init(params)
    out = []
    for micro in problem.grads():
        updates, state = tx.update([jnp.asarray(g) for g in micro[0]], state, params)
        params = optax.apply_updates(params, updates)
        out.append([np.asarray(p) for p in params])
    close(oracle(problem), out, label=f"optax {problem.rule}")


@pytest.mark.parametrize("rank", [4, None], ids=["compressed", "uncompressed"])
@pytest.mark.parametrize("factored", [False, True], ids=["full_nu", "factored"])
@pytest.mark.parametrize("rule", ["adam", "adafactor", "adafactor_optax_order"])
def test_rules_never_mutate_inputs(rule, factored, rank):
    """Read-only numpy inputs and states: any in-place write would raise.

    The rules update their own temporaries in place (NOTE [lean temporaries]);
    uncompressed, the direction is the new moment itself, which must stay untouched.
    """
    import array_api_compat.numpy as xp

    plan = policy.plan((32, 24), 0, rank=rank, seed=1)
    config = (
        rules.AdamConfig(kappa=1, weight_decay=0.1, factored=factored)
        if rule == "adam"
        else rules.AdafactorConfig(
            kappa=1, factored=factored, min_dim_size_to_factor=8, weight_decay_rate=0.1,
            clip_after_momentum=rule == "adafactor",
        )
    )  # fmt: skip
    init = rules.flora_adam_init if rule == "adam" else rules.flora_adafactor_init
    step = rules.flora_adam if rule == "adam" else rules.flora_adafactor
    state = init(plan, config, xp=xp)
    rs = np.random.default_rng(0)
    param = rs.standard_normal((32, 24)).astype(np.float32)
    for t in range(3):
        grad = rs.standard_normal((32, 24)).astype(np.float32)
        for arr in (
            param,
            grad,
            *[v for v in state.values() if isinstance(v, np.ndarray)],
        ):
            arr.setflags(write=False)
        frozen = {k: np.array(v) for k, v in state.items()}
        update, new_state = step(
            grad, state, param, plan=plan, config=config, lr=0.1, xp=xp
        )
        for k, v in frozen.items():
            np.testing.assert_array_equal(state[k], v)
        assert int(new_state["count"]) == t + 1
        param, state = param + update, new_state


def test_compiled_rule_equals_eager(backend):
    if backend.name == "numpy":
        pytest.skip("numpy has no compiler")
    xp = backend.xp
    plan = policy.plan((40, 24), 0, rank=4, seed=1)
    config = rules.AdamConfig(kappa=2)
    rs = np.random.default_rng(0)
    param0 = rs.standard_normal((40, 24)).astype(np.float32)
    grads = [rs.choice([-1.0, 1.0], (40, 24)).astype(np.float32) for _ in range(5)]

    def step(grad, mu, nu, count, param):
        state = {"mu": mu, "nu": nu, "count": count}
        update, new = rules.flora_adam(
            grad, state, param, plan=plan, config=config, lr=0.01, xp=xp
        )
        return param + update, new["mu"], new["nu"], new["count"]

    results = []
    for fn in (step, backend.compile(step)):
        state = rules.flora_adam_init(plan, config, xp=xp)
        carry = (state["mu"], state["nu"], state["count"], backend.asarray(param0))
        for g in grads:
            param, *rest = fn(backend.asarray(g), *carry[:3], carry[3])
            carry = (*rest, param)
        results.append(backend.to_numpy(carry[3]))
    np.testing.assert_allclose(results[1], results[0], rtol=1e-5, atol=1e-6)
