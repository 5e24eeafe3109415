"""optax's generic optimizer tests, run over Flora's transformations.

Written for this project after reading google-deepmind/optax
``optax/_src/alias_test.py`` (its COMMON TESTS, which optax runs over every alias in
``_OPTIMIZERS_UNDER_TEST``) and ``optax/transforms/_accumulation_test.py`` (the
``MultiSteps`` tests, here over :func:`flora_optax.flora_multi_steps`). The inputs
(parabola, Rosenbrock, the ``[(2, 3), (2, 5, 2)]`` pytree, the ``[1, 2]`` vector, the
flax ``Dense(10)`` loss), step counts, tolerances and golden numbers are optax's; the
list of optimizers is Flora's. ``rank=1`` variants compress the host's own matrices.

Not applicable here, with the reason (nothing else is dropped):

- complex64 / complex128 parameters (``test_optimization``,
  ``test_state_shape_dtype_shard_stability``): Flora rejects complex gradients with a
  TypeError (``test_optax_validation.py``), as optax's fromage, lion, sm3, ... do.
- ``test_explicit_dtype`` (``mu_dtype`` / ``accumulator_dtype``): Flora keeps every
  state array in float32 whatever the params (docs/spec.md §0);
  ``test_state_stays_float32`` below checks that instead.
- ``test_ema``, ``test_ema_debias``, ``test_skip_not_finite``,
  ``test_skip_large_updates``: they test optax's own ``ema`` and ``skip_*`` helpers,
  not an optimizer (Flora's EMA is compared with ``optax.ema`` in
  ``test_optax_transformations.py``).
- ``test_multi_steps_skip_not_finite``: ``flora_multi_steps`` has no
  ``should_skip_update_fn``; a non-finite micro-batch reaches the compressed
  accumulator as it reaches optax's ``MultiSteps`` without that option.
- polyak_sgd's ``value`` and lbfgs's ``value_fn`` extra arguments: no Flora
  transformation takes them (extra arguments are accepted and ignored, see
  ``test_optimizers_accept_extra_args``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flora_optax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax_testing import log_compilations

flax_linen = pytest.importorskip("flax.linen")


def flora_sgd(
    learning_rate: float, momentum: float = 0.9, *, rank: Any = "auto", seed: int = 0
) -> optax.GradientTransformationExtraArgs:
    """SGD on FLORA's compressed momentum (``scale_by_flora_momentum``, then the
    learning rate): a factory, so ``inject_hyperparams`` can wrap it as optax's sgd."""
    return optax.chain(
        flora_optax.scale_by_flora_momentum(momentum, rank=rank, seed=seed),
        optax.scale_by_learning_rate(learning_rate),
    )


# optax's entries adam (1e-1), adamw (1e-1, its default weight_decay 1e-4),
# adafactor (5e-3 and none) and sgd with momentum, in Flora's form. The EMA momentum
# of flora_sgd is (1 - b1) times optax's trace, hence 1e-2 for optax's 1e-3.
OPTIMIZERS_UNDER_TEST = [
    ("flora_adam", {"learning_rate": 1e-1}),
    ("flora_adam", {"learning_rate": 1e-1, "weight_decay": 1e-4}),
    ("flora_adam", {"learning_rate": 1e-1, "factored": True}),
    ("flora_adafactor", {"learning_rate": 5e-3}),
    ("flora_adafactor", {}),
    ("flora_sgd", {"learning_rate": 1e-2, "momentum": 0.9}),
]
FACTORIES: dict[str, Callable[..., Any]] = {
    "flora_adam": flora_optax.flora_adam,
    "flora_adafactor": flora_optax.flora_adafactor,
    "flora_sgd": flora_sgd,
}
# What flora_optax's docstrings say must be static under inject_hyperparams when
# init is jitted: seed always (a uint64 key), flora_adam's b1, b2 and weight_decay
# (flora_core needs them as Python numbers), and what fixes the state's shapes: an
# int rank, flora_adafactor's min_dim_size_to_factor (as optax.adafactor's).
STATIC_UNDER_JIT = {
    "flora_adam": ("b1", "b2", "weight_decay", "seed"),
    "flora_adafactor": ("min_dim_size_to_factor", "seed"),
    "flora_sgd": ("seed",),
}


