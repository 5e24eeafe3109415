"""torch's generic state-dict, hook and copy checks over every flora_torch option set.

The second half of the port of pytorch/pytorch ``test/test_optim.py``
(``TestOptimRenewed``) over the registry in ``optim_db.py``; see
``test_optim_generic.py`` for the first half and for what is not applicable.
Regressions of issue 17 live here: ``model.named_parameters()`` (the named
variants), load hooks around Flora's loading, ``deepcopy`` / ``pickle`` /
``torch.save`` copies that keep their configuration and step identically, and two
live optimizers over the same parameters.
"""

from __future__ import annotations

import copy
import functools
import io
import pickle
from typing import Any

import optim_db as db
import pytest
import torch
from flora_torch import FloraAdam

cases = pytest.mark.parametrize(("info", "inp"), db.CASES, ids=db.CASE_IDS)
make, advance, quadratic, weight_bias = (
    db.make,
    db.advance,
    db.quadratic,
    db.weight_bias,
)
assert_same, without_param_names, named = (
    db.assert_same,
    db.without_param_names,
    db.named,
)
conv_bn, conv_closure = db.conv_bn, db.conv_closure


# ----------------------------------------------------------------- state dicts
@pytest.mark.parametrize("is_named_optim0", [True, False])
@pytest.mark.parametrize("is_named_optim1", [True, False])
@cases
def test_state_dict_deterministic(
    info: Any, inp: Any, is_named_optim0: bool, is_named_optim1: bool
) -> None:
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(2, 3))
    bias = torch.nn.Parameter(torch.randn(2))
    x = torch.randn(3, requires_grad=True)
    optimizer = make(info, inp, named([weight, bias], is_named_optim0))
    closure = functools.partial(quadratic, optimizer, weight, bias, x)
    for _ in range(10):  # prime the optimizer
        advance(optimizer, inp, closure)
    with torch.no_grad():
        weight_c = torch.nn.Parameter(weight.clone())
        bias_c = torch.nn.Parameter(bias.clone())
    optimizer_c = make(info, inp, named([weight_c, bias_c], is_named_optim1))
    closure_c = functools.partial(quadratic, optimizer_c, weight_c, bias_c, x)
    optimizer_c.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for _ in range(10):  # both in parallel: bitwise equal (torch: within tolerance)
        advance(optimizer, inp, closure)
        advance(optimizer_c, inp, closure_c)
        assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c)
    # deterministic with equal (not identical) parameters; names are optional
    assert_same(
        without_param_names(optimizer.state_dict()),
        without_param_names(optimizer_c.state_dict()),
    )
    # repeated parameters have identical representation (torch #36831)
    optimizer_c.param_groups.extend(optimizer_c.param_groups)
    assert_same(
        without_param_names(optimizer.state_dict())["param_groups"][-1],
        without_param_names(optimizer_c.state_dict())["param_groups"][-1],
    )


@cases
def test_can_load_older_state_dict(info: Any, inp: Any) -> None:
    """torch deletes the flags added after release; Flora's "older" dict has no
    ``param_names`` and, with τ > 1, no accumulator (written before accumulation
    was turned on): it loads, starts a fresh cycle and steps."""
    model = conv_bn()
    x = torch.rand(1, 4, 16, 16)
    optimizer = make(info, inp, model.parameters())
    closure = functools.partial(conv_closure, optimizer, model, x)
    for _ in range(3):
        advance(optimizer, inp, closure)
    old = copy.deepcopy(optimizer.state_dict())
    for group in old["param_groups"]:
        group.pop("param_names", None)
    for state in old["state"].values():
        state.pop("acc", None)
        state.pop("micro_step", None)
    optimizer.load_state_dict(old)
    advance(optimizer, inp, closure)
    assert [s["count"] for s in optimizer.state.values()] == [4, 4, 4, 4]


