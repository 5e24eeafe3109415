"""flora_torch: step time, optimizer-state bytes, and peak memory of accumulation.

    nice -n 10 python benchmarks/bench_torch.py [--ranks 32 128 256] [--steps 2]
                                                [--threads 1] [--quick]

1. Step time on a GPT-2-small-shaped parameter set (124.4 M parameters: wte
   50257x768, wpe 1024x768, 12 blocks of c_attn 768x2304, attn c_proj 768x768, c_fc
   768x3072, mlp c_proj 3072x768, LayerNorms and biases) with fixed random gradients:
   FloraAdam and FloraAdafactor at each rank against ``torch.optim.AdamW(foreach=True)``
   and the official ``flora-opt==0.0.3`` ``Flora`` (beta1=0.9) at the same rank, all
   in this run. One warm-up step (creates the state), then the best of ``--steps``.
   flora-opt leaves embeddings uncompressed (aspect ratio > 4); the "matched" rows
   give ours the same policy (wte with ``rank=None``).
2. Where FloraAdam's time goes at the largest rank: matmuls (torch profiler), the
   projection RNG (timed alone: the same calls the step makes) and the rest
   (elementwise passes, allocation); minor page faults per step.
3. Optimizer-state bytes per parameter (sum of the storage bytes of every state
   tensor) against AdamW, torch.optim.Adafactor and flora-opt, and ours checked
   against the schema's formula (DESIGN §5: float32 ``mu`` of ``k x r`` or full,
   ``nu`` full or its factors; ``count`` is a Python int).
4. Peak memory of τ = 8 compressed accumulation against the plain accumulation loop
   on a 50.4 M-parameter model (12 x Linear(2048, 2048)), one subprocess per variant:
   after a warm-up cycle (state created) the peak RSS is reset (``/proc/self/
   clear_refs``) and one more cycle (8 backward passes and the step) runs; the
   reported number is VmHWM - VmRSS before the cycle. ``MALLOC_MMAP_THRESHOLD_`` is
   set so that freed tensors go back to the OS and RSS follows live memory.

flora-opt is LGPL and only used here, from its own folder (never on the import path
of the library or its tests):

    pip install --no-deps --target /work/benchdeps flora-opt==0.0.3 bitsandbytes

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
from _meta import markdown_header, provenance  # noqa: E402
from flora_torch import FloraAdafactor, FloraAdam  # noqa: E402
from torch_memory import PEAK_VARIANTS, peak_main  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def gpt2_small_shapes(quick: bool) -> list[tuple[int, ...]]:
    d, vocab, blocks = (128, 4096, 2) if quick else (768, 50257, 12)
    shapes: list[tuple[int, ...]] = [(vocab, d), (1024, d)]
    for _ in range(blocks):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,)]
        shapes += [(d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [*shapes, (d,), (d,)]


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    seen, total = set(), 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                storage = value.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
    return total


def schema_bytes(optimizer, kind: str) -> int:
    """DESIGN §5 sizes, from shapes and plans only: 4 bytes per float32 element."""
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


def flora_opt_class(path: str):
    if not os.path.isdir(path):
        return None, f"{path} not found"
    version = torch.__version__
    sys.path.insert(0, path)
    try:
        from flora_opt import Flora  # LGPL: used, never copied
    except Exception as error:  # noqa: BLE001 - report why the rows are missing
        return None, f"import failed: {error}"
    finally:
        sys.path.remove(path)
    assert torch.__version__ == version, "flora-opt must not change torch"
    return Flora, "flora-opt 0.0.3"


def wte_excluded(params, rank):
    return [{"params": params[:1], "rank": None}, {"params": params[1:], "rank": rank}]


def measure_steps(args, params, grads) -> tuple[list[dict], dict, dict]:
    flora_opt, flora_opt_note = flora_opt_class(args.flora_opt_path)
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
        if flora_opt is not None:
            run("flora-opt Flora", r, lambda r=r: flora_opt(
                params, lr=lr, rank=r, beta1=0.9, relative_step=False))  # fmt: skip
    r = max(args.ranks)
    run("FloraAdam second_moment=gradient", r,
        lambda: FloraAdam(params, lr=lr, rank=r, second_moment="gradient"), "adam")  # fmt: skip
    run("FloraAdam (wte uncompressed)", r,
        lambda: FloraAdam(wte_excluded(params, r), lr=lr), "adam")  # fmt: skip
    run("FloraAdafactor (wte uncompressed)", r,
        lambda: FloraAdafactor(wte_excluded(params, r), lr=lr), "adafactor")  # fmt: skip
    run("AdamW(foreach)", None, adamw)  # again at the end: drift of a shared machine
    run("torch.optim.Adafactor", None, lambda: torch.optim.Adafactor(params, lr=1e-2))
    return rows, profile, {"flora_opt": flora_opt_note}


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
        command = [
            sys.executable,
            __file__,
            "--peak",
            variant,
            "--threads",
            str(args.threads),
        ]
        if args.quick:
            command.append("--quick")
        out = subprocess.run(
            command, env=env, check=True, capture_output=True, text=True
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"peak {variant:>28}: {rows[-1]['peak_delta_mib']:.1f} MiB", flush=True)
    return rows


def markdown(meta: dict, result: dict) -> str:
    text = markdown_header(
        "flora_torch: step time, state memory, accumulation peak", meta
    )
    text += f"- torch threads: {result['threads']}; load average at start / end: "
    text += f"{result['load_start']} / {result['load_end']}; {result['notes']['flora_opt']}\n"
    text += f"- Parameters: {result['num_params'] / 1e6:.1f} M (GPT-2 small shapes), "
    text += (
        f"random gradients; best of {result['steps']} steps after a warm-up step\n\n"
    )
    base = min(
        r["step_s"] for r in result["steps_rows"] if r["optimizer"] == "AdamW(foreach)"
    )
    opt = {r["rank"]: r["step_s"] for r in result["steps_rows"]
           if r["optimizer"] == "flora-opt Flora"}  # fmt: skip
    text += "| optimizer | rank | step s | vs AdamW | vs flora-opt | state B/param |"
    text += " schema B/param | minor faults/step |\n|---|---|---|---|---|---|---|---|\n"
    for r in result["steps_rows"]:
        vs_opt = f"{r['step_s'] / opt[r['rank']]:.2f}x" if r["rank"] in opt else ""
        schema = (
            f"{r['schema_bytes'] / result['num_params']:.3f}"
            if "schema_bytes" in r
            else ""
        )
        text += (
            f"| {r['optimizer']} | {r['rank'] or ''} | {r['step_s']:.3f} | "
            f"{r['step_s'] / base:.2f}x | {vs_opt} | "
            f"{r['state_bytes'] / result['num_params']:.3f} | {schema} | {r['minor_faults']} |\n"
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
    params = result["peaks"][0]["params"] / 1e6
    text += f"| accumulation variant ({params:.1f} M params, 8 micro-batches) "
    text += "| peak - before cycle MiB | optimizer state MiB | peak RSS MiB |\n"
    text += "|---|---|---|---|\n"
    for r in result["peaks"]:
        text += (
            f"| {r['variant']} | {r['peak_delta_mib']:.1f} | {r['state_mib']:.1f} | "
            f"{r['peak_mib']:.1f} |\n"
        )
    return text + "\n" + result["verdict"] + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("FloraAdam", "FloraAdafactor", "flora-opt Flora"):
        rows = [r for r in result["steps_rows"] if r["optimizer"] == name]
        if rows:
            ax.plot(
                [r["rank"] for r in rows], [r["step_s"] for r in rows], "o-", label=name
            )
    base = min(
        r["step_s"] for r in result["steps_rows"] if r["optimizer"] == "AdamW(foreach)"
    )
    ax.axhline(base, color="k", linestyle="--", label="AdamW(foreach)")
    ax.set(xlabel="rank r", ylabel="step time (s)", title="124 M params, CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def verdict(result: dict) -> str:
    rows = result["steps_rows"]
    r = max(result["ranks"])
    base = min(x["step_s"] for x in rows if x["optimizer"] == "AdamW(foreach)")
    ours = next(
        x["step_s"] for x in rows if x["optimizer"] == "FloraAdam" and x["rank"] == r
    )
    opt = [
        x["step_s"]
        for x in rows
        if x["optimizer"] == "flora-opt Flora" and x["rank"] == r
    ]
    text = f"Targets at r={r}: FloraAdam step {ours / base:.2f}x AdamW (target <= 2x)"
    if opt:
        text += f", {ours / opt[0]:.2f}x flora-opt (target <= 0.5x)"
    exact = all(
        x["state_bytes"] == x["schema_bytes"] for x in rows if "schema_bytes" in x
    )
    return text + f"; state bytes equal the schema formula: {exact}."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--ranks",
        type=int,
        nargs="+",
        default=None,
        help="default 32 128 256 (8 16 32 with --quick)",
    )
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--quick", action="store_true", help="small shapes (a smoke run)"
    )
    parser.add_argument("--flora-opt-path", default="/work/benchdeps")
    parser.add_argument("--peak", choices=PEAK_VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.ranks = args.ranks or ([8, 16, 32] if args.quick else [32, 128, 256])
    torch.set_num_threads(args.threads)
    if args.peak:
        return peak_main(args.peak, args.quick)
    meta = provenance("torch", "array-api-compat")
    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    torch.manual_seed(0)
    shapes = gpt2_small_shapes(args.quick)
    params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    grads = [torch.randn(s) * 1e-3 for s in shapes]
    steps_rows, profile, notes = measure_steps(args, params, grads)
    del params, grads
    gc.collect()
    result = {
        "threads": args.threads, "steps": args.steps, "ranks": args.ranks,
        "num_params": sum(math.prod(s) for s in shapes), "steps_rows": steps_rows,
        "profile": profile, "peaks": measure_peaks(args), "notes": notes,
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
