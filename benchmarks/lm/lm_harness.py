"""One pre-training run of the LM benchmark, and a process pool that caches runs on disk.

A run is a plain dict (JSON-able, so every result names its exact setting)::

    optimizer   one of ``_optimizers.NAMES``      rank   its rank (None: no rank)
    lr, seed    peak learning rate; seed of the init, the batches and FLORA's draws
    model       ``llama.Config`` fields           vocab, corpus   which tokens
    steps, batch, warmup, min_lr_ratio, clip, kappa, weight_decay
    eval_every, eval_windows, final_windows

Training: ``steps`` updates of ``batch`` random windows of ``model.context`` tokens
from the training files, linear warm-up over ``warmup`` steps then cosine decay to
``min_lr_ratio`` of the peak, gradients clipped to norm ``clip``. Every optimizer
is built by ``_optimizers.make_optimizer`` with the model's attention and
feed-forward matrices as the low-rank targets and ``kappa`` as both FLORA's
resampling interval and GaLore's/APOLLO's projection refresh.

Measured: validation loss (nats per token) on ``eval_windows`` fixed windows at step
0, every ``eval_every`` steps and at the end (``curve``), and at the end on
``final_windows`` windows spread over the validation files (``final_valid_loss``,
the benchmark's number); the optimizer
state bytes after training (``_optimizers.state_bytes``: moments, factored
moments, quantisation tables, GaLore's and APOLLO's projection matrices); wall
time of every training step and of its ``optimizer.step()``. A non-finite training
loss stops the run (``diverged``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import statistics
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

import llama
import numpy as np
import stdlib_corpus
import torch
from _optimizers import make_optimizer, state_bytes

ROOT = Path(__file__).resolve().parents[2]

# The sources and packages a run's numbers depend on: a cached run is reused only
# while all of them are unchanged. Flora's own sources key only Flora's runs, so a
# change to the library re-runs FLORA and leaves the baselines cached.
FLORA_SOURCES = ("flora_core/*.py", "adapters/flora_torch/*.py")
SOURCES = (
    "benchmarks/_optimizers.py",
    "benchmarks/lm/llama.py",
    "benchmarks/lm/lm_harness.py",
    "benchmarks/lm/stdlib_corpus.py",
)
PACKAGES = ("torch", "numpy", "galore-torch", "apollo-torch", "bitsandbytes")


def fingerprint(flora: bool = True) -> str:
    h = hashlib.sha256()
    for pattern in (FLORA_SOURCES if flora else ()) + SOURCES:
        for path in sorted(ROOT.glob(pattern)):
            h.update(path.relative_to(ROOT).as_posix().encode() + b"\0")
            h.update(path.read_bytes())
    for name in PACKAGES:
        try:
            h.update(f"{name}={importlib.metadata.version(name)}".encode())
        except importlib.metadata.PackageNotFoundError:
            h.update(f"{name}=none".encode())
    return h.hexdigest()[:16]


def lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: llama.Llama, windows: np.ndarray, batch: int = 32) -> float:
    """Mean next-token loss over ``windows`` (each ``context + 1`` tokens)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        rows = torch.from_numpy(windows[i : i + batch])
        total += float(model(rows[:, :-1], rows[:, 1:])) * len(rows)
        count += len(rows)
    model.train()
    return total / count


def build(cfg: dict, model: llama.Llama) -> torch.optim.Optimizer:
    params = list(model.parameters())
    return make_optimizer(
        cfg["optimizer"], params, rank=cfg["rank"] or 1, lr=cfg["lr"],
        targets=llama.block_matrices(model), kappa=cfg["kappa"],
        update_proj_gap=cfg["kappa"], weight_decay=cfg["weight_decay"],
        seed=cfg["seed"],
    )  # fmt: skip


