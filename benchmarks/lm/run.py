"""Where FLORA stands on real text: pre-training at equal optimizer memory.

    nice python benchmarks/lm/run.py [--quick] [--workers 2] [--sizes S,XS] [--dry-run]

Pre-trains a LLaMA-style decoder (``llama.py``) from scratch on the Python standard
library's own source (``stdlib_corpus.py``: split by file, a byte-level BPE trained
here, nothing downloaded) at two sizes, with the optimizers a user would pick
instead of FLORA and with FLORA's, each at its own best learning rate:

1. sweep, at the first size only: every method and rank over its learning-rate
   grid, seed 0; the best final validation loss picks the learning rate (diverged
   runs never win);
2. seeds: the best learning rate again with the other seeds; the second size (XS,
   smaller) takes each method's best learning rate from the first (the same rank
   fraction), seeds 0 and 1. (A larger second size, width 192, and a sweep at both
   sizes did not fit a session of this 2-core machine.)

Then ``lm_report.py`` writes ``benchmarks/results/lm_frontier.{json,md,png}``:
validation loss against optimizer-state bytes (seed range as error bars), the
validation curves, a table (state bytes per parameter, seconds per step, final
validation loss) and the claims, marked from the numbers. Every run is cached on disk
(``$FLORA_LM_CACHE`` or ``~/.cache/flora/lm``; keyed by its configuration, the
library and benchmark sources and the package versions), so a re-run does only
what is missing. ``--quick`` is a smoke test of every stage at a toy scale (a few
minutes; its numbers mean nothing; written to the cache folder, not to results/).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import _paths  # noqa: F401
import llama
import lm_report
import stdlib_corpus
import torch
from _optimizers import NAMES, make_optimizer, missing, state_bytes
from lm_harness import Runner, label

# Learning-rate grids (peak lr of the schedule), one per method family: the
# Adam-scaled methods take absolute steps; GaLore (scale 0.25) and APOLLO (its scale
# factors) are swept around their papers' 1e-2; Adafactor's lr is relative to each
# parameter's RMS (about 0.02 here, the init), so its grid is about 10x higher
# (calibration on S: 0.03 / 0.1 / 0.3 gave 5.03 / 4.76 / 5.02).
ADAM_LRS = (1e-3, 3e-3, 1e-2)
HIGH_LRS = (3e-3, 1e-2, 3e-2)
ADAFACTOR_LRS = (3e-2, 1e-1, 3e-1)
METHODS = {  # name -> (learning-rate grid, takes a rank)
    "AdamW(foreach)": (ADAM_LRS, False),
    "AdamW8bit": (ADAM_LRS, False),
    "Adafactor+momentum": (ADAFACTOR_LRS, False),
    "GaLoreAdamW": (HIGH_LRS, True),
    "APOLLO": (HIGH_LRS, True),
    "APOLLO-Mini": (HIGH_LRS, False),
    "FloraAdam": (ADAM_LRS, True),
    "FloraAdam(factored)": (ADAM_LRS, True),
    "FloraAdafactor": (ADAFACTOR_LRS, True),
}


@dataclass(frozen=True)
class Size:
    name: str
    model: llama.Config
    batch: int
    steps: int
    ranks: tuple[int, ...]  # width / 8 and width / 4
    seconds_per_step: float  # calibration on one thread, quiet machine (estimate)


@dataclass(frozen=True)
class Scale:
    sizes: tuple[Size, ...]
    seeds: tuple[int, ...] = (0, 1)
    vocab: int = 4096
    warmup_fraction: float = 0.1
    min_lr_ratio: float = 0.1
    clip: float = 1.0
    kappa: int = 100  # FLORA's κ = GaLore's and APOLLO's update_proj_gap
    weight_decay: float = 0.0
    evals: int = 8
    eval_windows: int = 32
    final_windows: int = 256
    lr_points: int | None = None  # quick: only the grid's middle point
    swept: int = 1  # the first ``swept`` sizes sweep; the others take their lr
    methods: dict = field(default_factory=lambda: dict(METHODS))


FULL = Scale(
    sizes=(
        Size("S", llama.Config(width=128, depth=4, heads=4, context=128), batch=8,
             steps=256, ranks=(16, 32), seconds_per_step=0.18),
        Size("XS", llama.Config(width=96, depth=3, heads=3, context=128), batch=8,
             steps=256, ranks=(12, 24), seconds_per_step=0.10),
    ),
)  # fmt: skip
QUICK = replace(
    FULL,
    sizes=(
        Size("tiny", llama.Config(width=64, depth=2, heads=2, context=32), batch=4,
             steps=24, ranks=(8, 16), seconds_per_step=0.02),
    ),
    kappa=8, evals=2, eval_windows=8, final_windows=16, lr_points=1,
)  # fmt: skip
# Seconds per step of each optimizer relative to AdamW (calibration; only used for
# the printed estimate and to start long runs first).
COST = {"FloraAdam": 1.3, "FloraAdam(factored)": 1.3, "FloraAdafactor": 1.3,
        "AdamW8bit": 1.2, "APOLLO": 1.1, "GaLoreAdamW": 1.1}  # fmt: skip


def grid(scale: Scale, name: str) -> tuple[float, ...]:
    lrs = scale.methods[name][0]
    if scale.lr_points == 1:
        return (lrs[len(lrs) // 2],)
    return lrs


def base_config(scale: Scale, size: Size, corpus_key: str) -> dict:
    return dict(
        size=size.name, model=asdict(replace(size.model, vocab=scale.vocab)),
        vocab=scale.vocab, corpus=corpus_key, steps=size.steps, batch=size.batch,
        warmup=max(1, round(scale.warmup_fraction * size.steps)),
        min_lr_ratio=scale.min_lr_ratio, clip=scale.clip, kappa=scale.kappa,
        weight_decay=scale.weight_decay, eval_every=max(1, size.steps // scale.evals),
        eval_windows=scale.eval_windows, final_windows=scale.final_windows,
    )  # fmt: skip


def variants(
    scale: Scale, size: Size, names: list[str]
) -> list[tuple[str, int | None]]:
    """(optimizer, rank) of every compared method at ``size``."""
    out: list[tuple[str, int | None]] = []
    for name in names:
        out += (
            [(name, r) for r in size.ranks]
            if scale.methods[name][1]
            else [(name, None)]
        )
    return out


def probe(names: list[str]) -> dict[str, str]:
    """Why each optimizer cannot run here (exact error of building it and one step on
    a toy model), for those that cannot."""
    failed = {}
    for name in names:
        reason = missing(name)
        if reason is None:
            try:
                torch.manual_seed(0)
                model = llama.Llama(llama.Config(vocab=300, width=64, depth=1, heads=2,
                                                 context=8))  # fmt: skip
                opt = make_optimizer(name, list(model.parameters()), rank=8, lr=1e-3,
                                     targets=llama.block_matrices(model), kappa=4,
                                     update_proj_gap=4, weight_decay=0.0)  # fmt: skip
                tokens = torch.randint(0, 300, (2, 9))
                model(tokens[:, :-1], tokens[:, 1:]).backward()
                opt.step()
                state_bytes(opt)
            except Exception as exc:  # noqa: BLE001 - the exact error is the result
                reason = f"{type(exc).__name__}: {exc}"
        if reason:
            failed[name] = reason
    return failed


def estimate(scale: Scale):
    seconds = {s.name: s.seconds_per_step for s in scale.sizes}

    def cost(cfg: dict) -> float:
        evals = (cfg["steps"] // cfg["eval_every"] + 1) * cfg["eval_windows"]
        tokens = cfg["batch"] * cfg["steps"] + (evals + cfg["final_windows"]) / 3
        per_token = seconds[cfg["size"]] / cfg["batch"]
        return tokens * per_token * COST.get(cfg["optimizer"], 1.0) + 5

    return cost


def plan(scale: Scale, corpus_key: str, names: list[str]) -> dict[str, list[dict]]:
    """The sweep (seed 0) configurations of every swept size and method."""
    out = {}
    for size in scale.sizes[: scale.swept]:
        base = base_config(scale, size, corpus_key)
        for name, rank in variants(scale, size, names):
            out[f"{size.name}|{name}|{rank}"] = [
                dict(base, optimizer=name, rank=rank, lr=lr, seed=scale.seeds[0])
                for lr in grid(scale, name)
            ]
    return out


def best(runs: list[dict]) -> dict:
    """The run with the lowest final validation loss (a diverged run never wins)."""
    ok = [r for r in runs if "error" not in r and not r["diverged"]]
    return min(ok or runs, key=lambda r: r.get("final_valid_loss", float("inf")))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test, toy scale")
    parser.add_argument("--workers", type=int, default=2, help="processes at once")
    parser.add_argument("--sizes", default=None, help="comma-separated size names")
    parser.add_argument("--optimizers", default=None, help="comma-separated names")
    parser.add_argument("--cache", default=None, help="cache folder")
    parser.add_argument("--out", default=None, help="results folder")
    parser.add_argument("--dry-run", action="store_true", help="print the plan only")
    args = parser.parse_args(argv)
    scale = QUICK if args.quick else FULL
    if args.sizes:
        wanted = args.sizes.split(",")
        scale = replace(scale, sizes=tuple(s for s in scale.sizes if s.name in wanted))
    cache = Path(args.cache) if args.cache else stdlib_corpus.default_cache()
    out = Path(args.out) if args.out else (
        cache / "quick" if args.quick else lm_report.RESULTS)  # fmt: skip
    names = args.optimizers.split(",") if args.optimizers else list(scale.methods)
    unknown = [n for n in names if n not in scale.methods or n not in NAMES]
    if unknown:
        parser.error(f"unknown optimizers {unknown}; choose from {list(scale.methods)}")
    started = time.perf_counter()
    corpus = stdlib_corpus.load(scale.vocab, cache=cache)
    failed = probe(names)
    for name, reason in failed.items():
        print(f"cannot run {name}: {reason}", flush=True)
    names = [n for n in names if n not in failed]
    sweeps = plan(scale, corpus.meta["key"][:16], names)
    cost = estimate(scale)
    unswept = borrowed(scale, corpus.meta["key"][:16], names,
                       {k: v[:1] for k, v in sweeps.items()})  # fmt: skip
    n_runs = (sum(len(v) for v in sweeps.values())
              + len(sweeps) * (len(scale.seeds) - 1)
              + sum(len(v) for v in unswept.values()))  # fmt: skip
    total = (sum(cost(c) for v in sweeps.values() for c in v)
             + sum(cost(v[0]) * (len(scale.seeds) - 1) for v in sweeps.values())
             + sum(cost(c) for v in unswept.values() for c in v))  # fmt: skip
    print(f"{n_runs} runs: {', '.join(s.name for s in scale.sizes)}; {len(names)} "
          f"optimizers; estimate {total / 60:.0f} min of compute, about "
          f"{total / 60 / max(1, args.workers):.0f} min with {args.workers} workers on "
          f"a quiet machine (cached runs are free)", flush=True)  # fmt: skip
    if args.dry_run:
        for k, v in sweeps.items():
            print(k, [c["lr"] for c in v])
        return
    runner = Runner(cache, args.workers, estimate=cost)
    flat = [c for v in sweeps.values() for c in v]
    results = iter(runner(flat))
    swept = {k: [next(results) for _ in v] for k, v in sweeps.items()}
    finals = {}
    for k, runs in swept.items():
        pick = best(runs)
        finals[k] = [dict(pick_config(pick), seed=s) for s in scale.seeds]
    finals.update(borrowed(scale, corpus.meta["key"][:16], names, finals))
    swept.update({k: [] for k in finals if k not in swept})
    flat = [c for v in finals.values() for c in v]
    results = iter(runner(flat))
    seeds = {k: [next(results) for _ in v] for k, v in finals.items()}
    errors = sorted({(label(r), r["error"].splitlines()[0]) for r in
                     [*sum(swept.values(), []), *sum(seeds.values(), [])]
                     if "error" in r})  # fmt: skip
    for what, error in errors:
        print(f"failed: {what}: {error}", flush=True)
    wall = time.perf_counter() - started
    payload = lm_report.write(
        out, scale=scale_dict(scale), corpus=corpus.meta, sweeps=swept, seeds=seeds,
        unavailable=failed, errors=errors, wall_seconds=wall,
        runs={"ran": runner.ran, "reused": runner.reused, "workers": args.workers},
        quick=args.quick,
    )  # fmt: skip
    print(payload["markdown"])
    print(f"wrote {out}/lm_frontier.{{json,md,png}} in {wall / 60:.1f} min")


def borrowed(
    scale: Scale, corpus_key: str, names: list[str], finals: dict[str, list[dict]]
) -> dict[str, list[dict]]:
    """The seed runs of each size that is not swept, at the learning rate its
    method (and rank, by position: width/8, width/4) picked at the first size."""
    first = scale.sizes[0]
    out = {}
    for size in scale.sizes[scale.swept :]:
        base = base_config(scale, size, corpus_key)
        for name, rank in variants(scale, size, names):
            at = None if rank is None else first.ranks[size.ranks.index(rank)]
            lr = finals[f"{first.name}|{name}|{at}"][0]["lr"]
            out[f"{size.name}|{name}|{rank}"] = [
                dict(base, optimizer=name, rank=rank, lr=lr, seed=s)
                for s in scale.seeds
            ]
    return out


def pick_config(result: dict) -> dict:
    """The configuration part of a result (drop the measurements)."""
    keys = ("size", "model", "vocab", "corpus", "steps", "batch", "warmup",
            "min_lr_ratio", "clip", "kappa", "weight_decay", "eval_every",
            "eval_windows", "final_windows", "optimizer", "rank", "lr", "seed")  # fmt: skip
    return {k: result[k] for k in keys}


def scale_dict(scale: Scale) -> dict:
    d = asdict(scale)
    d["methods"] = {k: {"lrs": v[0], "rank": v[1]} for k, v in scale.methods.items()}
    return json.loads(json.dumps(d))


if __name__ == "__main__":
    main()
