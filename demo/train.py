"""Train a small GPT from scratch with AdamW, Adafactor + momentum, FloraAdafactor and
FloraAdam, and compare them.

    python3 demo/train.py [--framework torch|optax|keras] [--rank 32] [--steps 300]
                          [--data FILE] [--optimizers adamw,adafactor,...]

Each optimizer trains in its own process (so peak memory is its own), on the same
data, initialisation and batches. Prints a table (the FLORA rank each kind of matrix
got, validation loss, optimizer-state MB and its share of AdamW's, peak memory and
how much training added to it, steps/s) and writes demo/results/<framework>.{json,png}:
the loss curves beside the optimizer state and the peak memory of each optimizer.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT), str(ROOT / "adapters")]

import corpus  # noqa: E402

OPTIMIZERS = ("adamw", "adafactor", "flora-adafactor", "flora-adam")
# Each optimizer's best final validation loss on the default run (seed 0) over
# {3e-4, 1e-3, 3e-3, 1e-2} (Adam) and {1e-2, 3e-2, 1e-1, 3e-1} (Adafactor, whose lr is
# relative to each parameter's RMS): `--lr name=value` to try others.
LEARNING_RATES = {
    "adamw": 1e-3,
    "adafactor": 1e-1,
    "flora-adafactor": 3e-2,
    "flora-adam": 1e-3,
}


@dataclass
class Data:
    """Character-level token ids and deterministic batches (same on every framework)."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int

    @classmethod
    def build(cls, path: str | None) -> Data:
        train, val = corpus.load(path)
        chars = sorted(set(train) | set(val))
        index = {c: i for i, c in enumerate(chars)}
        encode = lambda text: np.array([index[c] for c in text], dtype=np.int64)  # noqa: E731
        return cls(encode(train), encode(val), len(chars))

    def batch(
        self, split: str, step: int, size: int, context: int
    ) -> tuple[np.ndarray, np.ndarray]:
        ids = self.train if split == "train" else self.val
        rng = np.random.default_rng([step, split == "val"])
        starts = rng.integers(0, len(ids) - context - 1, size=size)
        x = np.stack([ids[s : s + context] for s in starts])
        y = np.stack([ids[s + 1 : s + context + 1] for s in starts])
        return x, y


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--framework", choices=("torch", "optax", "keras"), default="torch")
    p.add_argument(
        "--keras-backend", default="torch", choices=("torch", "jax", "tensorflow")
    )
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    p.add_argument(
        "--rank",
        type=int,
        default=None,
        help="FLORA rank (default: the library's rank='auto': width // 4)",
    )
    p.add_argument("--kappa", type=int, default=100, help="resampling interval")
    p.add_argument(
        "--lr",
        dest="lr_overrides",
        default="",
        help="learning rates to override, e.g. adamw=1e-3,flora-adam=3e-3 "
        f"(defaults: {','.join(f'{k}={v:g}' for k, v in LEARNING_RATES.items())})",
    )
    p.add_argument("--steps", type=int, default=300)
    p.add_argument(
        "--data", default=None, help="a UTF-8 text file (default: generated)"
    )
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    names = args.optimizers.split(",")
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        p.error(f"unknown optimizers {unknown}; choose from {OPTIMIZERS}")
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    args.names = names
    args.lr = dict(LEARNING_RATES)
    for item in filter(None, args.lr_overrides.split(",")):
        name, _, value = item.partition("=")
        if name not in OPTIMIZERS:
            p.error(f"--lr: unknown optimizer {name!r}; choose from {OPTIMIZERS}")
        try:
            args.lr[name] = float(value)
        except ValueError:
            p.error(f"--lr: {item!r} is not name=float")
        if not args.lr[name] > 0:
            p.error(f"--lr: {name} must be > 0, got {value}")
    if args.rank is None:
        args.rank = "auto"
    return args


def worker(args) -> None:
    from tqdm import tqdm

    data = Data.build(args.data)
    if args.framework == "torch":
        import models_torch as backend
    elif args.framework == "optax":
        import models_optax as backend
    else:
        os.environ["KERAS_BACKEND"] = args.keras_backend
        import models_keras as backend
    name = args.worker
    progress = lambda it: tqdm(it, desc=f"{name:>16}", file=sys.stderr, ncols=88)  # noqa: E731
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    result = backend.train(args, name, data, progress)
    result["seconds"] = time.perf_counter() - start
    result["steps_per_s"] = args.steps / result["seconds"]
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # Peak RSS before training: the framework, the data and the imports.
    result["rss_before_training_mb"] = before
    result["ranks"] = ranks_used(args, data.vocab_size)
    print("RESULT " + json.dumps(result))


def ranks_used(args, vocab_size: int) -> dict[str, int | None]:
    """The rank FLORA gives each kind of matrix of the demo's GPT (None: kept whole).

    ``rank="auto"`` depends on each matrix's smaller side (``flora_core.policy``, the
    library's only copy of the rule), which is the same on every framework.
    """
    from flora_core import policy

    w = args.width
    kinds = {
        f"attention/MLP ({w} wide)": (w, 4 * w),
        f"embedding, head ({vocab_size} x {w})": (vocab_size, w),
        f"positions ({args.context} x {w})": (args.context, w),
    }
    return {k: policy.plan(s, 0, rank=args.rank).rank for k, s in kinds.items()}


