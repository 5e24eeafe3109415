"""The torch optimizers the benchmarks compare, built one way, and their state bytes.

The alternatives are used from where they are installed and never copied:
flora-opt (LGPL) from its own folder, off the import path of the library and its
tests, and galore-torch from the environment (it imports transformers)::

    pip install --no-deps --target /work/benchdeps flora-opt==0.0.3 bitsandbytes
    pip install --no-deps galore-torch==1.0 bitsandbytes
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
)
# GaLore's usual settings (its README and the paper): SVD projection refreshed every
# 200 steps, update scaled by 0.25, the smaller side projected.
GALORE = {"update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}
EMBEDDING_ASPECT = (
    4  # flora-opt's rule: a longer/shorter side ratio above it is an embedding
)


def missing(name: str, flora_opt_path: str = FLORA_OPT_PATH) -> str | None:
    """Why ``name`` cannot be built here, or None."""
    if name not in NAMES:
        raise ValueError(f"Unknown optimizer {name!r} (expected one of {NAMES})")
    if name == "flora-opt Flora" and not os.path.isdir(flora_opt_path):
        return f"flora-opt not installed in {flora_opt_path}"
    if name == "GaLoreAdamW" and importlib.util.find_spec("galore_torch") is None:
        return "galore-torch not installed"
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
) -> torch.optim.Optimizer:
    """``name`` (one of ``NAMES``) over ``params`` at ``rank`` where it has one."""
    from flora_torch import FloraAdafactor, FloraAdam

    reason = missing(name, flora_opt_path)
    if reason:
        raise RuntimeError(f"{name}: {reason}")
    if name == "SGD (stateless)":
        return torch.optim.SGD(params, lr=lr)
    if name.startswith("AdamW"):
        kind = "fused" if "fused" in name else "foreach"
        return torch.optim.AdamW(params, lr=lr, **{kind: True})
    if name == "torch Adafactor":
        return torch.optim.Adafactor(params, lr=1e-2)
    if name.startswith("FloraAdam"):
        return FloraAdam(params, lr=lr, rank=rank, factored="factored" in name)
    if name == "FloraAdafactor":
        return FloraAdafactor(params, lr=lr, rank=rank)
    if name == "flora-opt Flora":
        flora = flora_opt_class(flora_opt_path)
        return flora(params, lr=lr, rank=rank, beta1=0.9, relative_step=False)
    from galore_torch import GaLoreAdamW

    low_rank = galore_targets(params, rank)
    rest = [p for p in params if all(p is not q for q in low_rank)]
    galore = {**GALORE, "rank": rank, "update_proj_gap": update_proj_gap}
    return GaLoreAdamW(
        [{"params": rest}, {"params": low_rank, **galore}],
        lr=lr, no_deprecation_warning=True,
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
