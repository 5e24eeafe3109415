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
  ``test_mixed_device_dtype``: there is no ``fused``, ``foreach``,
  ``capturable`` or ``differentiable`` flag. The one numeric path is compared with
  the core on numpy instead (``test_matches_core_reference``, the
  foreach-equals-forloop check, in float64, float32, bfloat16 and float16).
* ``maximize``: not an option of these optimizers (maximise ``-loss``).
* ``test_second_order_optims_return_consistent_types``: ``step`` needs no closure.
* ``test_forloop_goes_right_direction_multigpu``,
  ``test_state_dict_with_cuda_params``: need (two) GPUs; the second is ported
  (``test_optim_generic_state.py``) and runs where CUDA is present.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch


def _load(name: str) -> Any:
    path = Path(__file__).with_name(name)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


db = _load("optim_db.py")
reference = _load("flora_reference.py")
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
    for inp in info.inputs:
        assert not {"foreach", "fused", "differentiable"} & set(inp.kwargs)
    with pytest.raises(TypeError, match="foreach"):  # and none is accepted
        info.optim_cls([torch.nn.Parameter(torch.randn(2, 3))], foreach=True)


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


# ------------------------------------------------- the one path vs the reference
def sigmoid_mlp(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1),
        torch.nn.Sigmoid(),
    )  # fmt: skip
    return model.to(dtype)


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16]
)
@cases
def test_matches_core_reference(info: Any, inp: Any, dtype: torch.dtype) -> None:
    """torch's test_foreach_matches_forloop (``_test_derived_optimizers`` and
    ``_compare_between``): its model, input and seven iterations, a 0-d parameter,
    no backward at iteration 2, ``model[2]`` frozen at 3 and unfrozen at 5; params
    and every state field compared after each iteration (in the parameter's dtype
    and float32, torch's default tolerances) and then re-aligned, as torch's
    ``TensorTracker`` does. The reference is flora_core on numpy
    (``flora_reference.py``). Unlike torch, whose ``zero_grad`` clears the 0-d
    parameter's gradient before it is ever used, a gradient is set by hand on it
    at iterations 0 and 4."""
    if inp.kwargs.get("axis") == 0:
        pytest.skip("torch's model has a 1 x 3 weight: no rank compresses its axis 0 "
                    "(a forced axis that cannot be compressed raises)")  # fmt: skip
    x = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype).reshape(3, 2)
    model, model_r = sigmoid_mlp(dtype), sigmoid_mlp(dtype)
    torch.manual_seed(2)
    empty = torch.rand((), dtype=dtype).requires_grad_()
    empty_r = empty.detach().clone().requires_grad_()
    params, params_r = [*model.parameters(), empty], [*model_r.parameters(), empty_r]
    optimizer = make(info, inp, params)
    group = optimizer.param_groups[0]
    ref = reference.CoreReference(
        info.optim_cls, params_r, group, optimizer._config(group), tau=inp.tau,
        max_grad_norm=inp.kwargs.get("max_grad_norm"),
    )  # fmt: skip
    for i in range(7):
        optimizer.zero_grad()
        if i in (3, 5):
            for m in (model, model_r):
                m[2].requires_grad_(i == 5)
        if i in (0, 4):
            empty.grad = torch.full_like(empty, 0.5)
            ref.set_grad(len(params) - 1, empty.grad)
        if i != 2:
            for j in range(inp.tau):
                scale = 1.0 + j / 2  # micro-batches that differ
                model(x * scale).sum().backward()
                live = [p for p in params_r if p.requires_grad]
                grads = iter(torch.autograd.grad(model_r(x * scale).sum(), live[:-1]))
                ref.backward([next(grads) if p.requires_grad and p is not empty_r
                              else None for p in params_r])  # fmt: skip
        optimizer.step()
        ref.step()
        for k, (p, p_r) in enumerate(zip(params, params_r, strict=True)):
            torch.testing.assert_close(
                p, p_r, msg=lambda m, k=k, i=i: f"param {k}, iteration {i}: {m}"
            )
            state, state_r = optimizer.state.get(p, {}), ref.states[k] or {}
            assert state.get("count", 0) == state_r.get("count", 0)
            for key, value in state_r.items():
                if key in ("count", "micro_step"):
                    assert state[key] == value
                    continue
                want = torch.as_tensor(np.asarray(value))
                torch.testing.assert_close(
                    state[key],
                    want,
                    msg=lambda m, k=k, key=key, i=i: (
                        f"{key} of {k}, iteration {i}: {m}"
                    ),
                )
                state[key].copy_(want)  # re-align
            with torch.no_grad():
                p.copy_(p_r)
