"""The torch optimizers the benchmarks compare, built one way, and their state bytes.

The alternatives are used from where they are installed and never copied:
flora-opt (LGPL) from its own folder, off the import path of the library and its
tests, and galore-torch, bitsandbytes and apollo-torch (CC-BY-NC: benchmark
environment only) from the environment::

    pip install --no-deps --target /work/benchdeps flora-opt==0.0.3 bitsandbytes
    pip install --no-deps galore-torch==1.0 bitsandbytes
    pip install --no-deps apollo-torch==1.0.3     # APOLLO, APOLLO-Mini

Low-rank methods project ``targets``: by default GaLore's and APOLLO's are
:func:`galore_targets` and FLORA compresses every parameter its rank allows (the
library's own policy); pass ``targets`` to give every method the same matrices, the
other parameters then getting each method's base optimizer (AdamW for GaLore and
APOLLO, uncompressed Adam or Adafactor for FLORA).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

import torch

FLORA_OPT_PATH = "/work/benchdeps"
NAMES = (
    "SGD (stateless)",
    "AdamW(foreach)",
    "AdamW(fused)",
    "torch Adafactor",
    "FloraAdam",
    "FloraAdam(factored)",
    "FloraAdafactor",
    "flora-opt Flora",
    "GaLoreAdamW",
    "Adafactor+momentum",
    "AdamW8bit",
    "APOLLO",
    "APOLLO-Mini",
    "FloraAdam per-tensor",
    "FloraAdam(factored) per-tensor",
    "FloraAdafactor per-tensor",
)
PER_TENSOR = " per-tensor"  # foreach=False: the per-tensor reference path (issue 15)
# GaLore's usual settings (its README and the paper): SVD projection refreshed every
# 200 steps, update scaled by 0.25, the smaller side projected.
GALORE = {"update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}
# APOLLO's README defaults: random projection refreshed every 200 steps; APOLLO scales
# per channel at rank r with scale 1, APOLLO-Mini per tensor at rank 1 with scale 128
# and the norm-growth limiter before the scale ("scale_front", its advice for small
# models with short warm-up).
APOLLO = {"proj": "random", "proj_type": "std", "scale_type": "channel", "scale": 1}
APOLLO_MINI = {**APOLLO, "scale_type": "tensor", "scale": 128, "rank": 1}
PACKAGES = {"GaLoreAdamW": "galore_torch", "AdamW8bit": "bitsandbytes",
            "APOLLO": "apollo_torch", "APOLLO-Mini": "apollo_torch"}  # fmt: skip
EMBEDDING_ASPECT = (
    4  # flora-opt's rule: a longer/shorter side ratio above it is an embedding
)


def missing(name: str, flora_opt_path: str = FLORA_OPT_PATH) -> str | None:
    """Why ``name`` cannot be built here, or None."""
    if name not in NAMES:
        raise ValueError(f"Unknown optimizer {name!r} (expected one of {NAMES})")
    if name == "flora-opt Flora" and not os.path.isdir(flora_opt_path):
        return f"flora-opt not installed in {flora_opt_path}"
    module = PACKAGES.get(name)
    if module and importlib.util.find_spec(module) is None:
        return f"{module.replace('_', '-')} not installed"
    return None


def flora_opt_class(path: str = FLORA_OPT_PATH) -> type:
    """``flora_opt.Flora`` imported from its own folder (which is then left off the path)."""
    version = torch.__version__
    sys.path.insert(0, path)
    try:
        from flora_opt import Flora  # LGPL: used, never copied
    finally:
        sys.path.remove(path)
    if torch.__version__ != version:
        raise RuntimeError("importing flora-opt changed torch")
    return Flora


def galore_targets(params: list[torch.nn.Parameter], rank: int) -> list:
    """The matrices GaLore projects: 2-D, smaller side above ``rank``, not embeddings.

    GaLore's scripts target the attention and feed-forward matrices; by shape that is
    every matrix except the vocabulary embedding (aspect ratio above 4).
    """
    return [
        p for p in params
        if p.ndim == 2 and min(p.shape) > rank
        and max(p.shape) <= EMBEDDING_ASPECT * min(p.shape)
    ]  # fmt: skip


def make_optimizer(
    name: str,
    params: list[torch.nn.Parameter],
    *,
    rank: int,
    lr: float = 1e-4,
    flora_opt_path: str = FLORA_OPT_PATH,
    update_proj_gap: int = GALORE["update_proj_gap"],
    targets: list[torch.nn.Parameter] | None = None,
    kappa: int | None = None,
    weight_decay: float | None = None,
    seed: int = 0,
) -> torch.optim.Optimizer:
    """``name`` (one of ``NAMES``) over ``params`` at ``rank`` where it has one.

    ``targets``: the matrices that GaLore, APOLLO and FLORA project (None: see the
    module docstring); ``kappa``: FLORA's resampling interval (None: the library's
    default); ``update_proj_gap``: GaLore's and APOLLO's projection refresh;
    ``weight_decay``: passed to every optimizer that has one (None: each one's
    default); ``seed``: FLORA's projection seed.
    """
    from flora_torch import FloraAdafactor, FloraAdam

    reason = missing(name, flora_opt_path)
    if reason:
        raise RuntimeError(f"{name}: {reason}")
    if name.endswith(PER_TENSOR):
        optimizer = make_optimizer(
            name.removesuffix(PER_TENSOR), params, rank=rank, lr=lr,
            flora_opt_path=flora_opt_path, targets=targets, kappa=kappa,
            weight_decay=weight_decay, seed=seed,
        )  # fmt: skip
        optimizer.foreach = False  # type: ignore[attr-defined]
        return optimizer
    wd = {} if weight_decay is None else {"weight_decay": weight_decay}
    if name == "SGD (stateless)":
        return torch.optim.SGD(params, lr=lr)
    if name.startswith("AdamW("):
        kind = "fused" if "fused" in name else "foreach"
        return torch.optim.AdamW(params, lr=lr, **{kind: True}, **wd)
    if name == "torch Adafactor":
        return torch.optim.Adafactor(params, lr=1e-2)
    if name == "AdamW8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, lr=lr, **wd)
    if name == "flora-opt Flora":
        flora = flora_opt_class(flora_opt_path)
        return flora(params, lr=lr, rank=rank, beta1=0.9, relative_step=False)
    adafactor_wd = {"weight_decay_rate": weight_decay} if weight_decay else {}
    if name == "Adafactor+momentum":  # exactly optax.adafactor(momentum=0.9)
        return FloraAdafactor(params, lr=lr, rank=None, momentum=0.9, **adafactor_wd)
    mini = name == "APOLLO-Mini"  # projects to rank 1 whatever ``rank`` is
    low_rank = (
        galore_targets(params, 1 if mini else rank) if targets is None else targets
    )
    rest = [p for p in params if all(p is not q for q in low_rank)]
    if name.startswith("Flora"):
        groups: Any = params  # the library's policy decides, at ``rank``
        if targets is not None:
            groups = [
                {"params": low_rank, "rank": rank},
                {"params": rest, "rank": None},
            ]
            groups = [g for g in groups if g["params"]]
        flora = dict(
            lr=lr, rank=rank, seed=seed, **({} if kappa is None else {"kappa": kappa})
        )
        if name == "FloraAdafactor":
            return FloraAdafactor(groups, **flora, **adafactor_wd)
        return FloraAdam(groups, factored="factored" in name, **flora, **wd)
    if name.startswith("APOLLO"):
        from apollo_torch import APOLLOAdamW

        apollo = {**(APOLLO_MINI if mini else {**APOLLO, "rank": rank}),
                  "update_proj_gap": update_proj_gap}  # fmt: skip
        groups = [g for g in ({"params": rest}, {"params": low_rank, **apollo})
                  if g["params"]]  # fmt: skip
        return APOLLOAdamW(groups, lr=lr, scale_front=mini, **wd)
    from galore_torch import GaLoreAdamW

    galore = {**GALORE, "rank": rank, "update_proj_gap": update_proj_gap}
    return GaLoreAdamW(
        [{"params": rest}, {"params": low_rank, **galore}],
        lr=lr, no_deprecation_warning=True, **wd,
    )  # fmt: skip


def state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor the optimizer keeps, GaLore's projection matrices included."""
    tensors: list[Any] = []
    for state in optimizer.state.values():
        tensors += state.values()
        projector = state.get("projector")  # galore_torch keeps its P in an object
        tensors.append(getattr(projector, "ortho_matrix", None))
    return [t for t in tensors if torch.is_tensor(t)]


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the distinct storages behind ``state_tensors``."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in state_tensors(optimizer)}  # fmt: skip
    return sum(storages.values())
