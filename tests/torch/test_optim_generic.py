"""torch's generic optimizer checks, run over every flora_torch optimizer and option set.

Ported from pytorch/pytorch ``test/test_optim.py`` (``TestOptimRenewed``) and
``torch/testing/_internal/common_optimizers.py`` (``OptimizerInfo``, the error
inputs, the scheduler sets): the same behaviours, inputs and numbers, written for
the registry in ``optim_db.py`` (nothing copied). Each test names the torch test it
ports. A step of an option set with ``accumulation_steps=τ`` is τ backward passes
then ``step()``; the closures of torch's tests (``zero_grad``, forward, backward)
are called τ times.

Not applicable, with the reason (torch's tests that are not ported):

* ``test_complex``, ``test_complex_2d``: complex parameters raise (``ValueError``,
  checked in the error inputs); optimize their real view.
* ``test_rosenbrock_sparse``: sparse gradients raise (``test_optimizers.py``).
* ``test_fused_*``, ``test_cpu_load_state_dict``, ``test_fused_cpu_matches_cuda``,
  ``test_defaults_changed_to_foreach``, ``test_foreach_large_tensor``,
  ``test_peak_memory_foreach``, ``test_set_default_dtype_works_with_foreach``,
  ``test_mixed_device_dtype``: there is no ``fused`` or ``differentiable`` flag,
  and ``foreach`` / ``capturable`` choose Flora's grouped path and device counts,
  not torch's kernels (those tests check torch's fused and foreach kernels on
  CUDA). Each numeric path is compared with the core on numpy
  (``test_matches_core_reference``, in float64, float32, bfloat16 and float16), and
  ``test_foreach_matches_forloop`` (ported) compares ``foreach=True`` with
  ``foreach=False``; grouped against per-tensor over every dtype, axis and the
  conformance problems is ``test_grouped.py``.
* ``maximize``: not an option of these optimizers (maximise ``-loss``).
* ``test_second_order_optims_return_consistent_types``: ``step`` needs no closure.
* ``test_forloop_goes_right_direction_multigpu``,
  ``test_state_dict_with_cuda_params``: need (two) GPUs; the second is ported
  (``test_optim_generic_state.py``) and runs where CUDA is present.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import flora_reference as reference
import optim_db as db
import pytest
import torch

cases = pytest.mark.parametrize(("info", "inp"), db.CASES, ids=db.CASE_IDS)
infos = pytest.mark.parametrize("info", db.OPTIM_DB, ids=lambda i: i.name)
make, advance, quadratic, weight_bias = (
    db.make,
    db.advance,
    db.quadratic,
    db.weight_bias,
)


# ----------------------------------------------------------------------- registry
@infos
def test_optim_infos_do_not_specify_global_cliquey_kwargs(info: Any) -> None:
    flags = {"foreach", "fused", "differentiable"}
    for inp in info.inputs:
        assert not flags & set(inp.kwargs)
    accepted = set(inspect.signature(info.optim_cls).parameters)
    for flag in flags - accepted:  # one that is not a parameter is refused
        with pytest.raises(TypeError, match=flag):
            info.optim_cls([torch.nn.Parameter(torch.randn(2, 3))], **{flag: True})


@infos
def test_errors(info: Any) -> None:
    """torch's test_errors over get_error_inputs_for_all_optims and Flora's own."""
    for error in info.error_inputs:
        if issubclass(error.error_type, Warning):
            with pytest.warns(error.error_type, match=error.error_regex):
                info.optim_cls(error.params(), **error.kwargs)
        else:
            with pytest.raises(error.error_type, match=error.error_regex):
                info.optim_cls(error.params(), **error.kwargs)


# ------------------------------------------------------------------ directions
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("with_lrsched", [True, False])
@cases
def test_forloop_goes_right_direction(
    info: Any, inp: Any, contiguous: bool, with_lrsched: bool
) -> None:
    torch.manual_seed(0)
    for scheduler_set in info.scheduler_inputs if with_lrsched else [()]:
        weight, bias, x = weight_bias(contiguous)
        optimizer = make(info, inp, [weight, bias])
        schedulers = [make_scheduler(optimizer) for make_scheduler in scheduler_set]
        closure = functools.partial(quadratic, optimizer, weight, bias, x)
        initial = quadratic(optimizer, weight, bias, x, backward=False).item()
        for _ in range(20):
            advance(optimizer, inp, closure, schedulers)
        assert quadratic(optimizer, weight, bias, x, backward=False).item() < initial


@infos
def test_param_group_with_lrscheduler_goes_right_direction(info: Any) -> None:
    torch.manual_seed(0)
    inp = info.inputs[0]
    for scheduler_set in info.scheduler_inputs:
        weight, bias, x = weight_bias()
        optimizer = info.optim_cls(
            [{"params": [weight]}, {"params": [bias], "lr": 0.01}]
        )
        schedulers = [make_scheduler(optimizer) for make_scheduler in scheduler_set]
        closure = functools.partial(quadratic, optimizer, weight, bias, x)
        initial = quadratic(optimizer, weight, bias, x, backward=False).item()
        for _ in range(20):
            advance(optimizer, inp, closure, schedulers)
        assert quadratic(optimizer, weight, bias, x, backward=False).item() < initial


@cases
def test_tensor_lr(info: Any, inp: Any) -> None:
    torch.manual_seed(0)
    weight, bias, x = weight_bias()
    weight_c = weight.detach().clone().requires_grad_(True)
    bias_c = bias.detach().clone().requires_grad_(True)
    optimizer_r = make(info, inp, [weight, bias], lr=1e-3)
    optimizer = make(info, inp, [weight_c, bias_c], lr=torch.tensor(1e-3))
    for _ in range(5):
        advance(
            optimizer_r, inp, functools.partial(quadratic, optimizer_r, weight, bias, x)
        )
        advance(
            optimizer, inp, functools.partial(quadratic, optimizer, weight_c, bias_c, x)
        )
        torch.testing.assert_close(weight, weight_c)  # torch's float32 tolerance
        torch.testing.assert_close(bias, bias_c)


@cases
def test_param_groups_weight_decay(info: Any, inp: Any) -> None:
    torch.manual_seed(0)
    weight, bias, x = weight_bias()
    bias_kwargs = {**inp.group_kwargs, info.weight_decay_key: 0.0}
    optimizer = info.optim_cls(
        [{"params": [weight], **inp.group_kwargs}, {"params": [bias], **bias_kwargs}],
        **inp.optimizer_kwargs,
    )
    closure = functools.partial(quadratic, optimizer, weight, bias, x)
    initial = quadratic(optimizer, weight, bias, x, backward=False).item()
    for _ in range(20):
        loss = advance(optimizer, inp, closure)
    assert loss.item() < initial


@cases
def test_param_groups_lr(info: Any, inp: Any) -> None:
    torch.manual_seed(0)
    kwargs = inp.group_kwargs
    if "lr" not in kwargs or kwargs["lr"] == 0:
        kwargs["lr"] = 1e-3
    weight, bias, x = weight_bias()
    irrelevant = torch.nn.Parameter(torch.randn(2))
    irrelevant_clone = irrelevant.detach().clone()
    optimizer = info.optim_cls(
        [{"params": [weight, bias], **kwargs}, {"params": [irrelevant]}],
        lr=1e-28, **inp.optimizer_kwargs,
    )  # fmt: skip

    def closure() -> torch.Tensor:
        loss = quadratic(optimizer, weight, bias, x)
        irrelevant.grad = torch.rand_like(irrelevant)
        return loss

    initial = quadratic(optimizer, weight, bias, x, backward=False).item()
    for _ in range(20):
        loss = advance(optimizer, inp, closure)
    assert loss.item() < initial
    assert torch.equal(irrelevant, irrelevant_clone)  # lr 1e-28: not updated


# ------------------------------------------------------------ no-op steps, state
@cases
def test_step_is_noop_when_params_have_no_grad(info: Any, inp: Any) -> None:
    params = [torch.randn(2, 3, requires_grad=False) for _ in range(2)]
    old = [p.clone() for p in params]
    optimizer = make(info, inp, params)
    closure = None if inp.layerwise else (lambda: torch.tensor([1.0]))
    loss = optimizer.step(closure)  # layerwise=True takes no closure
    assert loss is None if closure is None else torch.equal(loss, torch.tensor([1.0]))
    for p, o in zip(params, old, strict=True):
        assert torch.equal(p, o)
    assert not optimizer.state


@cases
def test_step_is_noop_for_zero_grads(info: Any, inp: Any) -> None:
    if inp.kwargs.get(info.weight_decay_key):
        pytest.skip("params decay with weight decay even when their gradient is 0")
    param = torch.nn.Parameter(torch.randn(5, 1))
    old = param.detach().clone()
    optimizer = make(info, inp, [param])
    param.grad = torch.zeros_like(param)
    optimizer.step()
    assert torch.equal(param, old)
    assert optimizer.state[param]["count"] == 1  # a step was taken, of size 0


@cases
def test_optimizer_can_be_printed(info: Any, inp: Any) -> None:
    params = [torch.nn.Parameter(torch.randn(2, 3)) for _ in range(2)]
    text = repr(make(info, inp, params))
    assert text.startswith(f"{info.name} (") and "Parameter Group 0" in text
    assert "    rank: " in text and "    kappa: " in text


@cases
def test_non_empty_state(info: Any, inp: Any) -> None:
    model = torch.nn.Linear(5, 5)
    optimizer = make(info, inp, model.parameters())
    optimizer.zero_grad()
    model(torch.rand(2, 5)).sum().backward()
    optimizer.step()
    assert len(optimizer.state) == 2
    for state in optimizer.state.values():
        assert len(state) > 0 and state["count"] == 1


@pytest.mark.parametrize("set_to_none", [True, False])
@cases
def test_zero_grad(info: Any, inp: Any, set_to_none: bool) -> None:
    """zero_grad(set_to_none) empties .grad either way and changes no update."""
    torch.manual_seed(0)
    runs = []
    for none in (True, set_to_none):
        weight, bias, x = weight_bias()
        optimizer = make(info, inp, [weight, bias])
        for _ in range(3):
            advance(
                optimizer, inp, functools.partial(quadratic, optimizer, weight, bias, x)
            )
            optimizer.zero_grad(set_to_none=none)
            for p in (weight, bias):
                if none:
                    assert p.grad is None
                else:  # zeros, or None where the hooks consumed the gradient
                    assert p.grad is None or not p.grad.any()
        runs.append((weight.detach(), bias.detach()))
        torch.manual_seed(0)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------ numeric paths against each other
def sigmoid_mlp(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1),
        torch.nn.Sigmoid(),
    )  # fmt: skip
    return model.to(dtype)


class AdapterSide:
    """torch's model, a 0-d parameter, and a flora_torch optimizer over them."""

    def __init__(self, info: Any, inp: Any, dtype: torch.dtype, **kwargs: Any):
        self.model = sigmoid_mlp(dtype)
        torch.manual_seed(2)
        self.params = [*self.model.parameters(), torch.rand((), dtype=dtype)]
        self.params[-1].requires_grad_()
        self.optimizer = make(info, inp, self.params, **kwargs)

    def backward(self, x: torch.Tensor) -> None:
        self.model(x).sum().backward()

    def set_grad(self, k: int, grad: torch.Tensor) -> None:
        self.params[k].grad = grad.clone()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def step(self) -> None:
        self.optimizer.step()

    def state(self, k: int) -> dict[str, Any]:
        return self.optimizer.state.get(self.params[k], {})