@pytest.mark.parametrize("is_named_optim0", [True, False])
@pytest.mark.parametrize("is_named_optim1", [True, False])
@cases
def test_can_load_from_to_named_state_dict(
    info: Any, inp: Any, is_named_optim0: bool, is_named_optim1: bool
) -> None:
    model = conv_bn()
    x = torch.rand(1, 4, 16, 16)
    params0 = model.named_parameters() if is_named_optim0 else model.parameters()
    optimizer = make(info, inp, params0)
    for _ in range(3):
        advance(optimizer, inp, functools.partial(conv_closure, optimizer, model, x))
    old = copy.deepcopy(optimizer.state_dict())
    params1 = model.named_parameters() if is_named_optim1 else model.parameters()
    optimizer2 = make(info, inp, params1)
    optimizer2.load_state_dict(old)
    advance(optimizer2, inp, functools.partial(conv_closure, optimizer2, model, x))
    assert optimizer2.state[model[0].weight]["count"] == 4
    # param_names are kept when either optimizer had them
    if is_named_optim0 or is_named_optim1:
        assert optimizer2.state_dict()["param_groups"][0]["param_names"] == [
            "0.weight", "0.bias", "1.weight", "1.bias",
        ]  # fmt: skip
    else:
        assert "param_names" not in optimizer2.state_dict()["param_groups"][0]


@pytest.mark.parametrize("is_named_optim", [True, False])
@cases
def test_save_load_equality_with_weights_only(
    info: Any, inp: Any, is_named_optim: bool
) -> None:
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(2, 3))
    bias = torch.nn.Parameter(torch.randn(2))
    x = torch.randn(3, requires_grad=True)
    optimizer = make(info, inp, named([weight, bias], is_named_optim))
    for _ in range(3):
        advance(
            optimizer, inp, functools.partial(quadratic, optimizer, weight, bias, x)
        )
    state_dict = optimizer.state_dict()
    for weights_only in (False, True):
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        buffer.seek(0)
        assert_same(torch.load(buffer, weights_only=weights_only), state_dict)


@cases
def test_load_nontensor_step(info: Any, inp: Any) -> None:
    """torch turns a tensor ``step`` into a Python number and loads; Flora keeps
    ``count`` and ``micro_step`` as ints, so the reverse: 0-d tensors (as a
    converter may write them) load as ints and training continues."""
    params = [torch.nn.Parameter(torch.randn(2, 3)) for _ in range(2)]
    optimizer = make(info, inp, params)
    for _ in range(3):
        for p in params:
            p.grad = torch.rand_like(p)
        optimizer.step()
    state_dict = copy.deepcopy(optimizer.state_dict())
    for state in state_dict["state"].values():
        for key in ("count", "micro_step"):
            if key in state:
                state[key] = torch.tensor(state[key])
    optimizer.load_state_dict(state_dict)
    assert all(type(s["count"]) is int for s in optimizer.state.values())
    for p in params:
        p.grad = torch.rand_like(p)
    optimizer.step()
    assert [s["count"] for s in optimizer.state.values()] == [4, 4]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@cases