def run(cfg: dict, cache: str | None = None) -> dict:
    """Train one configuration; returns the config with its measurements."""
    started = time.perf_counter()
    corpus = stdlib_corpus.load(cfg["vocab"], cache=cache, verbose=False)
    if corpus.meta["key"][:16] != cfg["corpus"]:
        raise RuntimeError(f"corpus {corpus.meta['key'][:16]} is not {cfg['corpus']}")
    torch.manual_seed(cfg["seed"])
    model = llama.Llama(llama.Config(**cfg["model"]))
    optimizer = build(cfg, model)
    steps, context = cfg["steps"], cfg["model"]["context"]
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, steps, cfg["warmup"], cfg["min_lr_ratio"]),
    )
    valid = stdlib_corpus.valid_windows(corpus.valid, cfg["final_windows"], context)
    stride = max(1, len(valid) // cfg["eval_windows"])
    curve_windows = valid[::stride][: cfg["eval_windows"]]
    params = list(model.parameters())
    curve, train_loss, step_s, opt_s = [], [], [], []
    diverged = False
    for step in range(steps + 1):
        if step % cfg["eval_every"] == 0 or step == steps:
            curve.append((step, step * cfg["batch"] * context,
                          evaluate(model, curve_windows)))  # fmt: skip
        if step == steps:
            break
        x, y = corpus_batch(corpus.train, step, cfg)
        t0 = time.perf_counter()
        loss = model(x, y)
        if not torch.isfinite(loss):
            diverged = True
            break
        loss.backward()
        if cfg["clip"]:
            torch.nn.utils.clip_grad_norm_(params, cfg["clip"])
        t1 = time.perf_counter()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        step_s.append(t2 - t0)
        opt_s.append(t2 - t1)
        train_loss.append(loss.item())
    final = math.inf if diverged else evaluate(model, valid)
    diverged = diverged or not math.isfinite(final)
    n_params = sum(p.numel() for p in params)
    state = state_bytes(optimizer)
    return dict(
        cfg, final_valid_loss=final, curve=curve,
        train_loss=train_loss, diverged=diverged, params=llama.count(model),
        state_bytes=state, state_bytes_per_param=state / n_params,
        step_seconds=statistics.median(step_s) if step_s else math.nan,
        step_seconds_mean=statistics.fmean(step_s) if step_s else math.nan,
        optimizer_step_seconds=statistics.median(opt_s) if opt_s else math.nan,
        seconds=time.perf_counter() - started,
        load_average_1m=round(os.getloadavg()[0], 2),
    )  # fmt: skip


def corpus_batch(tokens: np.ndarray, step: int, cfg: dict):
    x, y = stdlib_corpus.train_batch(
        tokens, step, cfg["seed"], cfg["batch"], cfg["model"]["context"]
    )
    return torch.from_numpy(x), torch.from_numpy(y)


def run_safe(cfg: dict, cache: str | None = None) -> dict:
    """``run``, with an exception returned as ``{"error": ...}`` (not cached)."""
    try:
        return run(cfg, cache)
    except Exception as exc:  # noqa: BLE001 - reported in the results, exact text
        return dict(cfg, error=f"{type(exc).__name__}: {exc}",
                    traceback=traceback.format_exc())  # fmt: skip


_NICED = False


def _worker_init() -> None:
    """One torch thread and ``nice 10`` (once per process: ``os.nice`` adds up)."""
    global _NICED
    torch.set_num_threads(1)
    if not _NICED:
        os.nice(10)
        _NICED = True


def key(cfg: dict, prints: dict[bool, str]) -> str:
    """The cache key of a run: its configuration and the fingerprint of what its
    numbers depend on (``prints[True]`` for Flora's optimizers)."""
    flora = cfg["optimizer"].startswith("Flora")
    text = json.dumps(cfg, sort_keys=True) + prints[flora]
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def label(cfg: dict) -> str:
    rank = f" r={cfg['rank']}" if cfg.get("rank") else ""
    return f"{cfg['size']} {cfg['optimizer']}{rank} lr={cfg['lr']:g} seed={cfg['seed']}"


class Runner:
    """Runs configurations ``workers`` at a time; each finished run is saved to
    ``cache/runs/<key>.json`` at once, so a re-run (or an interrupted run) skips it.
    ``estimate(cfg)`` gives a run's expected seconds, to start long runs first and
    print the time left."""

    def __init__(self, cache: Path, workers: int = 2, estimate=None) -> None:
        self.cache = Path(cache)
        self.folder = self.cache / "runs"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.workers = workers
        self.estimate = estimate or (lambda cfg: 1.0)
        self.print = {True: fingerprint(), False: fingerprint(flora=False)}
        self.seconds = 0.0
        self.ran = 0
        self.reused = 0

    def path(self, cfg: dict) -> Path:
        return self.folder / f"{key(cfg, self.print)}.json"

    def cached(self, cfg: dict) -> dict | None:
        path = self.path(cfg)
        return json.loads(path.read_text()) if path.exists() else None

    def __call__(self, configs: list[dict]) -> list[dict]:
        results: dict[str, dict] = {}
        todo: dict[str, dict] = {}
        for cfg in configs:
            k = key(cfg, self.print)
            hit = self.cached(cfg)
            if hit is not None:
                results[k] = hit
            else:
                todo[k] = cfg
        self.reused += len({key(c, self.print) for c in configs}) - len(todo)
        order = sorted(todo, key=lambda k: -self.estimate(todo[k]))
        left = sum(self.estimate(todo[k]) for k in order)
        started = time.perf_counter()
        if order:
            print(f"{len(order)} runs to do ({len(results)} cached), about "
                  f"{left / max(1, self.workers) / 60:.0f} min", flush=True)  # fmt: skip
        done = 0

        def finish(k: str, result: dict) -> None:
            nonlocal left, done
            done += 1
            left -= self.estimate(todo[k])
            results[k] = result
            if "error" in result:
                text = result["error"].splitlines()[0][:120]
            else:
                self.path(todo[k]).write_text(json.dumps(result) + "\n")
                self.ran += 1
                text = (f"valid {result['final_valid_loss']:.3f}, "
                        f"{result['step_seconds']:.2f} s/step, "
                        f"{result['seconds']:.0f} s")  # fmt: skip
            elapsed = time.perf_counter() - started
            print(f"[{done}/{len(order)}] {label(todo[k])}: {text}; {elapsed / 60:.1f} "
                  f"min so far, ~{left / max(1, self.workers) / 60:.0f} min left",
                  flush=True)  # fmt: skip

        if self.workers <= 1 or len(order) <= 1:
            _worker_init()
            for k in order:
                finish(k, run_safe(todo[k], str(self.cache)))
        else:
            with ProcessPoolExecutor(
                min(self.workers, len(order)), mp_context=get_context("spawn"),
                initializer=_worker_init,
            ) as pool:  # fmt: skip
                futures = {pool.submit(run_safe, todo[k], str(self.cache)): k
                           for k in order}  # fmt: skip
                pending = set(futures)
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        finish(futures[future], future.result())
        self.seconds += time.perf_counter() - started
        return [results[key(c, self.print)] for c in configs]
