"""Every paper table at small scale, in one process pool (2 workers, 1 thread each).

    nice python benchmarks/paper/run_all.py [--quick] [--workers 2]

Runs Table 2 (momentum), Table 3 (κ and the transfer rule, reusing Table 2's
learning rate and its FLORA(32), κ = 100 runs), the clip-order study (reusing Table
2's default-order runs), Table 1 (accumulation), Table 4 (unfactored, Table 1's
learning rates) and Appendix C.2 (GaLore); identical configurations run once (the
runner caches them). Writes each table's ``benchmarks/results/paper_*.{json,md,png}``
and ``paper_summary.md`` with every claim and the total wall time.
"""

from __future__ import annotations

import time

import _paths  # noqa: F401
import appendix_c2_galore
import clip_order
import report
import table1_accumulation
import table2_momentum
import table3_kappa
import table4_unfactored
from common import parse
from harness import Runner


def main() -> None:
    args, scale = parse(__doc__.splitlines()[0])
    runner, started, timings = Runner(args.workers), time.perf_counter(), {}
    sections = []

    def timed(name: str, fn, *a, **kw) -> dict:
        t = time.perf_counter()
        out = fn(runner, scale, *a, **kw)
        timings[name] = time.perf_counter() - t
        sections.append((name, out["claims"]))
        print(f"{name}: {timings[name]:.0f} s", flush=True)
        return out

    t2 = timed("Table 2 (momentum)", table2_momentum.main)
    timed("Table 3 (κ and the transfer rule)", table3_kappa.main, lr=t2["lrs"]["naive"])
    timed("Clip order", clip_order.main)
    t1 = timed("Table 1 (accumulation)", table1_accumulation.main)
    timed("Table 4 (unfactored)", table4_unfactored.main, lrs=t1["lrs"])
    timed("Appendix C.2 (GaLore)", appendix_c2_galore.main)
    total = time.perf_counter() - started
    runs = [r for r in runner.cache.values() if r["method"] != "pretrain"]
    meta, md = report.header("FLORA paper at small scale: summary of claims")
    md += (
        f"{len(runs)} training runs (+1 pre-training), {args.workers} processes at a "
        f"time, 1 torch thread each, `nice 10`; total wall time {total:.0f} s "
        f"(sum of run times {sum(r['seconds'] for r in runs):.0f} s). Per table (wall, "
        f"cached runs are free): "
        + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ".\n\n"
        + "\n".join(f"## {name}\n\n" + "\n".join(claims) + "\n" for name, claims in sections)
    )  # fmt: skip
    report.write("paper_summary", meta, {"timings": timings, "total_s": total}, md)
    print(md)


if __name__ == "__main__":
    main()
