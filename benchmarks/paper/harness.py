"""One training run of the small-scale paper protocols, and a 2-process job pool.

A run is described by a plain dict (JSON-able, so results name their exact setting):

    method    "none" | "naive" | "lora" | "flora"   (Adafactor-based, the paper's)
              "adamw" | "galore" | "flora_adam"      (Appendix C.2)
    setting   "momentum" (from scratch, ``steps`` updates of ``batch`` examples) or
              "accumulation" (``steps`` micro-batches of ``batch`` examples from the
              ``init`` checkpoint on the shifted distribution; τ = ``accumulation``)
    rank, lr, kappa, factored, seed, eval_every, distribution, init, galore_scale

Every run evaluates validation and test loss (mean cross-entropy per target character)
and exact match (all target characters right under teacher forcing, which equals
greedy decoding being right) every ``eval_every`` micro-batches; the result keeps the
test numbers of the checkpoint with the lowest validation loss (the paper's rule).
``mem`` is the optimizer state: the bytes of every state tensor (moments, second
moments, accumulators; GaLore's projection matrices too), measured after training.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import data
import torch
from _optimizers import state_bytes
from flora_torch import FloraAdafactor, FloraAdam
from model import GPT, add_lora, split_params

EVAL_EXAMPLES = 128
# optax's default factors a matrix whose second-largest axis is >= 128 (the paper's
# T5/GPT-2 widths are 512/768); at width 64 that would factor nothing, so scale it.
MIN_FACTOR = 32
# The library's defaults, unless a config names its own (the studies of both).
CLIP_AFTER_MOMENTUM = (
    inspect.signature(FloraAdafactor).parameters["clip_after_momentum"].default
)
TRANSFER = inspect.signature(FloraAdafactor).parameters["transfer"].default


def make_optimizer(cfg: dict, model: GPT) -> torch.optim.Optimizer:
    method, lr, tau = cfg["method"], cfg["lr"], cfg.get("accumulation", 1)
    tau = 1 if method == "none" else tau  # "None": no accumulation (physical batch)
    matrices, others = split_params(model)
    momentum = 0.9 if cfg["setting"] == "momentum" else None
    common = dict(
        lr=lr, factored=cfg.get("factored", True), kappa=cfg.get("kappa", 1000),
        seed=cfg["seed"], accumulation_steps=tau, min_dim_size_to_factor=MIN_FACTOR,
        clip_after_momentum=cfg.get("clip_after_momentum", CLIP_AFTER_MOMENTUM),
        transfer=cfg.get("transfer", TRANSFER),
    )  # fmt: skip
    if method == "none":
        return FloraAdafactor(model.parameters(), momentum=None, rank=None, **common)
    if method in ("naive", "lora"):  # LoRA: naive momentum / accumulation on A, B
        params = [p for p in model.parameters() if p.requires_grad]
        return FloraAdafactor(params, momentum=momentum, rank=None, **common)
    if method == "flora":
        groups = [{"params": matrices, "rank": cfg["rank"]}, {"params": others}]
        return FloraAdafactor(groups, momentum=momentum, rank=None, **common)
    if method == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    if method == "flora_adam":
        groups = [{"params": matrices, "rank": cfg["rank"]}, {"params": others}]
        return FloraAdam(
            groups, lr=lr, rank=None, kappa=cfg["kappa"], seed=cfg["seed"],
            factored=cfg.get("factored", True), transfer=cfg.get("transfer", TRANSFER),
        )  # fmt: skip
    if method == "galore":
        from galore_torch import GaLoreAdamW

        groups = [
            {"params": matrices, "rank": cfg["rank"], "update_proj_gap": cfg["kappa"],
             "scale": cfg.get("galore_scale", 0.25), "proj_type": "std"},
            {"params": others},
        ]  # fmt: skip
        return GaLoreAdamW(groups, lr=lr, weight_decay=0.0, no_deprecation_warning=True)
    raise ValueError(f"Unknown method {method!r}")


@torch.no_grad()
def evaluate(model: GPT, inputs: torch.Tensor, targets: torch.Tensor) -> dict:
    model.eval()
    logits = model.logits(inputs)
    mask = targets != data.IGNORE
    loss = torch.nn.functional.cross_entropy(
        logits[mask], targets[mask], reduction="mean"
    )
    right = (logits.argmax(-1) == targets) | ~mask
    model.train()
    return {"loss": float(loss), "exact": float(right.all(dim=1).float().mean())}


def run(cfg: dict) -> dict:
    """Train one configuration; returns the config with its measurements."""
    if cfg["method"] == "pretrain":
        return pretrain(cfg)
    started = time.perf_counter()
    torch.manual_seed(cfg["seed"])
    model = GPT(**cfg.get("model", {}))
    if cfg.get("init") is not None:
        model.load_state_dict(torch.load(cfg["init"], weights_only=True))
    torch.manual_seed(cfg["seed"] + 1)  # LoRA's A, independent of the model init
    adapters = add_lora(model, cfg["rank"]) if cfg["method"] == "lora" else []
    optimizer = make_optimizer(cfg, model)
    distribution = cfg.get("distribution", "pretrain")
    batch, steps, tau = cfg["batch"], cfg["steps"], cfg.get("accumulation", 1)
    per_update = 1 if cfg["method"] == "none" else tau
    inputs, targets = data.dataset(
        distribution, batch * steps, data.TRAIN_SEED + cfg["seed"]
    )
    valid = data.dataset(distribution, EVAL_EXAMPLES, data.VALID_SEED)
    test = data.dataset(distribution, EVAL_EXAMPLES, data.TEST_SEED)
    curve, train_loss, best = [], [], None
    for micro in range(steps + 1):
        if micro % cfg["eval_every"] == 0:
            v, t = evaluate(model, *valid), evaluate(model, *test)
            point = {"micro_batches": micro, "valid": v, "test": t}
            curve.append(point)
            if not math.isfinite(v["loss"]):
                break
            if micro > 0 and (best is None or v["loss"] < best["valid"]["loss"]):
                best = point
        if micro == steps:
            break
        rows = slice(micro * batch, (micro + 1) * batch)
        loss = model(inputs[rows], targets[rows])
        loss.backward()
        train_loss.append(loss.item())
        if (micro + 1) % per_update == 0:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    result = dict(cfg)
    result.update(
        curve=curve,
        best=best,
        mem=state_bytes(optimizer),
        adapter_bytes=sum(p.numel() * p.element_size() for p in adapters),
        diverged=best is None or not math.isfinite(curve[-1]["valid"]["loss"]),
        updates=steps // per_update,
        seconds=time.perf_counter() - started,
    )
    return result


def pretrain(cfg: dict) -> dict:
    """Train the fine-tuning init on the pretraining distribution; save it to ``path``.

    Adafactor with momentum (the paper's fine-tuning starts from released checkpoints;
    here the checkpoint is made in the benchmark itself). Cached by ``path``.
    """
    started = time.perf_counter()
    path = cfg["path"]
    if not os.path.exists(path):
        torch.manual_seed(cfg["seed"])
        model = GPT(**cfg.get("model", {}))
        optimizer = FloraAdafactor(
            model.parameters(), lr=cfg["lr"], momentum=0.9, rank=None,
            min_dim_size_to_factor=MIN_FACTOR,
            clip_after_momentum=cfg.get("clip_after_momentum", CLIP_AFTER_MOMENTUM),
        )  # fmt: skip
        inputs, targets = data.dataset(
            "pretrain", cfg["batch"] * cfg["steps"], data.PRETRAIN_SEED
        )
        for step in range(cfg["steps"]):
            rows = slice(step * cfg["batch"], (step + 1) * cfg["batch"])
            model(inputs[rows], targets[rows]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        torch.save(model.state_dict(), path + ".tmp")
        os.replace(path + ".tmp", path)
    model = GPT(**cfg.get("model", {}))
    model.load_state_dict(torch.load(path, weights_only=True))
    metrics = {
        d: evaluate(model, *data.dataset(d, EVAL_EXAMPLES, data.TEST_SEED))
        for d in ("pretrain", "shifted")
    }
    return dict(cfg, test=metrics, seconds=time.perf_counter() - started)


_NICED = False


def _worker_init() -> None:
    """One torch thread and ``nice 10`` (once per process: ``os.nice`` adds up)."""
    global _NICED
    torch.set_num_threads(1)
    if not _NICED:
        os.nice(10)
        _NICED = True


def key(cfg: dict) -> str:
    return json.dumps(cfg, sort_keys=True)


class Runner:
    """Runs configurations ``workers`` at a time, caching results by configuration."""

    def __init__(self, workers: int = 2) -> None:
        self.workers = workers
        self.cache: dict[str, dict] = {}
        self.seconds = 0.0

    def __call__(self, configs: list[dict]) -> list[dict]:
        todo = list({key(c): c for c in configs if key(c) not in self.cache}.values())
        started = time.perf_counter()
        if self.workers <= 1 or len(todo) <= 1:
            _worker_init()
            results = [run(c) for c in todo]
        else:
            context = get_context("spawn")
            with ProcessPoolExecutor(
                min(self.workers, len(todo)), mp_context=context,
                initializer=_worker_init,
            ) as pool:  # fmt: skip
                results = list(pool.map(run, todo))
        self.seconds += time.perf_counter() - started
        for cfg, result in zip(todo, results, strict=True):
            self.cache[key(cfg)] = result
        return [self.cache[key(c)] for c in configs]
