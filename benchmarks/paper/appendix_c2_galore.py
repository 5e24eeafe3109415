"""Appendix C.2 at small scale: FLORA against GaLore (``galore-torch``), equal rank.

    nice python benchmarks/paper/appendix_c2_galore.py [--quick] [--workers 2]

From-scratch training as Table 2 (the paper pre-trains LLaMA-style models on C4),
with Adam-family optimizers on every method:

- AdamW: ``torch.optim.AdamW`` (full moments), the reference;
- GaLore(r): ``galore_torch.GaLoreAdamW`` on the attention/feed-forward matrices
  (rank r, ``scale=0.25``, SVD projection refreshed every ``update_proj_gap`` = κ
  updates, ``proj_type="std"``: the smaller axis, as FLORA), AdamW elsewhere;
- FLORA(r): ``FloraAdam(factored=True)`` on the same matrices (compressed first
  moment, factored second moment: sublinear as the paper's Adafactor-based FLORA),
  resampled every κ updates; Adam with a factored v elsewhere. Also run with
  ``factored=False`` (full second moment, like GaLore's uncompressed parameters) at
  FLORA's best learning rate, to separate the two memory savings.

Every method's learning rate is swept on validation loss; FLORA is also run at
GaLore's best learning rate / 3 (the paper's protocol: "the learning rate is 3 times
smaller for FLORA"). Mem counts the moments and GaLore's stored projection matrices.
One seed. Writes ``benchmarks/results/paper_c2_galore.{json,md,png}``.
"""

from __future__ import annotations

import _paths  # noqa: F401
import report
from common import Scale, best_of, momentum_base, parse, score, summarise
from harness import Runner

STEM = "paper_c2_galore"
TITLE = "Appendix C.2 (small scale): FLORA vs GaLore at equal rank"


def main(runner: Runner, scale: Scale) -> dict:
    base = momentum_base(scale)
    configs = [dict(base, method="adamw", lr=lr) for lr in scale.adam_lrs]
    for r in scale.galore_ranks:
        configs += [
            dict(base, method="galore", rank=r, lr=lr) for lr in scale.galore_lrs
        ]
        configs += [
            dict(base, method="flora_adam", rank=r, lr=lr) for lr in scale.adam_lrs
        ]
    runs = runner(configs)
    sweeps = {}
    for x in runs:
        name = x["method"] + (f"({x['rank']})" if x.get("rank") else "")
        sweeps.setdefault(name, []).append(x)
    ranks = scale.galore_ranks
    extra = runner(
        [
            dict(base, method="flora_adam", rank=r, lr=best_of(sweeps[f"galore({r})"])["lr"] / 3)
            for r in ranks
        ]
        + [
            dict(base, method="flora_adam", rank=r, factored=False,
                 lr=best_of(sweeps[f"flora_adam({r})"])["lr"])
            for r in ranks
        ]
    )  # fmt: skip
    paper, full_v = extra[: len(ranks)], extra[len(ranks) :]
    baseline = best_of(sweeps["adamw"])["mem"]
    rows = [summarise("AdamW", [best_of(sweeps["adamw"])], baseline)]
    claims = []
    for r, at_third, unfactored in zip(ranks, paper, full_v, strict=True):
        g, f = best_of(sweeps[f"galore({r})"]), best_of(sweeps[f"flora_adam({r})"])
        rows += [summarise(f"GaLore({r})", [g], baseline),
                 summarise(f"FLORA({r})", [f], baseline),
                 summarise(f"FLORA({r}), lr = GaLore's / 3", [at_third], baseline),
                 summarise(f"FLORA({r}), full second moment", [unfactored], baseline)]  # fmt: skip
        gl, fl = g["best"]["test"]["loss"], f["best"]["test"]["loss"]
        tl = at_third["best"]["test"]["loss"] if at_third["best"] else float("inf")
        claims.append(
            f"- r={r}: FLORA better than GaLore (test loss, each at its best lr): "
            f"**{'held' if fl < gl else 'did not hold'}** ({fl:.3f} vs {gl:.3f}; FLORA "
            f"at GaLore's lr/3: {tl:.3f}); FLORA uses less memory: "
            f"**{'held' if f['mem'] < g['mem'] else 'did not hold'}** "
            f"({report.kib(f['mem'])} vs {report.kib(g['mem'])} KiB; with a full second "
            f"moment FLORA holds {report.kib(unfactored['mem'])} KiB)."
        )
    meta, md = report.header(TITLE)
    md += (
        f"Table 2's setting ({scale.momentum_steps} updates of {scale.momentum_batch} "
        f"examples from scratch), κ = update_proj_gap = {scale.kappa}. Mem = "
        f"optimizer-state bytes (GaLore: its moments plus the r x d projection "
        f"matrices it stores); ΔM vs AdamW. One seed.\n\n"
        "| optimizer | lr | Mem KiB | ΔM KiB | valid loss | test loss | test exact match |\n"
        "|---|---|---|---|---|---|---|\n"
        + "\n".join(
            f"| {w['name']} | {w['lr']:.3g} | {report.kib(w['mem'])} | "
            f"{report.kib(w['delta_mem'])} | {report.metric(w['valid_loss'])} | "
            f"{report.metric(w['test_loss'])} | {report.metric(w['test_exact'])} |"
            for w in rows
        )
        + "\n\nLearning-rate sweeps (best validation loss):\n\n"
        + "| sweep | lr: loss |\n|---|---|\n"
        + "\n".join(
            f"| {k} | " + ", ".join(f"{x['lr']:g}: {score(x):.3f}" for x in v) + " |"
            for k, v in sweeps.items()
        )
        + "\n\nClaims:\n\n" + "\n".join(claims) + "\n"
    )  # fmt: skip
    report.write(STEM, meta, {"rows": rows, "claims": claims}, md)
    plot(rows)
    return {"rows": rows, "claims": claims, "markdown": md}


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for row in rows:
        xs, ys = zip(*row["curve"], strict=True)
        axes[0].plot(xs, ys, label=row["name"])
    axes[0].set(
        xlabel="updates", ylabel="validation loss", yscale="log", title="C.2: curves"
    )
    axes[0].legend(fontsize=7)
    names = [row["name"].replace("lr = GaLore's / 3", "lr/3") for row in rows]
    names = [n.replace("full second moment", "full v") for n in names]
    axes[1].barh(names, [row["mem"] / 1024 for row in rows])
    axes[1].set(xlabel="optimizer state (KiB)", title="Mem")
    fig.tight_layout()
    fig.savefig(report.RESULTS / f"{STEM}.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    args, scale = parse(__doc__.splitlines()[0])
    print(main(Runner(args.workers), scale)["markdown"])
