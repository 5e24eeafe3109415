"""The scaled-down protocols shared by the table scripts: scale, sweeps, rows.

Scale (``--quick`` shrinks every axis to a smoke test):
  * model: the GPT of ``model.py``, width 64 (d), 2 blocks, 4 heads, 0.1 M params;
    ranks r = 8, 16, 32 (8 to d/2, as the paper's 8 to 256 at d = 512);
  * momentum (Table 2, 3, C.2): from scratch, 400 updates of 8 examples;
  * accumulation (Tables 1, 4): fine-tune the benchmark's own checkpoint (600
    Adafactor+momentum updates on the pretraining distribution) on the shifted
    distribution for one epoch of 1280 micro-batches of 4 examples, τ = 16 (80
    updates; "None" makes an update per micro-batch: 1280 updates);
  * κ = 100 (the paper's 1000 with longer runs: about 4 resamplings per run).

Protocol (the paper's): the learning rate is swept for Naive on validation loss and
applied to None and FLORA; LoRA is swept on its own, per rank. Each run keeps the
checkpoint with the lowest validation loss and reports its test numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import tempfile
from dataclasses import asdict, dataclass

from harness import CLIP_AFTER_MOMENTUM, Runner


@dataclass(frozen=True)
class Scale:
    ranks: tuple[int, ...] = (8, 16, 32)
    lrs: tuple[float, ...] = (1e-2, 3e-2, 1e-1)  # Adafactor's relative step
    lora_lrs: tuple[float, ...] = (3e-2, 1e-1, 3e-1)
    seeds: tuple[int, ...] = (0, 1)  # final rows of Tables 1 and 2; sweeps: seed 0
    momentum_steps: int = 400
    momentum_batch: int = 8
    kappa: int = 100
    kappas: tuple[int, ...] = (1, 10, 50, 100, 200, 1000)  # 1000: never resampled
    kappa_ranks: tuple[int, ...] = (32, 8)  # Table 3's r = d/2, and d/r = 8
    pretrain_steps: int = 600
    accumulation_micro: int = 1280
    accumulation_batch: int = 4
    tau: int = 16
    evals: int = 8  # evaluations per run (plus one at the start)
    adam_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    galore_lrs: tuple[float, ...] = (3e-3, 1e-2, 3e-2)
    galore_ranks: tuple[int, ...] = (8, 32)


QUICK = Scale(
    ranks=(8, 32), lrs=(3e-2,), lora_lrs=(1e-1,), seeds=(0,), momentum_steps=48,
    kappas=(1, 10, 100), kappa_ranks=(8,), pretrain_steps=48, accumulation_micro=128, evals=2,
    adam_lrs=(3e-3,), galore_lrs=(1e-2,), galore_ranks=(8,),
)  # fmt: skip


def parse(description: str) -> tuple[argparse.Namespace, Scale]:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="smoke-test scale")
    parser.add_argument("--workers", type=int, default=2, help="processes at once")
    args = parser.parse_args()
    return args, (QUICK if args.quick else Scale())


def momentum_base(scale: Scale) -> dict:
    steps = scale.momentum_steps
    return dict(
        setting="momentum", steps=steps, batch=scale.momentum_batch, seed=0,
        eval_every=steps // scale.evals, kappa=scale.kappa, rank=None,
    )  # fmt: skip


def pretrain_config(scale: Scale) -> dict:
    cfg = dict(
        method="pretrain", seed=0, lr=3e-2, batch=8, steps=scale.pretrain_steps,
        clip_after_momentum=CLIP_AFTER_MOMENTUM,  # part of the cached file's key
    )  # fmt: skip
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(tempfile.gettempdir(), f"flora_paper_pretrained_{digest}.pt")
    return dict(cfg, path=path)


def accumulation_base(scale: Scale, runner: Runner) -> tuple[dict, dict]:
    """The fine-tuning base config and the pretraining run it starts from."""
    pre = runner([pretrain_config(scale)])[0]
    micro, tau = scale.accumulation_micro, scale.tau
    every = max(tau, micro // scale.evals // tau * tau)  # evaluate after updates
    base = dict(
        setting="accumulation", distribution="shifted", steps=micro,
        batch=scale.accumulation_batch, accumulation=tau, seed=0, eval_every=every,
        kappa=scale.kappa, rank=None, init=pre["path"],
    )  # fmt: skip
    return base, pre


def score(result: dict) -> float:
    """Validation loss of the best checkpoint (inf when the run diverged at once)."""
    best = result["best"]
    return best["valid"]["loss"] if best else math.inf


def best_of(results: list[dict]) -> dict:
    return min(results, key=score)


def summarise(name: str, runs: list[dict], baseline_mem: int | None) -> dict:
    """One table row: memory, ΔM, and metrics as mean and half-range over seeds."""

    def stat(values: list[float]) -> dict:
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            return {"mean": math.inf, "spread": 0.0, "values": values}
        spread = (max(finite) - min(finite)) / 2 if len(finite) > 1 else 0.0
        return {"mean": statistics.fmean(finite), "spread": spread, "values": values}

    def pick(run: dict, split: str, metric: str) -> float:
        return run["best"][split][metric] if run["best"] else math.inf

    mem = runs[0]["mem"]
    return {
        "name": name, "method": runs[0]["method"], "rank": runs[0].get("rank"),
        "lr": runs[0]["lr"], "kappa": runs[0].get("kappa"), "seeds": len(runs),
        "mem": mem, "delta_mem": None if baseline_mem is None else mem - baseline_mem,
        "adapter_bytes": runs[0]["adapter_bytes"],
        "valid_loss": stat([pick(r, "valid", "loss") for r in runs]),
        "test_loss": stat([pick(r, "test", "loss") for r in runs]),
        "test_exact": stat([pick(r, "test", "exact") for r in runs]),
        "diverged": sum(r["diverged"] for r in runs),
        "curve": [(p["micro_batches"], p["valid"]["loss"]) for p in runs[0]["curve"]],
    }  # fmt: skip


def sweep_lrs(runner: Runner, scale: Scale, base: dict) -> tuple[dict, dict]:
    """Naive's learning rate and each LoRA(r)'s, by best validation loss (seed 0)."""
    naive = [dict(base, method="naive", lr=lr) for lr in scale.lrs]
    lora = [
        dict(base, method="lora", rank=r, lr=lr)
        for r in scale.ranks
        for lr in scale.lora_lrs
    ]
    results = runner(naive + lora)  # one batch: both sweeps in parallel
    sweeps = {"naive": results[: len(naive)]}
    lrs: dict = {"naive": best_of(sweeps["naive"])["lr"], "lora": {}}
    for r in scale.ranks:
        sweeps[f"lora{r}"] = [x for x in results[len(naive) :] if x["rank"] == r]
        lrs["lora"][r] = best_of(sweeps[f"lora{r}"])["lr"]
    return lrs, sweeps


def rank_table(
    runner: Runner, scale: Scale, base: dict, *, lrs: dict | None = None,
    seeds: tuple[int, ...] | None = None,
) -> dict:  # fmt: skip
    """None / Naive / LoRA(r) / FLORA(r) rows under ``base`` (Tables 1, 2 and 4).

    Sweeps Naive's and each LoRA(r)'s learning rate unless ``lrs`` gives them
    (``{"naive": lr, "lora": {r: lr}}``, e.g. Table 4 reusing Table 1's).
    """
    seeds = scale.seeds if seeds is None else seeds
    sweeps: dict = {}
    if lrs is None:
        lrs, sweeps = sweep_lrs(runner, scale, base)
    lr = lrs["naive"]
    configs = {
        "None": dict(base, method="none", lr=lr),
        "Naive": dict(base, method="naive", lr=lr),
    }
    for r in scale.ranks:
        configs[f"LoRA({r})"] = dict(base, method="lora", rank=r, lr=lrs["lora"][r])
    for r in scale.ranks:
        configs[f"FLORA({r})"] = dict(base, method="flora", rank=r, lr=lr)
    flat = [dict(c, seed=s) for c in configs.values() for s in seeds]
    runs = runner(flat)
    rows, baseline = [], None
    for i, name in enumerate(configs):
        chunk = runs[i * len(seeds) : (i + 1) * len(seeds)]
        baseline = chunk[0]["mem"] if name == "None" else baseline
        rows.append(summarise(name, chunk, baseline))
    sweep_table = {
        k: [{"lr": x["lr"], "valid_loss": score(x)} for x in v]
        for k, v in sweeps.items()
    }
    return {"rows": rows, "lrs": lrs, "sweeps": sweep_table, "scale": asdict(scale)}
