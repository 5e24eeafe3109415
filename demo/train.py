"""Train a small GPT from scratch with AdamW, Adafactor + momentum, FloraAdafactor and
FloraAdam, and compare them.

    python3 demo/train.py [--framework torch|optax|keras] [--rank 32] [--steps 300]
                          [--data FILE] [--optimizers adamw,adafactor,...]

Each optimizer trains in its own process (so peak memory is its own), on the same
data, initialisation and batches. Prints a table (validation loss, optimizer-state MB,
peak memory, steps/s) and writes demo/results/<framework>.{json,png}.
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
LEARNING_RATES = {
    "adamw": 3e-3,
    "adafactor": 1e-2,
    "flora-adafactor": 1e-2,
    "flora-adam": 3e-3,
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
    start = time.perf_counter()
    result = backend.train(args, name, data, progress)
    result["seconds"] = time.perf_counter() - start
    result["steps_per_s"] = args.steps / result["seconds"]
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


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
    header = f"{'optimizer':<16} {'val loss':>9} {'state MB':>9} {'peak MB':>8} {'steps/s':>8}"
    print(f"\n{framework}: {args.steps} steps, rank {args.rank}, kappa {args.kappa}, "
          f"{next(iter(results.values()))['params']:,} parameters")  # fmt: skip
    print(header + "\n" + "-" * len(header))
    for name, r in results.items():
        print(f"{name:<16} {r['val_loss']:>9.4f} {r['state_bytes'] / 2**20:>9.3f} "
              f"{r['peak_rss_mb']:>8.0f} {r['steps_per_s']:>8.1f}")  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"args": {k: v for k, v in vars(args).items() if k not in ("names", "worker")},
               "results": results}  # fmt: skip
    (out / f"{framework}.json").write_text(json.dumps(summary, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, r in results.items():
        curve = np.convolve(r["curve"], np.ones(10) / 10, mode="valid")
        ax.plot(curve, label=f"{name} (val {r['val_loss']:.3f})")
    ax.set(
        xlabel="step",
        ylabel="training loss (10-step mean)",
        title=f"Flora demo: {framework}",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{framework}.png", dpi=120)
    print(f"\nwrote {out / framework}.json and .png")


if __name__ == "__main__":
    main()
