"""A registry of flora_torch optimizers and their option sets, for the generic tests.

Modelled on ``OptimizerInfo`` / ``OptimizerInput`` / ``ErrorOptimizerInput`` in
pytorch/pytorch ``torch/testing/_internal/common_optimizers.py`` (read, not
copied): each optimizer lists the constructor options to test it under, the
inputs that must fail and how, and the LR scheduler sets to run it with;
``test_optim_generic.py`` runs every check over every entry, as torch's
``test/test_optim.py`` runs ``optim_db``.

The option sets use ``rank=1`` so that the small tensors of torch's tests (10 x 5,
2 x 3, a 2 x 4 x 1 x 1 convolution) are compressed, mostly with ``kappa=5`` so that
a test of 20 steps crosses resamples (and the moment transfer). With one projection
for all 20 steps FloraAdam is not a descent method at r = 1 of d = 5 (its
elementwise normalisation of ``Ĝ = G Aᵀ A`` can oppose ``G`` on every step):
torch's quadratic ends above its start in 15 of 200 seeds with the default
``second_moment="projected"``, and for some seeds and schedulers with
``"gradient"`` too; with ``kappa=5``, in none of 200.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from flora_torch import FloraAdafactor, FloraAdam
from torch.optim.lr_scheduler import (
    ConstantLR,
    ExponentialLR,
    LinearLR,
    PolynomialLR,
    ReduceLROnPlateau,
    StepLR,
)

NO_CLIP = math.inf


@dataclass(frozen=True)
class FloraInput:
    """Constructor kwargs (group and optimizer level) and a description."""

    desc: str
    make_kwargs: Callable[[], dict[str, Any]]  # fresh: a tensor lr is mutated

    @property
    def kwargs(self) -> dict[str, Any]:
        return self.make_kwargs()

    @property
    def tau(self) -> int:
        return self.kwargs.get("accumulation_steps", 1)

    @property
    def layerwise(self) -> bool:
        return self.kwargs.get("layerwise", False)

    @property
    def group_kwargs(self) -> dict[str, Any]:
        """The kwargs a param group may carry (not the optimizer-level ones)."""
        level = ("accumulation_steps", "layerwise", "max_grad_norm")
        return {k: v for k, v in self.kwargs.items() if k not in level}

    @property
    def optimizer_kwargs(self) -> dict[str, Any]:
        level = ("accumulation_steps", "layerwise", "max_grad_norm")
        return {k: v for k, v in self.kwargs.items() if k in level}


@dataclass(frozen=True)
class ErrorInput:
    """Params and kwargs that must raise ``error_type`` matching ``error_regex``."""

    desc: str
    params: Callable[[], Any]
    kwargs: dict[str, Any]
    error_type: type
    error_regex: str


@dataclass(frozen=True)
class FloraOptimizerInfo:
    optim_cls: type
    inputs: tuple[FloraInput, ...]
    error_inputs: tuple[ErrorInput, ...]
    scheduler_inputs: tuple[tuple[Callable[[Any], Any], ...], ...]
    weight_decay_key: str

    @property
    def name(self) -> str:
        return self.optim_cls.__name__


def _inputs(*specs: tuple[str, dict[str, Any]]) -> tuple[FloraInput, ...]:
    def fresh(kwargs: dict[str, Any]) -> Callable[[], dict[str, Any]]:
        return lambda: {
            k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()
        }

    return tuple(FloraInput(desc, fresh(kwargs)) for desc, kwargs in specs)


HOOKED = (
    (
        "accumulation_steps=2",
        {"rank": 1, "kappa": 5, "accumulation_steps": 2, "max_grad_norm": NO_CLIP},
    ),
    (
        "accumulation_steps=2, max_grad_norm",
        {"rank": 1, "kappa": 5, "accumulation_steps": 2, "max_grad_norm": 0.5},
    ),
    ("layerwise", {"rank": 1, "kappa": 5, "layerwise": True, "max_grad_norm": NO_CLIP}),
    (
        "layerwise, accumulation_steps=2",
        {
            "rank": 1,
            "kappa": 5,
            "layerwise": True,
            "accumulation_steps": 2,
            "max_grad_norm": NO_CLIP,
        },
    ),
    (
        "layerwise, accumulation_steps=2, max_grad_norm",
        {
            "rank": 1,
            "kappa": 5,
            "layerwise": True,
            "accumulation_steps": 2,
            "max_grad_norm": 0.5,
        },
    ),
)

ADAM_INPUTS = _inputs(
    ("default", {}),
    ("rank=1, non-default lr", {"rank": 1, "kappa": 5, "lr": 0.01}),
    ("rank=1, weight_decay", {"rank": 1, "kappa": 5, "weight_decay": 0.1}),
    ("rank=1, factored", {"rank": 1, "kappa": 5, "factored": True}),
    ("second_moment=gradient", {"rank": 1, "kappa": 5, "second_moment": "gradient"}),
    (
        "transfer=paper, rademacher, kappa=3",
        {"rank": 1, "transfer": "paper", "projection": "rademacher", "kappa": 3},
    ),
    ("axis=0", {"rank": 1, "kappa": 5, "axis": 0}),
    ("identity projection", {"rank": 1, "projection": "identity"}),
    ("tensor lr", {"rank": 1, "kappa": 5, "lr": torch.tensor(0.01)}),
    ("max_grad_norm", {"rank": 1, "kappa": 5, "max_grad_norm": 0.5}),
    *HOOKED,
)

ADAFACTOR_INPUTS = _inputs(
    ("default", {}),
    ("rank=1, factored small", {"rank": 1, "min_dim_size_to_factor": 2}),
    ("no momentum", {"rank": 1, "momentum": None}),
    (
        "unfactored, weight_decay_rate",
        {"rank": 1, "factored": False, "weight_decay_rate": 0.01, "lr": 0.01},
    ),
    (
        "optax order, no parameter scale, kappa=3",
        {
            "rank": 1,
            "clip_after_momentum": False,
            "multiply_by_parameter_scale": False,
            "kappa": 3,
            "lr": 1e-3,
        },
    ),
    ("identity projection", {"rank": 1, "projection": "identity"}),
    ("tensor lr", {"rank": 1, "lr": torch.tensor(0.01)}),
    *HOOKED,
)


def _one(*shape: int) -> Callable[[], list[torch.nn.Parameter]]:
    return lambda: [torch.nn.Parameter(torch.randn(*shape))]


def _two() -> list[torch.nn.Parameter]:
    return [
        torch.nn.Parameter(torch.randn(1, 1)),
        torch.nn.Parameter(torch.randn(1, 1)),
    ]


def _same_twice() -> list[torch.nn.Parameter]:
    p = torch.nn.Parameter(torch.randn(1, 1))
    return [p, p]


def _same_in_two_groups() -> list[dict[str, Any]]:
    p = torch.nn.Parameter(torch.randn(1, 1))
    return [{"params": p}, {"params": p}]


def _named_and_unnamed() -> list[Any]:
    a, b = _two()
    return [("weight", a), b]


def _named_and_unnamed_groups() -> list[dict[str, Any]]:
    a, b = _two()
    return [{"params": [a], "lr": 1e-2}, {"params": [("weight", b)]}]


# torch's get_error_inputs_for_all_optims (same inputs, errors and messages, but
# the tensor-lr message, which is Flora's own), then Flora's additions.
COMMON_ERRORS = (
    ErrorInput(
        "invalid param type",
        lambda: torch.nn.Parameter(torch.randn(1, 1)),
        {},
        TypeError,
        "params argument given to the optimizer should be an iterable of Tensors or dicts",
    ),
    ErrorInput(
        "a param group cannot have duplicate parameters",
        _same_twice,
        {},
        UserWarning,
        ".*a parameter group with duplicate parameters.*",
    ),
    ErrorInput(
        "duplicate parameters should not occur across param groups either",
        _same_in_two_groups,
        {},
        ValueError,
        "some parameters appear in more than one parameter group",
    ),
    ErrorInput(
        "Tensor lr must be 1-element",
        _two,
        {"lr": torch.tensor([0.001, 0.001])},
        ValueError,
        "a tensor lr must be 1 float",
    ),
    ErrorInput(
        "all optimizer params should be with/without names",
        _named_and_unnamed,
        {},
        ValueError,
        "all optimizer params should be with/without names. Some param names are missing",
    ),
    ErrorInput(
        "all optimizer param groups should be with/without names",
        _named_and_unnamed_groups,
        {},
        ValueError,
        "all optimizer param groups should be with/without names. "
        "cannot add param group with names to the optimizer",
    ),
    ErrorInput(
        "empty parameter list",
        lambda: [],
        {},
        ValueError,
        "optimizer got an empty parameter list",
    ),
    ErrorInput(
        "not a tensor",
        lambda: [1.0],
        {},
        TypeError,
        "optimizer can only optimize Tensors, but one of the params is float",
    ),
    ErrorInput(
        "a set of parameters",
        lambda: [{"params": set(_two())}],
        {},
        TypeError,
        "ordered collections",
    ),
    ErrorInput(
        "complex parameter",
        lambda: [torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.complex64))],
        {},
        ValueError,
        "Complex parameters are not supported",
    ),
    ErrorInput(
        "optimizer setting in a group",
        lambda: [{"params": _two(), "accumulation_steps": 2}],
        {},
        ValueError,
        "accumulation_steps is a setting of the whole",
    ),
    ErrorInput(
        "max_grad_norm must be > 0",
        _two,
        {"max_grad_norm": 0.0},
        ValueError,
        "Invalid max_grad_norm: 0.0",
    ),
    ErrorInput(
        "layerwise updates precede a global norm",
        _two,
        {"layerwise": True, "max_grad_norm": 1.0},
        ValueError,
        "cannot clip: each update is applied inside backward",
    ),
    ErrorInput(
        "rank must be positive", _one(10, 5), {"rank": 0}, ValueError, "Invalid rank: 0"
    ),
)

ADAM_ERRORS = (
    ErrorInput(
        "beta1 should be between 0 and 1",
        _two,
        {"lr": 1e-2, "betas": (1.0, 0.0)},
        ValueError,
        "Invalid beta1: 1.0",
    ),
    ErrorInput(
        "weight_decay should > 0",
        _two,
        {"lr": 1e-2, "weight_decay": -1},
        ValueError,
        "Invalid weight_decay: -1",
    ),
)

ADAFACTOR_ERRORS = (
    ErrorInput(
        "epsilon should be >= 0",
        _two,
        {"eps": -1e-30},
        ValueError,
        "Invalid eps: -1e-30",
    ),
    ErrorInput(
        "invalid clipping threshold",
        _two,
        {"clipping_threshold": 0.0},
        ValueError,
        "Invalid clipping_threshold: 0.0",
    ),
)

# torch's scheduler sets: Adam's seven for FloraAdam, the default one for Adafactor
ADAM_SCHEDULERS = (
    (lambda opt: ExponentialLR(opt, gamma=0.9),),
    (lambda opt: LinearLR(opt, start_factor=0.4, total_iters=4),),
    (
        lambda opt: ConstantLR(opt, factor=0.4, total_iters=4),
        lambda opt: ExponentialLR(opt, gamma=0.9),
    ),
    (lambda opt: ExponentialLR(opt, gamma=0.9), lambda opt: ReduceLROnPlateau(opt)),
    (lambda opt: ConstantLR(opt, factor=0.4, total_iters=4),),
    (lambda opt: PolynomialLR(opt, power=0.9, total_iters=4),),
    (
        lambda opt: StepLR(opt, gamma=0.9, step_size=10),
        lambda opt: ReduceLROnPlateau(opt),
    ),
)
DEFAULT_SCHEDULERS = (
    (
        lambda opt: StepLR(opt, gamma=0.9, step_size=10),
        lambda opt: ReduceLROnPlateau(opt),
    ),
)

OPTIM_DB = (
    FloraOptimizerInfo(
        FloraAdam,
        ADAM_INPUTS,
        COMMON_ERRORS + ADAM_ERRORS,
        ADAM_SCHEDULERS,
        "weight_decay",
    ),
    FloraOptimizerInfo(
        FloraAdafactor,
        ADAFACTOR_INPUTS,
        COMMON_ERRORS + ADAFACTOR_ERRORS,
        DEFAULT_SCHEDULERS,
        "weight_decay_rate",
    ),
)

CASES = [(info, inp) for info in OPTIM_DB for inp in info.inputs]
CASE_IDS = [f"{info.name}-{inp.desc}" for info, inp in CASES]


# ------------------------------------------------------------------- the harness
# torch's test bodies, shared by test_optim_generic*.py


def make(info: Any, inp: Any, params: Any, **override: Any) -> torch.optim.Optimizer:
    return info.optim_cls(params, **{**inp.kwargs, **override})


def advance(optimizer: Any, inp: Any, closure: Any, schedulers: Any = ()) -> Any:
    """One optimizer step: τ closures (zero_grad, forward, backward), then step()."""
    for _ in range(inp.tau):
        loss = closure()
    optimizer.step()
    for scheduler in schedulers:
        if isinstance(scheduler, ReduceLROnPlateau):
            scheduler.step(loss.detach())
        else:
            scheduler.step()
    return loss


def weight_bias(contiguous: bool = True, dtype: torch.dtype = torch.float32):
    if contiguous:
        weight = torch.nn.Parameter(torch.randn(10, 5, dtype=dtype))
        bias = torch.nn.Parameter(torch.randn(10, dtype=dtype))
    else:  # torch's non-contiguous parameters
        weight = torch.nn.Parameter(torch.randn(10, 5, 2, dtype=dtype)[..., 0])
        bias = torch.nn.Parameter(torch.randn(10, 2, dtype=dtype)[..., 0])
    return weight, bias, torch.randn(5, dtype=dtype)


def quadratic(optimizer: Any, weight: Any, bias: Any, x: Any, backward: bool = True):
    """torch's ``(weight.mv(input) + bias).pow(2).sum()`` closure."""
    if backward:
        optimizer.zero_grad()
    loss = (weight.mv(x) + bias).pow(2).sum()
    if backward:
        loss.backward()
    return loss


def assert_same(a: Any, b: Any) -> None:
    """Recursive equality of state dicts (tensors bitwise, with dtype)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    else:
        assert a == b


def without_param_names(state_dict: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(state_dict)
    for group in out["param_groups"]:
        group.pop("param_names", None)
    return out


def named(params: list[Any], is_named: bool) -> list[Any]:
    return [(f"name{i}", p) for i, p in enumerate(params)] if is_named else params


def conv_bn() -> torch.nn.Module:
    """torch's Conv2d(4, 2, 1, stride=2) + BatchNorm2d(2) (weight 2 x 4 x 1 x 1)."""
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2, eps=1e-05)
    )


def conv_closure(optimizer: Any, model: Any, x: Any) -> torch.Tensor:
    optimizer.zero_grad()
    loss = model(x).sum()
    loss.backward()
    return loss