def test_state_dict_with_cuda_params(info: Any, inp: Any) -> None:
    params = [torch.nn.Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = make(info, inp, params)
    for _ in range(3):
        optimizer.step()
    with torch.no_grad():
        params_cuda = [p.to("cuda") for p in params]
        for p, q in zip(params_cuda, params, strict=True):
            p.grad = q.grad.to("cuda")
    optimizer_cuda = make(info, inp, params_cuda)
    state_dict_cpu = copy.deepcopy(optimizer.state_dict())
    state_dict_cuda = copy.deepcopy(optimizer.state_dict())
    optimizer_cuda.load_state_dict(state_dict_cuda)
    assert_same(state_dict_cpu, state_dict_cuda)  # loading does not modify it
    for state in optimizer_cuda.state.values():
        assert all(v.is_cuda for v in state.values() if torch.is_tensor(v))
    for _ in range(5):
        optimizer.step()
        optimizer_cuda.step()
        for p, q in zip(params, params_cuda, strict=True):
            torch.testing.assert_close(p, q.cpu())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@cases
def test_load_state_dict_into_other_dtype(info: Any, inp: Any, dtype: Any) -> None:
    """torch casts floating state to the parameter's dtype on load; Flora keeps it
    float32 (NOTE [float32 state on load]) and the run continues as in float32."""
    torch.manual_seed(0)
    weight, bias, x = weight_bias()
    optimizer = make(info, inp, [weight, bias])
    closure = functools.partial(quadratic, optimizer, weight, bias, x)
    for _ in range(3):
        advance(optimizer, inp, closure)
    weight_c = torch.nn.Parameter(weight.detach().to(dtype))
    bias_c = torch.nn.Parameter(bias.detach().to(dtype))
    optimizer_c = make(info, inp, [weight_c, bias_c])
    optimizer_c.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for state in optimizer_c.state.values():
        tensors = [v for v in state.values() if torch.is_tensor(v)]
        assert tensors and all(v.dtype == torch.float32 for v in tensors)
    closure_c = functools.partial(quadratic, optimizer_c, weight_c, bias_c, x.to(dtype))
    for _ in range(3):
        advance(optimizer, inp, closure)
        advance(optimizer_c, inp, closure_c)
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(weight_c.float(), weight, **tolerance)


# ------------------------------------------------------------------------ hooks
def _state_dict_pre_hook(optimizer: Any) -> None:
    optimizer.state["test"] = 1


def _state_dict_post_hook(optimizer: Any, state_dict: dict) -> dict:
    state_dict["ran_state_dict_pre_hook"] = "test" in state_dict["state"]
    state_dict["state"].pop("test", None)
    return state_dict


def _load_pre_hook1(optimizer: Any, state_dict: dict) -> None:
    state_dict["param_groups"][0]["lr"] = 0.002


def _load_pre_hook2(optimizer: Any, state_dict: dict) -> dict:
    mine = copy.deepcopy(state_dict)  # a hook may return a new state dict
    mine["param_groups"][0]["lr"] = 0.003
    return mine


def _load_post_hook(optimizer: Any) -> None:
    optimizer.state["ran_load_state_dict_pre_hook2"] = (
        optimizer.param_groups[0]["lr"] == 0.003
    )
    optimizer.state["ran_load_state_dict_post_hook"] = True


def one_param(info: Any, inp: Any) -> tuple[Any, Any]:
    param = torch.rand(2, 3, requires_grad=True)
    return param, make(info, inp, [param])


@cases
def test_state_dict_pre_hook(info: Any, inp: Any) -> None:
    _, optimizer = one_param(info, inp)
    optimizer.register_state_dict_pre_hook(_state_dict_pre_hook)
    assert optimizer.state_dict()["state"]["test"] == 1


@cases
def test_state_dict_post_hook(info: Any, inp: Any) -> None:
    _, optimizer = one_param(info, inp)
    optimizer.register_state_dict_post_hook(_state_dict_post_hook)
    assert optimizer.state_dict()["ran_state_dict_pre_hook"] is False


@cases
def test_state_dict_pre_post_hook(info: Any, inp: Any) -> None:
    _, optimizer = one_param(info, inp)
    optimizer.register_state_dict_pre_hook(_state_dict_pre_hook)
    optimizer.register_state_dict_post_hook(_state_dict_post_hook)
    state_dict = optimizer.state_dict()
    assert "test" not in state_dict["state"]
    assert state_dict["ran_state_dict_pre_hook"] is True


@cases
def test_load_state_dict_pre_hook_and_prepend(info: Any, inp: Any) -> None:
    _, optimizer = one_param(info, inp)
    state_dict = optimizer.state_dict()
    optimizer.register_load_state_dict_pre_hook(_load_pre_hook1)
    optimizer.load_state_dict(state_dict)
    assert optimizer.param_groups[0]["lr"] == 0.002
    optimizer.register_load_state_dict_pre_hook(_load_pre_hook2, prepend=True)
    optimizer.load_state_dict(state_dict)
    # prepended, hook2 runs first and hook1 overrides it (0.003 otherwise)
    assert optimizer.param_groups[0]["lr"] == 0.002


@cases
def test_load_state_dict_post_hook(info: Any, inp: Any) -> None:
    _, optimizer = one_param(info, inp)
    optimizer.register_load_state_dict_post_hook(_load_post_hook)
    optimizer.load_state_dict(optimizer.state_dict())
    assert not optimizer.state["ran_load_state_dict_pre_hook2"]  # lr may be a tensor
    assert optimizer.state["ran_load_state_dict_post_hook"] is True
    optimizer.load_state_dict(optimizer.state_dict())  # the flags do not break it


@cases
def test_load_state_dict_pre_post_hook(info: Any, inp: Any) -> None:
    _, optimizer = one_param(info, inp)
    optimizer.register_load_state_dict_pre_hook(_load_pre_hook2)
    optimizer.register_load_state_dict_post_hook(_load_post_hook)
    optimizer.load_state_dict(optimizer.state_dict())
    assert optimizer.state["ran_load_state_dict_pre_hook2"]
    assert optimizer.state["ran_load_state_dict_post_hook"] is True


@cases
def test_load_hooks_see_the_whole_load(info: Any, inp: Any) -> None:
    """Flora's part of loading runs between torch's hooks (NOTE [load hooks]): a
    pre hook's rewrite is what gets checked and installed, a post hook sees the
    float32 state of a bfloat16 parameter (torch's own cast would make it bf16)."""
    param = torch.nn.Parameter(torch.rand(2, 3, dtype=torch.bfloat16))
    optimizer = make(info, inp, [param])
    param.grad = torch.rand_like(param)
    optimizer.step()
    saved = optimizer.state_dict()
    seen = {}

    def rewrite(opt: Any, state_dict: dict) -> dict:
        out = copy.deepcopy(state_dict)
        out["state"][0]["count"] = 7
        return out

    def post(opt: Any) -> None:
        seen.update(
            (k, v.dtype) for k, v in opt.state[param].items() if torch.is_tensor(v)
        )

    fresh = make(info, inp, [param])
    fresh.register_load_state_dict_pre_hook(rewrite)
    fresh.register_load_state_dict_post_hook(post)
    fresh.load_state_dict(saved)
    assert fresh.state[param]["count"] == 7
    assert seen and set(seen.values()) == {torch.float32}


def _step_counter(data: list) -> Any:
    def hook(opt: Any, args: Any, kwargs: Any) -> None:
        data[0] += 2

    return hook


@pytest.mark.parametrize("kind", ["pre", "post"])
@cases
def test_step_pre_and_post_hook(info: Any, inp: Any, kind: str) -> None:
    params = [torch.tensor([1.0, 1.0])]
    optimizer = make(info, inp, params)
    data = [5]
    register = getattr(optimizer, f"register_step_{kind}_hook")
    handle = register(_step_counter(data))
    optimizer.step()
    optimizer.step()
    assert data == [9]
    handle.remove()
    optimizer.step()
    assert data == [9]


@cases
def test_step_all_hooks(info: Any, inp: Any) -> None:
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    params = [torch.tensor([1.0, 1.0])]
    optimizer = make(info, inp, params)
    optimizer2 = torch.optim.SGD(params)
    data: list[int] = []
    handles = [
        register_optimizer_step_pre_hook(lambda *_: data.append(0)),
        register_optimizer_step_post_hook(lambda *_: data.append(5)),
    ]
    try:
        for opt in (optimizer, optimizer2):
            handles.append(opt.register_step_pre_hook(lambda *_: data.append(1)))
            handles.append(opt.register_step_post_hook(lambda *_: data.append(2)))
        optimizer.step()
        assert data == [0, 1, 2, 5]
        optimizer2.step()
        assert data == [0, 1, 2, 5] * 2
        optimizer.step()
        assert data == [0, 1, 2, 5] * 3
    finally:
        for handle in handles:
            handle.remove()
    optimizer.step()
    optimizer2.step()
    assert data == [0, 1, 2, 5] * 3


# ----------------------------------------------------------------------- copies
def public(obj: Any) -> set[str]:
    return {k for k in obj.__dict__ if not k.startswith("_")}


@cases
def test_deepcopy_copies_all_public_attrs(info: Any, inp: Any) -> None:
    params = [torch.nn.Parameter(torch.randn(2, 3)) for _ in range(2)]
    optimizer = make(info, inp, params)
    for _ in range(3):  # make some state
        for p in params:
            p.grad = torch.rand_like(p)
        optimizer.step()
    clone = copy.deepcopy(optimizer)
    assert public(optimizer) == public(clone)
    for name in ("accumulation_steps", "layerwise", "max_grad_norm"):
        assert getattr(clone, name) == getattr(optimizer, name)


def _pickled(obj: Any) -> Any:
    return pickle.loads(pickle.dumps(obj))


def _torch_saved(obj: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", [copy.deepcopy, _pickled, _torch_saved],
                         ids=["deepcopy", "pickle", "torch.save"])  # fmt: skip
@cases
def test_copy_steps_identically(info: Any, inp: Any, how: Any) -> None:
    """A copy taken mid-cycle (τ > 1: one micro-batch accumulated) continues
    exactly as the original, on its own parameters (its hooks are its own)."""
    torch.manual_seed(0)
    weight, bias, x = weight_bias()
    optimizer = make(info, inp, [weight, bias])
    for _ in range(2):
        advance(
            optimizer, inp, functools.partial(quadratic, optimizer, weight, bias, x)
        )
    if inp.tau > 1:
        quadratic(optimizer, weight, bias, x)
    weight_c, bias_c, optimizer_c = how((weight, bias, optimizer))
    assert (
        weight_c is not weight and optimizer_c.param_groups[0]["params"][0] is weight_c
    )
    before = copy.deepcopy(optimizer.state_dict())
    quadratic(optimizer_c, weight_c, bias_c, x)  # the copy alone: the original
    assert_same(optimizer.state_dict(), before)  # is not touched by its hooks
    quadratic(optimizer, weight, bias, x)  # the same micro-batch, then both step
    optimizer.step()
    optimizer_c.step()
    for _ in range(3):
        advance(
            optimizer, inp, functools.partial(quadratic, optimizer, weight, bias, x)
        )
        advance(
            optimizer_c,
            inp,
            functools.partial(quadratic, optimizer_c, weight_c, bias_c, x),
        )
    assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c)
    assert_same(optimizer.state_dict(), optimizer_c.state_dict())


