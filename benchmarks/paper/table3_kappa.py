"""Table 3 at small scale: the resampling interval κ of compressed momentum.

    nice python benchmarks/paper/table3_kappa.py [--quick] [--workers 2]

Table 2's setting (from scratch, momentum) with FLORA at r = d/2 = 32 (the paper's
T5 run uses r = 256 = d/2), Naive's swept learning rate, and κ from 1 (a new
projection every update) to 10^6 (never resampled in a 400-update run). One seed.

NOTE [κ = 1]: the momentum transfer ``M <- M A_old A_newᵀ`` (Algorithm 2) multiplies
the moment's squared norm by about d/r on average for independent Gaussian
projections (each entry of the r x r product has variance d/r²), so resampling every
update grows the moment by ``β sqrt(d/r)`` = 0.9 · sqrt(2) ≈ 1.27 per update at
r = d/2: the run diverges, as the paper's κ = 1 row (ROUGE 0.00) does.
Writes ``benchmarks/results/paper_table3_kappa.{json,md,png}``.
"""

from __future__ import annotations

import math

import _paths  # noqa: F401
import report
from common import Scale, momentum_base, parse, summarise, sweep_lrs
from harness import Runner

STEM = "paper_table3_kappa"
TITLE = "Table 3 (small scale): the effect of κ in compressed momentum"


def main(runner: Runner, scale: Scale, lr: float | None = None) -> dict:
    base = momentum_base(scale)
    if lr is None:
        lr = sweep_lrs(runner, scale, base)[0]["naive"]
    rank = scale.ranks[-1]
    runs = runner(
        [dict(base, method="flora", rank=rank, lr=lr, kappa=k) for k in scale.kappas]
    )
    rows = [
        summarise(f"κ={k}", [x], None) for k, x in zip(scale.kappas, runs, strict=True)
    ]
    losses = [row["test_loss"]["mean"] for row in rows]
    best = min(range(len(rows)), key=losses.__getitem__)
    interior = 0 < best < len(rows) - 1 and losses[best] < min(losses[0], losses[-1])
    claims = [
        f"- κ has an interior optimum: **{'held' if interior else 'did not hold'}**; "
        f"best κ = {scale.kappas[best]} (test loss {losses[best]:.3f}); κ = "
        f"{scale.kappas[0]}: {losses[0]:.3f}, κ = {scale.kappas[-1]}: {losses[-1]:.3f}."
    ]
    meta, md = report.header(TITLE)
    md += (
        f"Table 2's setting ({scale.momentum_steps} updates of {scale.momentum_batch} "
        f"examples from scratch), FLORA({rank}) momentum, lr {lr:g} (Naive's best). "
        f"Mem = optimizer-state bytes. One seed.\n\n"
        "| κ | Mem KiB | valid loss | test loss | test exact match |\n|---|---|---|---|---|\n"
        + "\n".join(
            f"| {k} | {report.kib(r['mem'])} | {report.metric(r['valid_loss'])} | "
            f"{report.metric(r['test_loss'])} | {report.metric(r['test_exact'])} |"
            for k, r in zip(scale.kappas, rows, strict=True)
        )
        + "\n\nClaims:\n\n" + "\n".join(claims) + "\n"
    )  # fmt: skip
    report.write(
        STEM, meta, {"rank": rank, "lr": lr, "rows": rows, "claims": claims}, md
    )
    plot(scale, rows)
    return {"rows": rows, "claims": claims, "markdown": md}


def plot(scale: Scale, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ys = [r["test_loss"]["mean"] for r in rows]
    finite = [(k, y) for k, y in zip(scale.kappas, ys, strict=True) if math.isfinite(y)]
    axes[0].plot(*zip(*finite, strict=True), "o-")
    top = max(y for _, y in finite)
    for k, y in zip(scale.kappas, ys, strict=True):
        if not math.isfinite(y):  # diverged: mark it above the others
            axes[0].plot([k], [top], "rx", ms=10)
            axes[0].annotate(f"κ={k}: diverged", (k, top), textcoords="offset points",
                             xytext=(5, -12), color="red")  # fmt: skip
    axes[0].set(
        xscale="log",
        xlabel="κ (updates between resamplings)",
        ylabel="test loss (nats/char)",
        title=f"FLORA({scale.ranks[-1]}) momentum",
    )
    for k, row in zip(scale.kappas, rows, strict=True):
        xs, vs = zip(*row["curve"], strict=True)
        axes[1].plot(xs, vs, label=f"κ={k}")
    axes[1].set(
        xlabel="updates", ylabel="validation loss", yscale="log", title="curves"
    )
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(report.RESULTS / f"{STEM}.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    args, scale = parse(__doc__.splitlines()[0])
    print(main(Runner(args.workers), scale)["markdown"])