def rank_text(args, results: dict) -> str:
    """``"rank auto: 32 on attention/MLP (128 wide), ..."`` from a FLORA run."""
    ranks = next(
        (r["ranks"] for n, r in results.items() if n.startswith("flora")), None
    )
    if not ranks:
        return f"rank {args.rank}"
    parts = [f"{'not compressed' if r is None else r} on {k}" for k, r in ranks.items()]
    return f"FLORA rank {args.rank}: " + ", ".join(parts)


def main() -> None:
    args = parse()
    if args.worker:
        worker(args)
        return
    results = {}
    for name in args.names:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", name]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if proc.returncode:
            sys.exit(f"{name} failed (exit {proc.returncode})")
        line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
        results[name] = json.loads(line[len("RESULT ") :])
    report(args, results)


def report(args, results: dict) -> None:
    framework = args.framework + (
        f"-{args.keras_backend}" if args.framework == "keras" else ""
    )
    ranks = rank_text(args, results)
    block_rank = next(
        (next(iter(r["ranks"].values())) for n, r in results.items() if "ranks" in r),
        None,
    )
    header = (
        f"{'optimizer':<16} {'rank':>5} {'val loss':>9} {'state MB':>9} "
        f"{'vs AdamW':>9} {'peak MB':>8} {'+train MB':>9} {'steps/s':>8}"
    )
    print(f"\n{framework}: {args.steps} steps, kappa {args.kappa}, "
          f"{next(iter(results.values()))['params']:,} parameters; {ranks}")  # fmt: skip
    print(header + "\n" + "-" * len(header))
    adamw = results.get("adamw", {}).get("state_bytes")
    for name, r in results.items():
        rank = block_rank if name.startswith("flora") else "-"
        ratio = f"{r['state_bytes'] / adamw:>8.2f}x" if adamw else f"{'':>9}"
        grew = r["peak_rss_mb"] - r.get("rss_before_training_mb", r["peak_rss_mb"])
        print(f"{name:<16} {rank!s:>5} {r['val_loss']:>9.4f} "
              f"{r['state_bytes'] / 2**20:>9.3f} {ratio} {r['peak_rss_mb']:>8.0f} "
              f"{grew:>9.0f} {r['steps_per_s']:>8.1f}")  # fmt: skip
    print("state MB: optimizer state (every state tensor); peak MB: the process's peak "
          "RSS;\n+train MB: how much training raised it above the framework and data "
          "(model, activations,\noptimizer state; at this size the state is a small "
          "part of it).")  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"args": {k: v for k, v in vars(args).items() if k not in ("names", "worker")},
               "ranks": ranks, "results": results}  # fmt: skip
    (out / f"{framework}.json").write_text(json.dumps(summary, indent=1))
    plot(out / f"{framework}.png", framework, args, results, ranks)
    print(f"\nwrote {out / framework}.json and .png")


def plot(path: Path, framework: str, args, results: dict, ranks: str) -> None:
    """Loss curves beside the memory each optimizer keeps (and the peak it reached)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    colors = {n: f"C{i}" for i, n in enumerate(names)}
    fig, axes = plt.subplots(
        1, 3, figsize=(16, 4.6), gridspec_kw={"width_ratios": [1.5, 1, 1]}
    )
    ax = axes[0]
    for name, r in results.items():
        curve = np.convolve(r["curve"], np.ones(10) / 10, mode="valid")
        ax.plot(curve, color=colors[name], label=f"{name} (val {r['val_loss']:.3f})")
    ax.set(xlabel="step", ylabel="training loss (10-step mean)", title="loss")
    ax.legend()
    adamw = results.get("adamw", {}).get("state_bytes")
    ax = axes[1]
    mb = [results[n]["state_bytes"] / 2**20 for n in names]
    ax.barh(names, mb, color=[colors[n] for n in names])
    for i, (n, value) in enumerate(zip(names, mb, strict=True)):
        share = f" ({results[n]['state_bytes'] / adamw:.0%} of AdamW)" if adamw else ""
        ax.text(value, i, f" {value:.2f} MB{share}", va="center", fontsize=8)
    ax.set_xlim(0, max(mb) * 1.7)
    ax.invert_yaxis()
    ax.set(xlabel="MB", title="optimizer state")
    ax = axes[2]
    grew = [
        results[n]["peak_rss_mb"]
        - results[n].get("rss_before_training_mb", results[n]["peak_rss_mb"])
        for n in names
    ]
    ax.barh(names, grew, color=[colors[n] for n in names], alpha=0.6)
    for i, (n, value) in enumerate(zip(names, grew, strict=True)):
        peak = results[n]["peak_rss_mb"]
        ax.text(
            value, i, f" +{value:.0f} MB (peak {peak:.0f})", va="center", fontsize=8
        )
    ax.set_xlim(0, max(max(grew), 1) * 1.8)
    ax.invert_yaxis()
    ax.set(
        xlabel="MB",
        title="peak RSS growth while training\n(framework buffers, activations, state)",
    )
    fig.suptitle(
        f"Flora demo: {framework}, {args.steps} steps, "
        f"{next(iter(results.values()))['params']:,} parameters; {ranks}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
