"""flora_torch against the alternatives: step time, state bytes, peak memory.

    nice -n 10 python benchmarks/bench_torch.py [--ranks 32 128 256] [--steps 2]
                                                [--threads 1] [--batch 1 256] [--quick]

1. Step time on a GPT-2-small-shaped parameter set (124.4 M parameters: wte
   50257x768, wpe 1024x768, 12 blocks of c_attn 768x2304, attn c_proj 768x768, c_fc
   768x3072, mlp c_proj 3072x768, LayerNorms and biases) with fixed random gradients:
   FloraAdam and FloraAdafactor at each rank against ``torch.optim.AdamW(foreach=True)``,
   ``torch.optim.Adafactor``, the official ``flora-opt==0.0.3`` ``Flora`` (beta1=0.9)
   and ``galore_torch.GaLoreAdamW`` at the same rank, all in this run. One warm-up
   step (creates the state; GaLore's first SVD), then the best of ``--steps``.
   flora-opt leaves embeddings uncompressed (aspect ratio > 4) and GaLore projects
   the attention/MLP matrices (and wpe); the "(wte uncompressed)" rows give ours the
   same policy. GaLore's SVD refresh is timed alone (``update_proj_gap=1``: every
   step refreshes) and amortised over its default gap of 200.
2. Where FloraAdam's time goes at the largest rank: matmuls (torch profiler), the
   projection RNG (timed alone: the same calls the step makes) and the rest
   (elementwise passes, allocation); minor page faults per step.
3. Optimizer-state bytes per parameter (sum of the storage bytes of every state
   tensor, GaLore's projection matrices included), ours checked against the schema's
   formula (docs/spec.md §5: float32 ``mu`` of ``k x r`` or full, ``nu`` full or its
   factors; ``count`` is a Python int).
4. Peak memory of a GPT-2-small training step per optimizer (``training_peak.py``:
   transformers' GPT2LMHeadModel, ``--batch`` tokens, float32, one subprocess each),
   with plain SGD (no state) as the floor, and the share of AdamW's state bytes each
   takes off the peak.
5. Peak memory of τ = 8 compressed accumulation against the plain accumulation loop
   on a 50.4 M-parameter model (12 x Linear(2048, 2048)), one subprocess per variant:
   after a warm-up cycle (state created) the peak RSS is reset (``/proc/self/
   clear_refs``) and one more cycle (8 backward passes and the step) runs; the
   reported number is VmHWM - VmRSS before the cycle. ``MALLOC_MMAP_THRESHOLD_`` is
   set so that freed tensors go back to the OS and RSS follows live memory.

The alternatives are installed apart (see ``_optimizers.py``); a missing one is
reported as skipped. flora-opt is LGPL and only used here, from its own folder.

Writes benchmarks/results/torch.json, torch.md and torch.png.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "adapters"), str(ROOT / "benchmarks")]

import torch  # noqa: E402
import training_peak  # noqa: E402
from _meta import markdown_header, provenance  # noqa: E402
from _optimizers import (  # noqa: E402
    FLORA_OPT_PATH,
    GALORE,
    make_optimizer,
    missing,
    state_bytes,
)
from flora_torch import FloraAdafactor, FloraAdam  # noqa: E402
from torch_memory import PEAK_VARIANTS, peak_main  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
GALORE_REFRESH = "GaLoreAdamW SVD refresh step"
RANKED = ("FloraAdam", "FloraAdam(factored)", "FloraAdafactor", "flora-opt Flora",
          "GaLoreAdamW")  # fmt: skip
TRAINING_PEAK_NAMES = ("SGD (stateless)", "AdamW(foreach)", "AdamW(fused)",
                       "torch Adafactor", *RANKED)  # fmt: skip


def gpt2_small_shapes(quick: bool) -> list[tuple[int, ...]]:
    d, vocab, blocks = (128, 4096, 2) if quick else (768, 50257, 12)
    shapes: list[tuple[int, ...]] = [(vocab, d), (1024, d)]
    for _ in range(blocks):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,)]
        shapes += [(d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [*shapes, (d,), (d,)]


def schema_bytes(optimizer, kind: str) -> int:
    """docs/spec.md §5 sizes, from shapes and plans only: 4 bytes per float32 element."""
    total = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            plan, n = optimizer.plan_of(p), p.numel()
            mu = math.prod(plan.state_shape) if plan.compressed else n
            dims = sorted(p.shape)
            if kind == "adam":
                nu = sum(plan.matrix_shape) if group["factored"] and p.ndim >= 2 else n
            elif p.ndim >= 2 and dims[-2] >= group["min_dim_size_to_factor"]:
                nu = n // dims[-1] + n // dims[-2]  # Adafactor's row and column factors
            else:
                nu = n
            total += 4 * (mu + nu)
    return total


def timed_steps(optimizer, params, grads, steps: int) -> dict:
    def set_grads() -> None:
        for p, g in zip(params, grads, strict=True):
            p.grad = g  # flora-opt frees .grad in step: set it before every step

    set_grads()
    optimizer.step()  # warm-up: creates the state
    times, faults = [], []
    for _ in range(steps):
        set_grads()
        gc.collect()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {"step_s": min(times), "all_s": times, "minor_faults": min(faults)}


def wte_excluded(params, rank):
    return [{"params": params[:1], "rank": None}, {"params": params[1:], "rank": rank}]


def measure_steps(args, params, grads) -> tuple[list[dict], dict, dict]:
    skipped = {name: missing(name, args.flora_opt_path)
               for name in ("flora-opt Flora", "GaLoreAdamW")}  # fmt: skip
    rows: list[dict] = []
    profile: dict = {}

    def run(name: str, rank, make, kind: str | None = None) -> None:
        optimizer = make()
        row = {"optimizer": name, "rank": rank,
               **timed_steps(optimizer, params, grads, args.steps)}  # fmt: skip
        row["state_bytes"] = state_bytes(optimizer)
        if kind:
            row["schema_bytes"] = schema_bytes(optimizer, kind)
        rows.append(row)
        print(f"{name:>34} r={rank!s:>4}: {row['step_s']:.3f} s/step", flush=True)
        if name == "FloraAdam" and rank == max(args.ranks):
            profile.update(profile_step(optimizer, params, grads, rank, row))

    lr = 1e-4
    adamw = lambda: torch.optim.AdamW(params, lr=lr, foreach=True)  # noqa: E731
    run("AdamW(foreach)", None, adamw)
    for r in args.ranks:
        run("FloraAdam", r, lambda r=r: FloraAdam(params, lr=lr, rank=r), "adam")
        run("FloraAdafactor", r, lambda r=r: FloraAdafactor(params, lr=lr, rank=r),
            "adafactor")  # fmt: skip
        for name in ("flora-opt Flora", "GaLoreAdamW"):
            if not skipped[name]:
                run(name, r, lambda r=r, name=name: make_optimizer(
                    name, params, rank=r, lr=lr, flora_opt_path=args.flora_opt_path))  # fmt: skip
    r = max(args.ranks)
    if not skipped["GaLoreAdamW"]:  # every step refreshes P by SVD: the refresh's cost
        run(GALORE_REFRESH, r, lambda: make_optimizer(
            "GaLoreAdamW", params, rank=r, lr=lr, update_proj_gap=1))  # fmt: skip
    run("FloraAdam factored=True", r,
        lambda: FloraAdam(params, lr=lr, rank=r, factored=True), "adam")  # fmt: skip
    run("FloraAdam second_moment=gradient", r,
        lambda: FloraAdam(params, lr=lr, rank=r, second_moment="gradient"), "adam")  # fmt: skip
    run("FloraAdam (wte uncompressed)", r,
        lambda: FloraAdam(wte_excluded(params, r), lr=lr), "adam")  # fmt: skip
    run("FloraAdafactor (wte uncompressed)", r,
        lambda: FloraAdafactor(wte_excluded(params, r), lr=lr), "adafactor")  # fmt: skip
    run("AdamW(foreach)", None, adamw)  # again at the end: drift of a shared machine
    run("torch.optim.Adafactor", None, lambda: torch.optim.Adafactor(params, lr=1e-2))
    notes = {name: reason or "installed" for name, reason in skipped.items()}
    return rows, profile, notes


def profile_step(optimizer, params, grads, rank: int, row: dict) -> dict:
    """A FloraAdam step split into matmul, projection RNG and the rest."""
    from flora_torch._optimizer import XP

    from flora_core.policy import ROLE_MOMENTUM
    from flora_core.projection import projection

    for p, g in zip(params, grads, strict=True):
        p.grad = g
    with torch.profiler.profile(with_flops=True) as prof:
        optimizer.step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    matmuls = [e for e in events if e.key in ("aten::mm", "aten::bmm", "aten::addmm")]
    matmul = sum(e.self_cpu_time_total for e in matmuls) / 1e6
    flops = sum(e.flops for e in matmuls)  # compress, decompress(s), transfers
    plans = [optimizer.plan_of(p) for p in params if optimizer.plan_of(p).compressed]
    start = time.perf_counter()
    for plan in plans:  # the calls the step makes: one momentum projection per param
        projection(plan, 0, ROLE_MOMENTUM, xp=XP)
    rng = time.perf_counter() - start
    step, share = row["step_s"], matmul / total
    return {
        "rank": rank, "step_s": step, "profiled_aten_s": total, "matmul_s": step * share,
        "rng_s": rng, "rest_s": step - step * share - rng, "matmul_gflop": flops / 1e9,
        "matmul_gflops_per_s": flops / 1e9 / max(step * share, 1e-9),
        "matmul_flops_per_element": flops / sum(math.prod(p.shape) for p in plans),
        "minor_faults": row["minor_faults"],
        "fresh_gib": row["minor_faults"] * 4096 / 2**30,
    }  # fmt: skip


def measure_peaks(args) -> list[dict]:
    rows = []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), str(ROOT / "adapters"), str(ROOT / "benchmarks")])}  # fmt: skip
    for variant in PEAK_VARIANTS:
        quick = ["--quick"] if args.quick else []
        command = [sys.executable, __file__, "--peak", variant,
                   "--threads", str(args.threads), *quick]  # fmt: skip
        out = subprocess.run(
            command, env=env, check=True, capture_output=True, text=True
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"peak {variant:>28}: {rows[-1]['peak_delta_mib']:.1f} MiB", flush=True)
    return rows


def galore_amortised(
    rows: list[dict], gap: int = GALORE["update_proj_gap"]
) -> dict | None:
    """GaLore's mean step over one projection period: (gap - 1) plain steps + 1 refresh."""
    refresh = next((r for r in rows if r["optimizer"] == GALORE_REFRESH), None)
    plain = [r for r in rows if r["optimizer"] == "GaLoreAdamW" and refresh
             and r["rank"] == refresh["rank"]]  # fmt: skip
    if not plain:
        return None
    step, svd = plain[0]["step_s"], refresh["step_s"]
    return {"rank": refresh["rank"], "gap": gap, "step_s": step, "refresh_step_s": svd,
            "amortised_s": ((gap - 1) * step + svd) / gap}  # fmt: skip


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def markdown(meta: dict, result: dict) -> str:
    text = markdown_header(
        "flora_torch against the alternatives: step time, state bytes, peak memory",
        meta,
    )
    notes = "; ".join(f"{k}: {v}" for k, v in result["notes"].items())
    text += f"- torch threads: {result['threads']}; load average at start / end: "
    text += f"{result['load_start']} / {result['load_end']}; {notes}\n"
    text += f"- Parameters: {result['num_params'] / 1e6:.1f} M (GPT-2 small shapes), "
    text += f"random gradients; best of {result['steps']} steps after a warm-up step\n"
    text += (
        "- GaLoreAdamW projects the matrices of the blocks and wpe (not wte: GaLore's "
        "attention/MLP targets, by shape); compare it with the `(wte uncompressed)` "
        "rows. Its SVD refresh is timed on its own (`update_proj_gap=1`)\n\n"
    )
    rows = result["steps_rows"]
    base = min(r["step_s"] for r in rows if r["optimizer"] == "AdamW(foreach)")
    opt = {r["rank"]: r["step_s"] for r in rows if r["optimizer"] == "flora-opt Flora"}
    text += "| optimizer | rank | step s | vs AdamW | vs flora-opt | state B/param |"
    text += " schema B/param | minor faults/step |\n|---|---|---|---|---|---|---|---|\n"
    for r in rows:
        vs_opt = f"{r['step_s'] / opt[r['rank']]:.2f}x" if r["rank"] in opt else ""
        schema = r.get("schema_bytes")
        schema = f"{schema / result['num_params']:.3f}" if schema is not None else ""
        text += (
            f"| {r['optimizer']} | {r['rank'] or ''} | {r['step_s']:.3f} | "
            f"{r['step_s'] / base:.2f}x | {vs_opt} | "
            f"{r['state_bytes'] / result['num_params']:.3f} | {schema} | {r['minor_faults']} |\n"
        )
    galore = galore_amortised(rows)
    if galore:
        text += (
            f"\nGaLoreAdamW r={galore['rank']}: {galore['step_s']:.2f} s per step, "
            f"{galore['refresh_step_s']:.2f} s on a refresh step (SVD of every projected "
            f"matrix); {galore['amortised_s']:.2f} s per step amortised over "
            f"update_proj_gap={galore['gap']} ({galore['amortised_s'] / base:.2f}x AdamW).\n"
        )
    p = result["profile"]
    text += (
        f"\nFloraAdam r={p['rank']} step {p['step_s']:.2f} s = matmul {p['matmul_s']:.2f} s "
        f"({p['matmul_gflop']:.0f} GFLOP, {p['matmul_flops_per_element']:.0f} per "
        f"compressed element, at {p['matmul_gflops_per_s']:.0f} GFLOP/s) + "
        f"projection RNG {p['rng_s']:.2f} s + elementwise/allocation {p['rest_s']:.2f} s; "
        f"{p['minor_faults']} minor page faults ({p['fresh_gib']:.1f} GiB of fresh pages) "
        "per step.\n\n"
    )
    text += training_markdown(result["training_peaks"], result["training_batch"])
    params = result["peaks"][0]["params"] / 1e6
    text += f"\n| accumulation variant ({params:.1f} M params, 8 micro-batches) "
    text += "| peak - before cycle MiB | optimizer state MiB | peak RSS MiB |\n"
    text += "|---|---|---|---|\n"
    for r in result["peaks"]:
        text += (
            f"| {r['variant']} | {r['peak_delta_mib']:.1f} | {r['state_mib']:.1f} | "
            f"{r['peak_mib']:.1f} |\n"
        )
    return text + "\n" + result["verdict"] + "\n"