class ReferenceSide(AdapterSide):
    """The same, updated by flora_core on numpy (``flora_reference.py``)."""

    def __init__(self, info: Any, inp: Any, dtype: torch.dtype):
        super().__init__(info, inp, dtype)  # the optimizer only names the config
        group = self.optimizer.param_groups[0]
        self.ref = reference.CoreReference(
            info.optim_cls, self.params, group, self.optimizer._config(group),
            tau=inp.tau, max_grad_norm=inp.kwargs.get("max_grad_norm"),
        )  # fmt: skip
        self.optimizer = None  # its hooks stay inert: only the newest owns

    def backward(self, x: torch.Tensor) -> None:
        live = [p for p in self.params[:-1] if p.requires_grad]
        grads = iter(torch.autograd.grad(self.model(x).sum(), live))
        self.ref.backward(
            [next(grads) if p.requires_grad else None for p in self.params[:-1]]
            + [None]
        )

    def set_grad(self, k: int, grad: torch.Tensor) -> None:
        self.ref.set_grad(k, grad)

    def zero_grad(self) -> None:
        pass

    def step(self) -> None:
        self.ref.step()

    def state(self, k: int) -> dict[str, Any]:
        return {
            key: value if key in ("count", "micro_step") else torch.as_tensor(value)
            for key, value in (self.ref.states[k] or {}).items()
        }


