"""FloraAdafactor's clip order, decided on the paper's protocols.

    nice python benchmarks/paper/clip_order.py [--quick] [--workers 2]

``optax.adafactor`` clips the update before its momentum; both official FLORA
implementations take the momentum first and clip after it, so the decompressed
momentum (about ``sqrt(d/r)`` larger than an uncompressed one) is bounded by the
clipping threshold (NOTE [clip order] in ``flora_core.rules``). The library offers
both (``clip_after_momentum``); this compares them with the paper's rule: Naive's
learning rate is swept on validation loss *in each order* and applied to FLORA(r).

* Table 2 (momentum, from scratch): Naive and FLORA(r) in each order.
* Tables 1 and 4 (accumulation): Adafactor without momentum, where the order only
  moves a momentum that does not exist; one FLORA run per order shows the runs are
  identical.

Writes ``benchmarks/results/paper_clip_order.{json,md}``.
"""

from __future__ import annotations

import _paths  # noqa: F401
import report
from common import (
    Scale,
    accumulation_base,
    best_of,
    momentum_base,
    parse,
    summarise,
)
from harness import CLIP_AFTER_MOMENTUM, Runner

STEM = "paper_clip_order"
TITLE = "FloraAdafactor's clip order on the paper's protocols (small scale)"
ORDERS = {False: "optax (clip, then momentum)", True: "official (momentum, then clip)"}


def _base(base: dict, after: bool) -> dict:
    # the library's default order leaves the key out, so Table 2's cached runs are reused
    return (
        base if after == CLIP_AFTER_MOMENTUM else dict(base, clip_after_momentum=after)
    )


def main(runner: Runner, scale: Scale) -> dict:
    rows, lrs = {}, {}
    for after in ORDERS:
        base = _base(momentum_base(scale), after)
        sweep = runner([dict(base, method="naive", lr=lr) for lr in scale.lrs])
        lrs[after] = lr = best_of(sweep)["lr"]
        names = {"Naive": dict(base, method="naive", lr=lr)}
        names.update(
            {
                f"FLORA({r})": dict(base, method="flora", rank=r, lr=lr)
                for r in scale.ranks
            }
        )
        for name, cfg in names.items():
            runs = runner([dict(cfg, seed=s) for s in scale.seeds])
            rows[(after, name)] = summarise(name, runs, None)
    accumulation, _ = accumulation_base(scale, runner)
    rank = scale.ranks[0]
    same = runner(
        [dict(_base(accumulation, a), method="flora", rank=rank, lr=scale.lrs[-1])
         for a in ORDERS]
    )  # fmt: skip
    identical = same[0]["curve"] == same[1]["curve"]
    claims = _claims(rows, scale, lrs, identical, rank)
    meta, md = report.header(TITLE)
    md += (
        f"Table 2's protocol: {scale.momentum_steps} updates of {scale.momentum_batch} "
        f"examples from scratch, κ = {scale.kappa}; Naive's lr swept per order "
        f"(best: {', '.join(f'{ORDERS[a]}: {lrs[a]:g}' for a in ORDERS)}). Test loss of "
        f"the checkpoint with the lowest validation loss, mean ± half-range over "
        f"{len(scale.seeds)} seed(s).\n\n| row | "
        + " | ".join(ORDERS.values()) + " |\n|---|---|---|\n"
        + "".join(
            f"| {name} | "
            + " | ".join(report.metric(rows[(a, name)]["test_loss"]) for a in ORDERS)
            + " |\n"
            for name in ["Naive", *(f"FLORA({r})" for r in scale.ranks)]
        )
        + "\nClaims:\n\n" + "\n".join(claims) + "\n"
    )  # fmt: skip
    payload = {
        "lrs": {ORDERS[a]: lrs[a] for a in ORDERS},
        "rows": [dict(row, order=ORDERS[a]) for (a, _), row in rows.items()],
        "accumulation_runs_identical": identical,
        "claims": claims,
    }
    report.write(STEM, meta, payload, md)
    return {"claims": claims, "markdown": md}


def _claims(
    rows: dict, scale: Scale, lrs: dict, identical: bool, rank: int
) -> list[str]:
    def loss(after: bool, name: str) -> dict:
        return rows[(after, name)]["test_loss"]

    better = [
        r
        for r in scale.ranks
        if loss(True, f"FLORA({r})")["mean"] <= loss(False, f"FLORA({r})")["mean"]
    ]
    gaps = {
        a: [loss(a, f"FLORA({r})")["mean"] - loss(a, "Naive")["mean"] for r in scale.ranks]
        for a in ORDERS
    }  # fmt: skip
    detail = "; ".join(
        f"r={r}: {loss(False, f'FLORA({r})')['mean']:.3f} (optax) vs "
        f"{loss(True, f'FLORA({r})')['mean']:.3f} (official)"
        for r in scale.ranks
    )
    verdict = (
        "held"
        if len(better) == len(scale.ranks)
        else "did not hold"
        if not better
        else f"held at {len(better)} of {len(scale.ranks)} ranks"
    )
    return [
        f"- FLORA trains at least as well with the official order (momentum, then "
        f"clip), each order at its Naive's best lr: **{verdict}**. {detail}.",
        "- Gap FLORA(r) − Naive, optax order: "
        + ", ".join(f"{g:+.3f}" for g in gaps[False])
        + "; official order: " + ", ".join(f"{g:+.3f}" for g in gaps[True]) + ".",
        f"- Accumulation protocols (Tables 1 and 4, no momentum): the two orders give "
        f"identical FLORA({rank}) runs: **{'held' if identical else 'did not hold'}**.",
    ]  # fmt: skip


if __name__ == "__main__":
    args, scale = parse(__doc__.splitlines()[0])
    print(main(Runner(args.workers), scale)["markdown"])
