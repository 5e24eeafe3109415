"""Table 4 at small scale: a linear-memory optimizer (unfactored second moment).

    nice python benchmarks/paper/table4_unfactored.py [--quick] [--workers 2]

Table 1's protocol (fine-tuning, τ = 16) with ``factored=False`` Adafactor, so the
second moment is full-size and LoRA can save memory; "all the other hyper-parameters
remain the same" (the paper): the learning rates are Table 1's sweep results (that
sweep is re-run here unless ``run_all.py`` has it cached). One seed.
Writes ``benchmarks/results/paper_table4_unfactored.{json,md,png}``.
"""

from __future__ import annotations

import _paths  # noqa: F401
import report
from common import Scale, accumulation_base, parse, rank_table, sweep_lrs
from harness import Runner

STEM = "paper_table4_unfactored"
TITLE = "Table 4 (small scale): unfactored second moment (linear-memory Adafactor)"


def main(runner: Runner, scale: Scale, lrs: dict | None = None) -> dict:
    base, pre = accumulation_base(scale, runner)
    if lrs is None:
        lrs = sweep_lrs(runner, scale, base)[0]
    table = rank_table(runner, scale, dict(base, factored=False), lrs=lrs, seeds=(0,))
    meta, md = report.header(TITLE)
    claims = report.rank_claims(table["rows"], scale.ranks)
    named = report.by_name(table["rows"])
    lora_less = [
        r
        for r in scale.ranks
        if named[f"LoRA({r})"]["mem"] < named[f"FLORA({r})"]["mem"]
    ]
    with_weights = [
        r
        for r in scale.ranks
        if named[f"LoRA({r})"]["mem"] + named[f"LoRA({r})"]["adapter_bytes"]
        < named[f"FLORA({r})"]["mem"]
    ]
    claims.append(
        f"- LoRA uses less memory than FLORA at low rank, FLORA less at high rank (the "
        f"paper: LoRA less for r < 128 of 512, FLORA less at 256): LoRA's optimizer "
        f"state is smaller at r = {lora_less or 'none'}; counting LoRA's own weights "
        f"(A, B) too, LoRA is smaller at r = {with_weights or 'none'}."
    )
    md += (
        f"Table 1's setting (fine-tuning for {scale.accumulation_micro} micro-batches "
        f"of {scale.accumulation_batch}, τ = {scale.tau}) with `factored=False`; learning "
        f"rates from Table 1's sweeps: {lrs}. Mem = optimizer-state bytes including "
        f"accumulators; ΔM vs None. One seed.\n\n"
        + report.rows_markdown(table["rows"], "Accumulation")
        + "\nClaims:\n\n" + "\n".join(claims) + "\n"
    )  # fmt: skip
    report.write(STEM, meta, {**table, "claims": claims}, md)
    report.plot_rank_table(STEM, "Table 4: unfactored Adafactor", table, scale.ranks)
    return {**table, "claims": claims, "markdown": md}


if __name__ == "__main__":
    args, scale = parse(__doc__.splitlines()[0])
    print(main(Runner(args.workers), scale)["markdown"])