# ------------------------------------------------------------ Flora's additions
# torch's own fields a copy drops (as torch's __getstate__ does) or rebuilds
DROPPED = {
    "_hooks",  # rebuilt on the copy's parameters
    "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks",
    "_warned_capturable_if_run_uncaptured",
}  # fmt: skip


@cases
def test_copy_keeps_every_attribute(info: Any, inp: Any) -> None:
    """NOTE [copies]: an attribute added to the optimizer without a place in
    ``_copied_attrs`` would be lost by copies (and break their step())."""
    weight, bias, x = weight_bias()
    optimizer = make(info, inp, [weight, bias])
    advance(optimizer, inp, functools.partial(quadratic, optimizer, weight, bias, x))
    clone = copy.deepcopy(optimizer)
    assert set(optimizer.__dict__) - DROPPED <= set(clone.__dict__)
    assert set(clone.__dict__) <= set(optimizer.__dict__)


@cases
def test_copy_with_an_lr_scheduler_steps_itself(info: Any, inp: Any) -> None:
    """An LR scheduler wraps ``optimizer.step`` in an instance attribute that calls
    the original optimizer; a copy must not keep it."""
    weight, bias, x = weight_bias()
    optimizer = make(info, inp, [weight, bias])
    torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)
    weight_c, bias_c, clone = copy.deepcopy((weight, bias, optimizer))
    before, before_c = weight.detach().clone(), weight_c.detach().clone()
    advance(clone, inp, functools.partial(quadratic, clone, weight_c, bias_c, x))
    assert torch.equal(weight, before) and not torch.equal(weight_c, before_c)


@pytest.mark.parametrize("layerwise", [False, True])
def test_newest_optimizer_owns_the_hooks(layerwise: bool) -> None:
    """NOTE [one owner per parameter]: torch's state-dict tests build a second
    optimizer over live parameters; its hooks, not the first one's, take the
    gradients (the first would consume them silently), until it is deleted."""
    model = conv_bn()
    x = torch.rand(1, 4, 16, 16)
    kwargs = {"rank": 1, "accumulation_steps": 2, "layerwise": layerwise,
              "max_grad_norm": db.NO_CLIP}  # fmt: skip
    first = FloraAdam(model.parameters(), **kwargs)
    second = FloraAdam(model.parameters(), **kwargs)
    model(x).sum().backward()
    assert not first.state
    assert all(second.state[p]["micro_step"] == 1 for p in model.parameters())
    del second
    model(x).sum().backward()
    assert all(first.state[p]["micro_step"] == 1 for p in model.parameters())