def training_markdown(rows: list[dict], batch: list[int]) -> str:
    sgd = next((r for r in rows if r["optimizer"] == "SGD (stateless)" and "peak_bytes" in r),
               None)  # fmt: skip
    text = (
        f"Peak RSS of one training step of transformers' GPT2LMHeadModel (124.4 M "
        f"params, batch {batch[0]} x {batch[1]}, float32) after a warm-up step, one "
        "process per optimizer (`benchmarks/training_peak.py`); plain SGD keeps no "
        "state and is the floor.\n\n| optimizer | rank | state MiB | before step MiB | "
        "peak MiB | peak over SGD MiB | AdamW state off the peak |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    for r in rows:
        if "peak_bytes" not in r:
            text += (
                f"| {r['optimizer']} | | | | | | {r.get('skipped', r.get('error'))} |\n"
            )
            continue
        over = mib(r["peak_bytes"] - sgd["peak_bytes"]) if sgd else ""
        rank = r["rank"] if r["optimizer"] in RANKED else ""
        share = r.get("removed_share_of_adamw_state")
        share = f"{share:.0%}" if share is not None else ""
        text += (
            f"| {r['optimizer']} | {rank} | {mib(r['state_bytes'])} | "
            f"{mib(r['before_step_bytes'])} | {mib(r['peak_bytes'])} | {over} | {share} |\n"
        )
    return text


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, mem) = plt.subplots(1, 2, figsize=(11, 4))
    rows = result["steps_rows"]
    for name in ("FloraAdam", "FloraAdafactor", "flora-opt Flora", "GaLoreAdamW"):
        ranked = [r for r in rows if r["optimizer"] == name]
        if ranked:
            ax.plot([r["rank"] for r in ranked], [r["step_s"] for r in ranked], "o-",
                    label=name)  # fmt: skip
    base = min(r["step_s"] for r in rows if r["optimizer"] == "AdamW(foreach)")
    ax.axhline(base, color="k", linestyle="--", label="AdamW(foreach)")
    ax.set(xlabel="rank r", ylabel="step time (s)", title="124 M params, CPU")
    ax.legend()
    measured = [r for r in result["training_peaks"] if "peak_bytes" in r]
    names = [r["optimizer"] for r in measured]
    mem.barh(names, [r["peak_bytes"] / 2**30 for r in measured], label="peak")
    mem.barh(names, [r["state_bytes"] / 2**30 for r in measured], label="state")
    mem.set(xlabel="GiB", title="GPT-2 small training step, peak RSS")
    mem.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def verdict(result: dict) -> str:
    rows = result["steps_rows"]
    r = max(result["ranks"])
    base = min(x["step_s"] for x in rows if x["optimizer"] == "AdamW(foreach)")

    def at_r(name: str) -> float | None:
        return next((x["step_s"] for x in rows if x["optimizer"] == name and x["rank"] == r),
                    None)  # fmt: skip

    ours, opt = at_r("FloraAdam"), at_r("flora-opt Flora")
    text = f"Targets at r={r}: FloraAdam step {ours / base:.2f}x AdamW (target <= 2x)"
    if opt:
        text += f", {ours / opt:.2f}x flora-opt (target <= 0.5x)"
    galore = galore_amortised(rows)
    if galore:
        matched = at_r("FloraAdam (wte uncompressed)")
        text += (
            f"; FloraAdam with GaLore's targets {matched / galore['amortised_s']:.2f}x "
            f"GaLoreAdamW amortised over {galore['gap']} steps"
        )
    exact = all(
        x["state_bytes"] == x["schema_bytes"] for x in rows if "schema_bytes" in x
    )
    text += f"; state bytes equal the schema formula: {exact}."
    shares = {x["optimizer"]: x["removed_share_of_adamw_state"]
              for x in result["training_peaks"] if "removed_share_of_adamw_state" in x}  # fmt: skip
    if shares:
        text += " Share of AdamW's optimizer state taken off the training-step peak: "
        text += ", ".join(
            f"{k} {v:.0%}" for k, v in shares.items() if "AdamW(" not in k
        )
        text += "."
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=None,
                        help="default 32 128 256 (8 16 32 with --quick)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--quick", action="store_true", help="small shapes (a smoke run)"
    )
    parser.add_argument("--batch", type=int, nargs=2, default=(1, 256),
                        help="tokens of the GPT-2 training-step peak (default 1 256)")  # fmt: skip
    parser.add_argument("--flora-opt-path", default=FLORA_OPT_PATH)
    parser.add_argument("--peak", choices=PEAK_VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.ranks = args.ranks or ([8, 16, 32] if args.quick else [32, 128, 256])
    torch.set_num_threads(args.threads)
    if args.peak:
        return peak_main(args.peak, args.quick)
    meta = provenance("torch", "array-api-compat", "transformers", "galore-torch")
    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    torch.manual_seed(0)
    shapes = gpt2_small_shapes(args.quick)
    params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    grads = [torch.randn(s) * 1e-3 for s in shapes]
    steps_rows, profile, notes = measure_steps(args, params, grads)
    del params, grads
    gc.collect()
    batch = (1, 16) if args.quick else tuple(args.batch)
    result = {
        "threads": args.threads, "steps": args.steps, "ranks": args.ranks,
        "num_params": sum(math.prod(s) for s in shapes), "steps_rows": steps_rows,
        "profile": profile, "notes": notes, "training_batch": list(batch),
        "training_peaks": training_peak.measure(
            TRAINING_PEAK_NAMES, "cpu", batch, max(args.ranks), args.flora_opt_path,
            args.threads),
        "peaks": measure_peaks(args),
        "load_start": round(load_start, 2), "load_end": round(os.getloadavg()[0], 2),
    }  # fmt: skip
    result["verdict"] = verdict(result)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "torch_quick" if args.quick else "torch"
    (RESULTS / f"{stem}.json").write_text(
        json.dumps({**meta, **result}, indent=1) + "\n"
    )
    (RESULTS / f"{stem}.md").write_text(markdown(meta, result))
    plot(result, RESULTS / f"{stem}.png")
    print(result["verdict"], f"({result['wall_s']} s)")


if __name__ == "__main__":
    main()