def _id(entry: tuple[str, dict[str, Any]]) -> str:
    name, kwargs = entry
    return name + "".join(f"-{k}={v}" for k, v in kwargs.items())


CASES = pytest.mark.parametrize("entry", OPTIMIZERS_UNDER_TEST, ids=_id)
RANKS = pytest.mark.parametrize("rank", ["auto", 1])


def _make(entry: tuple[str, dict[str, Any]], **extra: Any) -> Any:
    name, kwargs = entry
    return FACTORIES[name](**kwargs, **extra)


def _setup_parabola(dtype: Any) -> tuple[jax.Array, jax.Array, Callable]:
    initial_params = jnp.array([-1.0, 10.0, 1.0], dtype=dtype)
    final_params = jnp.array([1.0, -1.0, 1.0], dtype=dtype)

    def objective(params: jax.Array) -> jax.Array:
        return jnp.sum(jnp.abs(params - final_params) ** 2)

    return initial_params, final_params, objective


def _setup_rosenbrock(dtype: Any) -> tuple[jax.Array, jax.Array, Callable]:
    a, b = 1.0, 100.0
    initial_params = jnp.array([0.0, 0.0], dtype=dtype)
    final_params = jnp.array([a, a**2], dtype=dtype)

    def objective(params: jax.Array) -> jax.Array:
        return (
            jnp.abs(a - params[0]) ** 2 + b * jnp.abs(params[1] - params[0] ** 2) ** 2
        )

    return initial_params, final_params, objective


