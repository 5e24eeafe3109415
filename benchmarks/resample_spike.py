"""FloraAdam around a resample, on the demo's GPT: the largest |Δ|/lr per step.

    python benchmarks/resample_spike.py [--steps 300] [--kappa 100] [--seeds 0 1]
    python benchmarks/resample_spike.py --record FILE   # run the checkout's defaults
                                                         # and save them (a baseline)

Trains the demo's GPT (``demo/train.py``'s model, data and learning rate) with
``FloraAdam`` at ``rank="auto"`` and at r = 8 (d/r = 16), κ = 100, and records after
every step the largest ``|Δθ| / lr`` over the weight matrices, then compares the
first interval (steps 0..κ-1, no resample yet) with the 100 steps after each
resample, and the final validation loss. Rows: the library's defaults, the paper's
transfer (``transfer="paper"``), and, from ``benchmarks/results/resample_spike_v0.json``,
the library before issue 14 (recorded with ``--record`` on that commit: the paper's
transfer and a second moment that was not levelled at a resample); and, as an
ablation, the defaults and ``factored=True`` without the levelling.
Writes ``benchmarks/results/resample_spike.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [
    str(ROOT),
    str(ROOT / "adapters"),
    str(ROOT / "demo"),
    str(ROOT / "benchmarks"),
]

import numpy as np  # noqa: E402
import torch  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BASELINE = RESULTS / "resample_spike_v0.json"
RANKS = ("auto", 8)
LR = 3e-3  # demo/train.py's FloraAdam learning rate


@contextlib.contextmanager
def unlevelled():
    """An ablation, not an option: FloraAdam without the levelling of its second
    moment at a resample (NOTE [second moment at a resample] in flora_core/rules.py)."""
    from flora_core import rules

    levelled = rules._relevelled
    rules._relevelled = lambda state, count, plan, config, xp: state
    try:
        yield
    finally:
        rules._relevelled = levelled


def run(rank, seed: int, steps: int, kappa: int, levelled=True, **options) -> dict:
    with contextlib.nullcontext() if levelled else unlevelled():
        return _run(rank, seed, steps, kappa, **options)


def _run(rank, seed: int, steps: int, kappa: int, **options) -> dict:
    from flora_torch import FloraAdam
    from models_torch import GPT
    from train import Data

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    data = Data.build(None)
    model = GPT(data.vocab_size, 128, 2, 4, 64)
    optimizer = FloraAdam(model.parameters(), lr=LR, rank=rank, kappa=kappa, **options)
    matrices = [p for p in model.parameters() if p.ndim == 2]
    peaks, losses = [], []
    for step in range(steps):
        x, y = map(torch.from_numpy, data.batch("train", step, 16, 64))
        before = [p.detach().clone() for p in matrices]
        loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        peaks.append(max(float((p.detach() - b).abs().max()) / LR
                         for p, b in zip(matrices, before, strict=True)))  # fmt: skip
        losses.append(float(loss))
    model.eval()
    with torch.no_grad():
        val = [float(model(*map(torch.from_numpy, data.batch("val", i, 16, 64))))
               for i in range(20)]  # fmt: skip
    return {"peaks": peaks, "losses": losses, "val_loss": float(np.mean(val))}


def summary(result: dict, kappa: int) -> dict:
    peaks = result["peaks"]
    after = [max(peaks[k : k + 100]) for k in range(kappa, len(peaks), kappa)]
    return {"first_interval": max(peaks[:kappa]), "after_resamples": after,
            "val_loss": result["val_loss"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--kappa", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--record", help="run the defaults only and save them here")
    args = parser.parse_args()
    variants = (
        {"defaults": {}}
        if args.record
        else {
            "defaults": {},
            "transfer='paper'": {"transfer": "paper"},
            "ablation: v not levelled": {"levelled": False},
            "factored=True": {"factored": True},
            "factored=True, ablation: not levelled": {
                "factored": True, "levelled": False},
        }
    )  # fmt: skip
    runs = {
        f"{name} r={rank} seed={seed}": run(
            rank, seed, args.steps, args.kappa, **options
        )
        for name, options in variants.items()
        for rank in RANKS
        for seed in args.seeds
    }
    if args.record:
        Path(args.record).write_text(json.dumps(runs) + "\n")
        return
    if BASELINE.exists():
        runs.update({f"before issue 14 {k[len('defaults '):]}": v
                     for k, v in json.loads(BASELINE.read_text()).items()})  # fmt: skip
    report(args, runs)


def report(args, runs: dict) -> None:
    from _meta import markdown_header, provenance

    meta = provenance("torch", "numpy")
    table = {name: summary(r, args.kappa) for name, r in runs.items()}
    md = markdown_header("FloraAdam around a resample (the demo's GPT)", meta)
    md += (
        f"`FloraAdam(lr={LR:g}, kappa={args.kappa})` on the demo's GPT (width 128, "
        f"rank auto = 32 on the 128-wide matrices, or 8), {args.steps} steps. "
        "Largest |Δθ|/lr over the weight matrices in the first interval (no resample "
        "yet) and in the 100 steps after each resample; final validation loss.\n\n"
        "| run | first interval | after each resample | val loss |\n|---|---|---|---|\n"
        + "".join(
            f"| {name} | {s['first_interval']:.2f} | "
            + ", ".join(f"{a:.2f}" for a in s["after_resamples"])
            + f" | {s['val_loss']:.4f} |\n"
            for name, s in table.items()
        )
    )  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "resample_spike.md").write_text(md)
    (RESULTS / "resample_spike.json").write_text(
        json.dumps({"meta": meta, "summary": table, "runs": runs}) + "\n"
    )
    plot(runs, args.kappa)


def plot(runs: dict, kappa: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(RANKS), figsize=(6 * len(RANKS), 7), sharex=True)
    for column, rank in enumerate(RANKS):
        for name, r in runs.items():
            if f"r={rank} seed=0" not in name:
                continue
            label = name.replace(f" r={rank} seed=0", "")
            axes[0][column].plot(r["peaks"], label=label, lw=1)
            curve = np.convolve(r["losses"], np.ones(10) / 10, mode="valid")
            axes[1][column].plot(curve, label=f"{label} (val {r['val_loss']:.3f})")
        for row in axes:
            for k in range(kappa, len(next(iter(runs.values()))["peaks"]), kappa):
                row[column].axvline(k, color="gray", ls=":", lw=1)
        axes[0][column].set(yscale="log", ylabel="largest |Δθ| / lr",
                            title=f"FloraAdam, rank {rank}, κ = {kappa} (seed 0)")  # fmt: skip
        axes[1][column].set(xlabel="step", ylabel="training loss (10-step mean)")
        axes[0][column].legend()
        axes[1][column].legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "resample_spike.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