def compare_between(inp: Any, dtype: torch.dtype, want: Any, got: Any) -> None:
    """torch's ``_compare_between``: its input and seven iterations, no backward at
    iteration 2, ``model[2]`` frozen at 3 and unfrozen at 5; params and every state
    field of ``want`` compared after each iteration (parameter dtype and float32:
    torch's default tolerances), then ``got`` re-aligned to ``want`` as torch's
    ``TensorTracker`` does. Unlike torch, whose ``zero_grad`` clears the 0-d
    parameter's gradient before it is ever used, a gradient is set by hand on it at
    iterations 0 and 4. With τ > 1 each iteration has τ micro-batches that differ."""
    x = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype).reshape(3, 2)
    last = len(want.params) - 1
    for i in range(7):
        for side in (want, got):
            side.zero_grad()
            if i in (3, 5):
                side.model[2].requires_grad_(i == 5)
            if i in (0, 4):
                side.set_grad(last, torch.full((), 0.5, dtype=dtype))
            for j in range(inp.tau if i != 2 else 0):
                side.backward(x * (1.0 + j / 2))
            side.step()
        for k, (p_want, p_got) in enumerate(zip(want.params, got.params, strict=True)):
            where = f"param {k}, iteration {i}"
            torch.testing.assert_close(
                p_got, p_want, msg=lambda m, w=where: f"{w}: {m}"
            )
            state_want, state_got = want.state(k), got.state(k)
            assert state_got.get("count", 0) == state_want.get("count", 0), where
            for key, value in state_want.items():
                if not torch.is_tensor(value):
                    assert state_got[key] == value, f"{key} of {where}"
                    continue
                torch.testing.assert_close(
                    state_got[key],
                    value,
                    msg=lambda m, w=f"{key} of {where}": f"{w}: {m}",
                )
                state_got[key].copy_(value)  # re-align
            with torch.no_grad():
                p_got.copy_(p_want)


def skip_forced_axis(inp: Any) -> None:
    if inp.kwargs.get("axis") == 0:
        pytest.skip("torch's model has a 1 x 3 weight: no rank compresses its axis 0 "
                    "(a forced axis that cannot be compressed raises)")  # fmt: skip


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16]
)
@cases
def test_matches_core_reference(info: Any, inp: Any, dtype: torch.dtype) -> None:
    """torch's test_foreach_matches_forloop with flora_core on numpy as the forloop
    implementation: the adapter's one numeric path against the reference."""
    skip_forced_axis(inp)
    want = ReferenceSide(info, inp, dtype)
    compare_between(inp, dtype, want, AdapterSide(info, inp, dtype))


@cases
def test_foreach_matches_forloop(info: Any, inp: Any) -> None:
    """torch's test, in float64, once the optimizer has a ``foreach`` flag."""
    if "foreach" not in inspect.signature(info.optim_cls).parameters:
        pytest.skip("no foreach flag yet: the one path is test_matches_core_reference")
    skip_forced_axis(inp)
    dtype = torch.float64
    forloop = AdapterSide(info, inp, dtype, foreach=False)
    compare_between(inp, dtype, forloop, AdapterSide(info, inp, dtype, foreach=True))