def _assert_trees_close(
    actual: Any, desired: Any, rtol: float, atol: float = 0.0
) -> None:
    flat_a, tree_a = jax.tree.flatten(actual)
    flat_d, tree_d = jax.tree.flatten(desired)
    assert tree_a == tree_d, f"different structures:\n{tree_a}\n{tree_d}"
    for x, y in zip(flat_a, flat_d, strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


# ----------------------------------------------------------------- alias_test.py


@CASES
@pytest.mark.parametrize("target", [_setup_parabola, _setup_rosenbrock],
                         ids=["parabola", "rosenbrock"])  # fmt: skip
def test_optimization(entry: Any, target: Callable) -> None:
    """map_params is a no-op, 10000 steps reach the optimum (rtol = atol = 3e-2)
    and the second jitted step does not recompile."""
    opt = _make(entry)
    initial_params, final_params, objective = target(jnp.float32)

    def body(params: jax.Array, state: Any) -> tuple[jax.Array, Any]:
        updates = jax.grad(objective)(params)
        updates, state = opt.update(updates, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(body)
    # Steps 2..9999 in one compiled loop: the same steps, without 10^4 dispatches.
    rest = jax.jit(
        lambda p, s: jax.lax.fori_loop(2, 10000, lambda _, ps: body(*ps), (p, s))
    )

    params = initial_params
    state = opt.init(params)
    state = optax.tree.map_params(opt, lambda v: v, state)  # a no-op change
    params, state = step(params, state)
    with log_compilations() as compilations:
        params, state = step(params, state)
    assert compilations == [], "recompiled on the second call to update"
    params, state = rest(params, state)
    reached = params

    params = initial_params
    state = opt.init(params)
    params, state = step(params, state)
    with log_compilations() as compilations:
        step(params, state)
    assert compilations == [], "recompiled on the second call to update"

    if entry[0] == "flora_adafactor" and entry[1].get("learning_rate") is None:
        pytest.skip("flora_adafactor needs a learning rate to converge (as optax's)")
    np.testing.assert_allclose(reached, final_params, rtol=3e-2, atol=3e-2)


@CASES
def test_optimizers_accept_extra_args(entry: Any) -> None:
    opt = _make(entry)  # deliberately not wrapped in with_extra_args_support
    initial_params, _, objective = _setup_rosenbrock(jnp.float32)

    @jax.jit
    def step(params: jax.Array, state: Any) -> tuple[jax.Array, Any]:
        updates = jax.grad(objective)(params)
        extra = {"unexpected_extra_args_your_optimizer_doesnt_expect": 1}
        updates, state = opt.update(updates, state, params, **extra)
        return optax.apply_updates(params, updates), state

    params, state = initial_params, opt.init(initial_params)
    for _ in range(2):
        params, state = step(params, state)
    assert bool(jnp.all(jnp.isfinite(params))) and not np.array_equal(
        params, initial_params
    )


def _inject_problem() -> tuple[list[jax.Array], list[jax.Array]]:
    params = [jnp.negative(jnp.ones((2, 3))), jnp.ones((2, 5, 2))]
    grads = [jnp.ones((2, 3)), jnp.negative(jnp.ones((2, 5, 2)))]
    return params, grads


@CASES
@RANKS
def test_optimizers_can_be_wrapped_in_inject_hyperparams(entry: Any, rank: Any) -> None:
    """jit(init) and jit(update) of the injected optimizer give the updates
    (rtol 1e-3) and the inner state (rtol 1e-4) of the plain one."""
    name, kwargs = entry
    opt = _make(entry, rank=rank)
    static = STATIC_UNDER_JIT[name] + (("rank",) if isinstance(rank, int) else ())
    inject = optax.inject_hyperparams(FACTORIES[name], static_args=static)
    opt_inject = inject(**kwargs, rank=rank)
    params, grads = _inject_problem()

    state = jax.jit(opt.init)(params)
    updates, new_state = jax.jit(opt.update)(grads, state, params)
    state_inject = jax.jit(opt_inject.init)(params)
    updates_inject, new_state_inject = jax.jit(opt_inject.update)(
        grads, state_inject, params
    )
    _assert_trees_close(updates_inject, updates, rtol=1e-3)
    _assert_trees_close(new_state_inject.inner_state, new_state, rtol=1e-4)
    if rank == 1:  # the host's (2, 3) and (2, 5, 2) matrices are compressed
        assert {p.rank for p in flora_optax.plans(new_state)} == {1}


@CASES
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_preserve_dtype(entry: Any, dtype: str) -> None:
    """Updates have the dtype of the gradients."""
    opt = _make(entry)
    fun = lambda x: jnp.sum(x**2)  # noqa: E731
    params = jnp.array([1.0, 2.0], dtype=jnp.dtype(dtype))
    grads = jax.grad(fun)(params)
    state = jax.jit(opt.init)(params)
    updates, _ = jax.jit(opt.update)(grads, state, params)
    assert updates.dtype == grads.dtype


@CASES
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_state_shape_dtype_shard_stability(entry: Any, dtype: str) -> None:
    """The updated state has the input state's shapes and dtypes: both may flow
    through one lax.cond (the host's way to defeat compiler shortcuts)."""
    with jax.enable_x64(dtype == "float64"):
        dtype_ = jnp.dtype(dtype)
        opt = _make(entry)
        initial_params, _, objective = _setup_parabola(dtype_)

        @jax.jit
        def step(params: jax.Array, state: Any) -> tuple[jax.Array, Any]:
            updates = jax.grad(objective)(params)
            cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
            updates, state = jax.lax.cond(
                cond,
                lambda: opt.update(updates, state, params),
                lambda: (params, state),
            )
            return optax.apply_updates(params, updates), state

        params, state = initial_params, opt.init(initial_params)
        for _ in range(2):
            params, new_state = step(params, state)
            assert jax.tree.leaves(params)[0].dtype == dtype_
            cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
            state = jax.lax.cond(cond, lambda s=state: s, lambda n=new_state: n)


@CASES
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gradient_accumulation(entry: Any, dtype: str) -> None:
    """Wrapped in optax.MultiSteps(every_k_schedule=4), the first update is zero."""
    opt = optax.MultiSteps(_make(entry), every_k_schedule=4)
    fun = lambda x: jnp.sum(x**2)  # noqa: E731
    params = jnp.array([1.0, 2.0], dtype=jnp.dtype(dtype))
    grads = jax.grad(fun)(params)
    state = jax.jit(opt.init)(params)
    updates, _ = jax.jit(opt.update)(grads, state, params)
    np.testing.assert_array_equal(updates, jnp.zeros_like(grads))
    assert updates.dtype == grads.dtype


@CASES
def test_state_stays_float32(entry: Any) -> None:
    """In place of optax's test_explicit_dtype: bf16 params, float32 state."""
    params = jnp.array([0.0, 0.0], dtype=jnp.bfloat16)
    state = _make(entry).init(params)
    dtypes = {x.dtype for x in jax.tree.leaves(state)}
    assert dtypes <= {jnp.dtype(jnp.int32), jnp.dtype(jnp.float32)}
    assert jnp.dtype(jnp.float32) in dtypes


# ----------------------------------------------------------- _accumulation_test.py


class Loss(flax_linen.Module):
    @flax_linen.compact
    def __call__(self, x: jax.Array, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32) -> jax.Array:  # fmt: skip
        return jnp.sum(
            flax_linen.Dense(10, dtype=dtype, param_dtype=param_dtype)(x) ** 2
        )


def _has_updated(state: flora_optax.FloraMultiStepsState) -> bool:
    """optax's MultiSteps.has_updated: the last call emitted an update."""
    return bool((state.micro_step == 0) & (state.count > 0))


@pytest.mark.parametrize("inner", ["adam_chain", "flora_adam"])
@RANKS
def test_multi_steps(inner: str, rank: Any) -> None:
    """Params change (and the loss drops) only every k-th step."""
    batch_size, x_size, k_steps = 32, 7, 4
    data = jnp.ones([batch_size, x_size])
    loss = Loss()
    params = loss.init({"params": jax.random.key(0)}, data)["params"]

    def loss_apply(params: Any, data: jax.Array) -> jax.Array:
        return loss.apply({"params": params}, data)

    # A non-trivial inner optimizer: it has a state and needs the params.
    inner_opt = (
        optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(1e-2),
                    optax.scale(-1e-4))
        if inner == "adam_chain"
        else flora_optax.flora_adam(1e-4, weight_decay=1e-2, rank=rank)
    )  # fmt: skip
    ms_opt = flora_optax.flora_multi_steps(inner_opt, k_steps, rank=rank)

    @jax.jit
    def train_step(data: jax.Array, opt_state: Any, params: Any) -> tuple[Any, Any]:
        grad = jax.grad(loss_apply)(params, data)
        return ms_opt.update(grad, opt_state, params)

    opt_state = ms_opt.init(params)
    prev_loss = loss_apply(params, data)
    for idx in range(5 * k_steps):
        updates, opt_state = train_step(data, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        new_loss = loss_apply(new_params, data)
        if idx % k_steps < k_steps - 1:
            jax.tree.map(np.testing.assert_array_equal, new_params, params)
            np.testing.assert_equal(np.asarray(new_loss), np.asarray(prev_loss))
            assert not _has_updated(opt_state)
        else:
            np.testing.assert_array_less(new_loss, prev_loss)
            prev_loss = new_loss
            assert _has_updated(opt_state)
        params = new_params


def test_multi_steps_every_k_schedule() -> None:
    ms_opt = flora_optax.flora_multi_steps(
        optax.sgd(1e-4), lambda grad_step: jnp.where(grad_step < 2, 1, 3)
    )
    update = jax.jit(ms_opt.update)
    params = {"a": jnp.zeros([])}
    opt_state = ms_opt.init(params)
    grad = {"a": jnp.zeros([])}
    assert not _has_updated(opt_state)
    for _ in range(2):  # one mini-step per update
        _, opt_state = update(grad, opt_state, params)
        assert _has_updated(opt_state)
    for _ in range(5):  # then three
        for _ in range(2):
            _, opt_state = update(grad, opt_state, params)
            assert not _has_updated(opt_state)
        _, opt_state = update(grad, opt_state, params)
        assert _has_updated(opt_state)


def test_multi_steps_scan_dtype_stability() -> None:
    """bf16 gradients do not promote the (float32) accumulator inside lax.scan."""
    ms_opt = flora_optax.flora_multi_steps(optax.sgd(1e-4), 2)
    params = {"a": jnp.zeros([], dtype=jnp.bfloat16)}

    def train_step(state: Any, _: Any) -> tuple[Any, Any]:
        grad = {"a": jnp.ones([], dtype=jnp.bfloat16)}
        updates, state = ms_opt.update(grad, state, params)
        return state, updates

    final_state, _ = jax.lax.scan(train_step, ms_opt.init(params), jnp.arange(4))
    assert final_state.acc["a"].dtype == jnp.float32


def test_multi_steps_zero_nans() -> None:
    """Composes with zero_nans inside (optax issue 828): a NaN micro-batch counts
    as zero in the mean."""
    ms_opt = flora_optax.flora_multi_steps(
        optax.chain(optax.zero_nans(), optax.sgd(1.0)), every_k_schedule=2
    )
    params = {"a": jnp.zeros([])}
    opt_state = ms_opt.init(params)
    _, opt_state = ms_opt.update({"a": jnp.zeros([])}, opt_state, params)
    updates, opt_state = ms_opt.update({"a": jnp.ones([])}, opt_state, params)
    np.testing.assert_array_equal(updates["a"], -0.5)
    assert int(opt_state.micro_step) == 0


def test_multi_steps_computes_mean() -> None:
    k_steps = 4
    ms_opt = flora_optax.flora_multi_steps(optax.scale(1.0), k_steps)
    params = {"a": jnp.zeros([])}
    opt_state = ms_opt.init(params)
    grads = [{"a": jnp.ones([]) * i} for i in [1, 2, 3, 4]]
    assert not _has_updated(opt_state)
    for grad in grads[:-1]:
        _, opt_state = ms_opt.update(grad, opt_state, params)
        assert not _has_updated(opt_state)
    new_params, opt_state = ms_opt.update(grads[-1], opt_state, params)
    assert _has_updated(opt_state)
    np.testing.assert_array_equal(new_params["a"], 2.5)


@pytest.mark.parametrize("inner", ["adam", "flora_adam"])
def test_multi_steps_mixed_precision(inner: str) -> None:
    """Updates of flora_multi_steps have the inner optimizer's dtypes, and applying
    them keeps the params' dtypes, for every (update, param) dtype pair."""
    batch_size, x_size, k_steps = 32, 7, 4
    data = jnp.ones([batch_size, x_size])
    loss = Loss()

    def loss_apply(params: Any, data: jax.Array) -> jax.Array:
        return loss.apply({"params": params}, data)

    opt = optax.adam(0.1) if inner == "adam" else flora_optax.flora_adam(0.1)
    ms_opt = flora_optax.flora_multi_steps(opt, k_steps)

    # Abstract evaluation (the host runs it eagerly): the test checks dtypes only,
    # and eval_shape gives the same dtypes without compiling or running anything.
    def train_step(data: jax.Array, opt_state: Any, params: Any, opt_update: Callable,
                   upd_dtype: Any) -> tuple[Any, Any]:  # fmt: skip
        def step(data: jax.Array, opt_state: Any, params: Any) -> tuple[Any, Any]:
            grad = jax.grad(loss_apply)(params, data)
            grad = jax.tree.map(lambda x: x.astype(upd_dtype), grad)
            return opt_update(grad, opt_state, params)

        return jax.eval_shape(step, data, opt_state, params)

    dtypes_of = functools.partial(jax.tree.map, lambda x: x.dtype)
    dtypes = [jnp.float32, jnp.float16, jnp.bfloat16]
    for upd_dtype in dtypes:
        for param_dtype in dtypes:
            data = data.astype(param_dtype)
            params = loss.init({"params": jax.random.key(0)}, data,
                               param_dtype=param_dtype)["params"]  # fmt: skip
            opt_state, ms_opt_state = opt.init(params), ms_opt.init(params)
            for _ in range(k_steps + 1):
                updates, opt_state = train_step(
                    data, opt_state, params, opt.update, upd_dtype
                )
                ms_updates, ms_opt_state = train_step(
                    data, ms_opt_state, params, ms_opt.update, upd_dtype
                )
                assert dtypes_of(updates) == dtypes_of(ms_updates), (
                    upd_dtype, param_dtype)  # fmt: skip
                new_params = jax.eval_shape(optax.apply_updates, params, ms_updates)
                assert dtypes_of(params) == dtypes_of(new_params)
                params = new_params
