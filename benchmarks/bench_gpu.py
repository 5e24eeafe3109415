"""GPU benchmark for issue 9: RNG throughput, optimizer step time, training-step peak.

    python benchmarks/bench_gpu.py [--only rng step memory] [--reps 20] [--dry-run]

Needs a CUDA GPU (written for an H100) and refuses to run without one; ``--dry-run``
lists what would be measured and checks the optional packages, anywhere. All rows
come from one run, with TF32 off (``allow_tf32=False``), timed with CUDA events
(median of ``--reps`` after warm-up). Writes benchmarks/results/gpu.json and gpu.md.

1. ``rng``: FLORA-RNG v1 gaussian / rademacher / bits per second on projection-shaped
   and square blocks: the Triton kernel (``flora_torch.triton_rng``), the plain torch
   path (``flora_core.rng`` on CUDA tensors) and the CuPy kernel (if CuPy is
   installed), against ``torch.randn`` of the same shape (target ≥ 0.5x, aim 1x).
   Also the fused compress (``triton_compress``) against drawing ``A`` and a cuBLAS
   fp32 matmul, on the GPT-2-medium matrix shapes at r = 256.
2. ``step``: ``optimizer.step()`` on a GPT-2-medium-shaped parameter set (354.8 M
   parameters, float32, fixed random gradients): FloraAdam and FloraAdafactor at
   r = 256, as shipped and with projections drawn by the Triton kernel
   (``triton_dispatch``), against ``torch.optim.AdamW(fused=True)`` (target ≤ 1.5x).
3. ``memory``: peak CUDA memory of one training step of GPT-2 small (transformers
   config, random weights, batch 8 x 1024, bf16 autocast, SDPA attention) after a
   warm-up step, one subprocess per optimizer: AdamW(fused), FloraAdam,
   FloraAdafactor, flora-opt ``Flora`` (from ``--flora-opt-path``) and GaLore
   (``galore_torch.GaLoreAdamW``) when installed. Reported: how much of AdamW's
   optimizer-state bytes FloraAdam removes from the peak (target ≥ 90%).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "adapters"), str(ROOT / "benchmarks")]

import _optimizers  # noqa: E402
import torch  # noqa: E402
import training_peak  # noqa: E402
from _meta import provenance  # noqa: E402

from flora_core import rng  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RANK = 256
RNG_SHAPES = [(256, 1024), (256, 4096), (256, 50257), (8192, 8192)]
SECTIONS = ("rng", "step", "memory")
TRITON = " + triton RNG"
STEP_VARIANTS = ("AdamW(fused)", "FloraAdam", "FloraAdam" + TRITON, "FloraAdafactor",
                 "FloraAdafactor" + TRITON)  # fmt: skip
MEMORY_VARIANTS = (
    "AdamW(fused)",
    "FloraAdam",
    "FloraAdam(factored)",
    "FloraAdafactor",
    "flora-opt Flora",
    "GaLoreAdamW",
)
MEMORY_BATCH = (8, 1024)
PACKAGES = ("torch", "triton", "cupy-cuda12x", "transformers", "galore-torch")


def gpt2_shapes(d: int, blocks: int, vocab: int = 50257, ctx: int = 1024):
    """Parameter shapes of GPT-2 (lm_head tied to wte): medium is d=1024, 24 blocks."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(blocks):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,)]
        shapes += [(d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [*shapes, (d,), (d,)]


GPT2_MEDIUM = gpt2_shapes(1024, 24)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--flora-opt-path", default=_optimizers.FLORA_OPT_PATH)
    parser.add_argument("--dry-run", action="store_true",
                        help="list the measurements; needs no GPU, writes nothing")  # fmt: skip
    return parser.parse_args(argv)


def available(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def plan_measurements(args: argparse.Namespace) -> list[str]:
    """Every row this run would produce, in words (``--dry-run`` prints these)."""
    rows = []
    if "rng" in args.only:
        paths = ["torch.randn (baseline)", "triton gaussian", "triton rademacher",
                 "triton bits", "torch path gaussian (flora_core.rng)"]  # fmt: skip
        paths += ["cupy kernel gaussian"] if available("cupy") else []
        rows += [f"rng {p} {s[0]}x{s[1]}" for s in RNG_SHAPES for p in paths]
        rows += [f"compress r={RANK} {s[0]}x{s[1]}: fused / materialised A + matmul"
                 for s in sorted({s for s in GPT2_MEDIUM if len(s) == 2})]  # fmt: skip
    if "step" in args.only:
        n = sum(math.prod(s) for s in GPT2_MEDIUM)
        rows += [f"step {name} r={RANK} on GPT-2 medium shapes ({n:,} params)"
                 for name in STEP_VARIANTS]  # fmt: skip
    if "memory" in args.only:
        for name in MEMORY_VARIANTS:
            reason = _optimizers.missing(name, args.flora_opt_path)
            rows.append(f"memory {name}: GPT-2 small, batch 8x1024, bf16 autocast"
                        + (f" (SKIPPED: {reason})" if reason else ""))  # fmt: skip
    return rows


def cuda_time(fn: Callable[[], object], reps: int, warmup: int = 3) -> float:
    """Median seconds of ``fn`` on the current stream (CUDA events)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = (
            torch.cuda.Event(enable_timing=True),
            torch.cuda.Event(enable_timing=True),
        )
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


@contextlib.contextmanager
def triton_dispatch(device_type: str = "cuda") -> Iterator[None]:
    """Route ``flora_core.rng.gaussian`` / ``rademacher`` on torch ``device_type``
    tensors with an int step to the Triton kernel (a prototype of the wiring)."""
    from flora_torch import triton_rng

    from flora_core import _xp

    originals = {name: getattr(rng, name) for name in ("gaussian", "rademacher")}

    def routed(name: str, original: Callable) -> Callable:
        def draw(seed, step, stream, shape, *, xp, offset=(0, 0), device=None):
            if (
                device is not None
                and torch.device(device).type == device_type
                and isinstance(step, int)
                and _xp.backend_name(xp) == "torch"
            ):
                return triton_rng.draw(
                    name, seed, step, stream, shape, offset=offset, device=device
                )
            return original(
                seed, step, stream, shape, xp=xp, offset=offset, device=device
            )

        return draw

    try:
        for name, original in originals.items():
            setattr(rng, name, routed(name, original))
        yield
    finally:
        for name, original in originals.items():
            setattr(rng, name, original)


def timing_row(kind: str, what: str, shape: tuple[int, ...], seconds: float,
               **extra: object) -> dict:  # fmt: skip
    return {
        "kind": kind,
        "what": what,
        "shape": list(shape),
        "seconds": seconds,
        **extra,
    }


def bench_rng(reps: int) -> list[dict]:
    import array_api_compat.torch as xtorch
    from flora_torch import triton_compress, triton_rng

    from flora_core import policy, projection

    rows, dev = [], torch.device("cuda")
    for s in RNG_SHAPES:
        paths = {
            "torch.randn": lambda s=s: torch.randn(s, device=dev),
            "triton gaussian": lambda s=s: triton_rng.gaussian(7, 1, 5, s, device=dev),
            "triton rademacher": lambda s=s: triton_rng.rademacher(7, 1, 5, s, device=dev),
            "triton bits": lambda s=s: triton_rng.random_bits(7, 1, 5, s, device=dev),
            "torch path gaussian": lambda s=s: rng.gaussian(7, 1, 5, s, xp=xtorch, device=dev),
        }  # fmt: skip
        if available("cupy"):
            from flora_core import cupy_kernels

            paths["cupy kernel gaussian"] = lambda s=s, draw=cupy_kernels.draw: draw(
                "gaussian", 7, 1, 5, s
            )
        base = cuda_time(paths["torch.randn"], reps)
        for name, fn in paths.items():
            t = base if name == "torch.randn" else cuda_time(fn, reps)
            rows.append(timing_row("rng", name, s, t, ratio=base / t,
                                   gsamples_per_s=math.prod(s) / t / 1e9))  # fmt: skip
    for s in sorted({s for s in GPT2_MEDIUM if len(s) == 2}):
        plan, g = policy.plan(s, 0, rank=RANK), torch.randn(s, device=dev)

        def compress_with(draw: Callable, plan=plan, g=g) -> Callable:
            return lambda: projection.compress(g, draw(plan), plan.axis, xp=xtorch)

        paths = {
            "torch-path A + torch.matmul": compress_with(
                lambda p: projection.projection(p, 0, 0, xp=xtorch, device=dev)),
            "triton A + torch.matmul": compress_with(
                lambda p: triton_rng.projection(p, 0, 0, device=dev)),
            "fused triton compress": lambda p=plan, g=g: triton_compress.compress(g, p, 0, 0),
        }  # fmt: skip
        base = cuda_time(paths["torch-path A + torch.matmul"], reps)
        for name, fn in paths.items():
            t = base if name.startswith("torch-path") else cuda_time(fn, reps)
            rows.append(timing_row("compress", name, s, t, ratio=base / t, rank=RANK))
    return rows


def make_optimizer(name: str, params: list) -> Any:
    return _optimizers.make_optimizer(name.removesuffix(TRITON), params, rank=RANK)


def bench_step(reps: int) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=gen) * 0.02)
              for s in GPT2_MEDIUM]  # fmt: skip
    for p in params:
        p.grad = torch.randn(p.shape, device="cuda", generator=gen) * 1e-3
    rows: list[dict] = []
    for name in STEP_VARIANTS:
        optimizer = make_optimizer(name, params)
        with triton_dispatch() if name.endswith(TRITON) else contextlib.nullcontext():
            t = cuda_time(optimizer.step, reps, warmup=2)  # the 1st creates the state
        base = rows[0]["seconds"] if rows else t
        rows.append(timing_row("step", name, (len(params),), t, ratio=t / base,
                               params=sum(p.numel() for p in params)))  # fmt: skip
        del optimizer
        torch.cuda.empty_cache()
    return rows


def bench_memory(args: argparse.Namespace) -> list[dict]:
    rows = training_peak.measure(MEMORY_VARIANTS, "cuda", MEMORY_BATCH, RANK,
                                 args.flora_opt_path)  # fmt: skip
    return [{"kind": "memory", "what": row.pop("optimizer"), **row,
             **({"ratio": row["removed_share_of_adamw_state"]}
                if "removed_share_of_adamw_state" in row else {})}
            for row in rows]  # fmt: skip


RATIO_DOC = {"rng": "throughput / torch.randn's", "compress": "speed-up over torch-path A",
             "step": "time / AdamW(fused)'s", "memory": "share of AdamW state removed"}  # fmt: skip


def write(rows: list[dict], meta: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gpu.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1)
    )
    gpu, mib = meta["gpu"], 2**20
    lines = [
        "# GPU benchmark (issue 9)\n", f"- Command: `{meta['command']}`",
        f"- GPU: {gpu['name']} ({gpu['memory_gib']:.0f} GiB), CUDA {gpu['cuda']}; "
        f"CPU {meta['machine']['cpu']}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- Date: {meta['date']}; TF32 off; medians of CUDA-event timings\n",
        "| kind | what | shape | ms | ratio | meaning of ratio | peak MiB | state MiB | note |",
        "| --- | --- | --- | ---: | ---: | --- | ---: | ---: | --- |",
    ]  # fmt: skip
    for r in rows:
        ms = f"{r['seconds'] * 1e3:.3f}" if "seconds" in r else ""
        ratio = f"{r['ratio']:.3f}" if "ratio" in r else ""
        peak = f"{r['peak_bytes'] / mib:.0f}" if "peak_bytes" in r else ""
        state = f"{r['state_bytes'] / mib:.0f}" if "state_bytes" in r else ""
        note = r.get("error", r.get("skipped", ""))
        lines.append(f"| {r['kind']} | {r.get('what', '')} | {r.get('shape', '')} | {ms} "
                     f"| {ratio} | {RATIO_DOC.get(r['kind'], '')} | {peak} | {state} "
                     f"| {note} |")  # fmt: skip
    (RESULTS / "gpu.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.dry_run:
        print("bench_gpu.py would measure (nothing is run or written):")
        print("\n".join(f"  - {row}" for row in plan_measurements(args)))
        print(f"installed: {provenance(*PACKAGES)['versions']}")
        return
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU and none is available here "
                 "(torch.cuda.is_available() is False); nothing was measured or "
                 "written. Use --dry-run to list the measurements.")  # fmt: skip
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    sections = {"rng": lambda: bench_rng(args.reps), "memory": lambda: bench_memory(args),
                "step": lambda: bench_step(args.reps)}  # fmt: skip
    rows: list[dict] = []
    for name in args.only:
        try:  # a failing section is reported and does not cost the others
            rows += sections[name]()
        except Exception as error:  # noqa: BLE001
            rows.append({"kind": name, "error": f"{type(error).__name__}: {error}"})
    props = torch.cuda.get_device_properties(0)
    gpu = {"name": props.name, "cuda": torch.version.cuda,
           "memory_gib": props.total_memory / 2**30}  # fmt: skip
    write(rows, {**provenance(*PACKAGES), "gpu": gpu})
    print((RESULTS / "gpu.md").read_text())


if __name__ == "__main__":
    main()
