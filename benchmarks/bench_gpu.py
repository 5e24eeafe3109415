"""The GPU check: one command, one results file, a time budget per section.

    benchmarks/gpu/run.sh                      # everything, < 8 min on one H200
    python benchmarks/bench_gpu.py [--only bits rng step memory velora] [--reps 20]
    python benchmarks/bench_gpu.py --dry-run   # what would run; needs no GPU
    python benchmarks/bench_gpu.py --smoke --out /tmp/gpu-smoke  # CPU smoke run

Needs a CUDA GPU and refuses to run without one; ``--dry-run`` lists every row,
each section's time budget and the optional packages, anywhere (CI runs it), and
``--smoke`` runs what of each section can run on a CPU (the core's bits on CPU
torch, the eager steps at tiny GPT-2 shapes, VeLoRA's saved bytes) into ``--out``,
never into benchmarks/results: it checks the code, it measures nothing. All GPU
rows come from one run, TF32 off, timed with CUDA events (median of ``--reps``
after warm-up). A section that fails is reported as an error row; one that runs
out of its budget skips its remaining rows and says so. Nothing is written without
a GPU. Writes gpu.json and gpu.md into ``--out`` (default benchmarks/results).

1. ``bits``: FLORA-RNG v1 words, uniform, rademacher and gaussian floats, and a
   stacked-streams projection, drawn on the GPU by the core on CUDA torch tensors,
   the core on JAX GPU arrays, the CuPy kernel and the core on CuPy arrays, and the
   Triton kernel, each compared bit for bit with numpy.
2. ``rng``: throughput of the Triton kernel, the torch path and the CuPy kernel
   against ``torch.randn`` (target >= 0.5x), and the fused Triton compress against
   drawing ``A`` and a cuBLAS fp32 matmul.
3. ``step``: ``optimizer.step()`` at GPT-2-small and GPT-2-medium shapes (fixed
   random gradients) against ``torch.optim.AdamW(fused=True)``: FloraAdam,
   FloraAdam(factored), FloraAdafactor grouped (the default) and FloraAdam
   per-tensor in eager mode, FloraAdam and FloraAdafactor with ``capturable=True``
   captured in a CUDA graph, and FloraAdam under ``torch.compile``.
4. ``memory``: peak CUDA memory of one bf16-autocast GPT-2-small training step
   (batch 8 x 1024, ``benchmarks/training_peak.py``, one subprocess each) for
   AdamW(fused), FloraAdam, FloraAdam(factored), FloraAdafactor, grouped and
   per-tensor: the share of AdamW's state each takes off the peak.
5. ``velora``: bytes autograd saves for backward, and the step's peak, of the
   VeLoRA benchmark's GPT on CUDA, plain against VeLoRA (M = 32).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "adapters"), str(ROOT / "benchmarks")]
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX shares the GPU

import _optimizers  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import training_peak  # noqa: E402
from _meta import provenance  # noqa: E402

from flora_core import rng  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RANK = 256
RNG_SHAPES = [(256, 1024), (256, 4096), (256, 50257), (8192, 8192)]
SECTIONS = ("bits", "rng", "step", "memory", "velora")
# flora_core.rng's draws by the names the CuPy and Triton kernels give them
KERNEL_KINDS = {"random_bits": "bits", "uniform": "uniform",
                "rademacher": "rademacher", "gaussian": "gaussian"}  # fmt: skip
# NOTE [gpu budget]: seconds per section, by design well under the 8 minutes of one
# H200 session (imports and start-up take the rest); a section past its budget skips
# its remaining rows (reported), so the whole run ends in time on a slower GPU too.
# The results are rewritten after every section: a run stopped early keeps them.
BUDGET_S = {"bits": 30, "rng": 40, "step": 150, "memory": 90, "velora": 20}
DRAWS = ("random_bits", "uniform", "rademacher", "gaussian")
BITS_BLOCK = dict(seed=2**40 + 1, step=7, stream=13, shape=(33, 301), offset=(2, 5))
BITS_BACKENDS = ("core on CUDA torch", "core on JAX GPU", "CuPy kernel",
                 "core on CuPy", "Triton kernel")  # fmt: skip
STEP_VARIANTS = (
    ("AdamW(fused)", "eager"),
    ("FloraAdam", "eager"),
    ("FloraAdam(factored)", "eager"),
    ("FloraAdafactor", "eager"),
    ("FloraAdam per-tensor", "eager"),
    ("FloraAdam", "cuda graph"),
    ("FloraAdafactor", "cuda graph"),
    ("FloraAdam", "compiled"),
)
COMPILE_ESTIMATE_S = 60  # skip a compile that would not fit the step budget
MEMORY_VARIANTS = (
    "AdamW(fused)",
    "FloraAdam",
    "FloraAdam(factored)",
    "FloraAdafactor",
    "FloraAdam per-tensor",
    "FloraAdam(factored) per-tensor",
)
MEMORY_BATCH = (8, 1024)
PACKAGES = ("torch", "triton", "jax", "cupy-cuda12x", "cupy-cuda13x", "transformers")


def gpt2_shapes(d: int, blocks: int, vocab: int = 50257, ctx: int = 1024):
    """Parameter shapes of GPT-2 (lm_head tied to wte): medium is d=1024, 24 blocks."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(blocks):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,)]
        shapes += [(d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [*shapes, (d,), (d,)]


GPT2_SMALL = gpt2_shapes(768, 12)
GPT2_MEDIUM = gpt2_shapes(1024, 24)
STEP_MODELS = {"GPT-2 small": GPT2_SMALL, "GPT-2 medium": GPT2_MEDIUM}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--flora-opt-path", default=_optimizers.FLORA_OPT_PATH)
    parser.add_argument("--dry-run", action="store_true",
                        help="list the measurements; needs no GPU, writes nothing")  # fmt: skip
    parser.add_argument("--smoke", action="store_true",
                        help="run each section's CPU-capable code at tiny shapes; "
                             "needs --out (not benchmarks/results)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="folder for gpu.json and gpu.md")  # fmt: skip
    args = parser.parse_args(argv)
    if args.smoke and args.out.resolve() == RESULTS.resolve():
        parser.error("--smoke writes CPU numbers: give --out a folder other than "
                     f"{RESULTS} (which holds GPU numbers only)")  # fmt: skip
    return args


def available(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def plan_measurements(args: argparse.Namespace) -> list[str]:
    """Every row this run would produce, in words (``--dry-run`` prints these)."""
    rows = []
    if "bits" in args.only:
        block = BITS_BLOCK
        rows += [f"bits {b} {d} {block['shape'][0]}x{block['shape'][1]} == numpy"
                 for b in BITS_BACKENDS for d in DRAWS]  # fmt: skip
        rows += ["bits core on CUDA torch stacked-streams projection == numpy"]
    if "rng" in args.only:
        paths = ["torch.randn (baseline)", "triton gaussian", "triton rademacher",
                 "triton bits", "torch path gaussian (flora_core.rng)"]  # fmt: skip
        paths += ["cupy kernel gaussian"] if available("cupy") else []
        rows += [f"rng {p} {s[0]}x{s[1]}" for s in RNG_SHAPES for p in paths]
        rows += [f"compress r={RANK} {s[0]}x{s[1]}: fused / materialised A + matmul"
                 for s in sorted({s for s in GPT2_MEDIUM if len(s) == 2})]  # fmt: skip
    if "step" in args.only:
        for label, shapes in STEP_MODELS.items():
            n = sum(math.prod(s) for s in shapes)
            rows += [f"step {name} {mode} r={RANK} on {label} shapes ({n:,} params)"
                     for name, mode in STEP_VARIANTS]  # fmt: skip
    if "memory" in args.only:
        for name in MEMORY_VARIANTS:
            reason = _optimizers.missing(name, args.flora_opt_path)
            rows.append(f"memory {name}: GPT-2 small, batch 8x1024, bf16 autocast"
                        + (f" (SKIPPED: {reason})" if reason else ""))  # fmt: skip
    if "velora" in args.only:
        rows += ["velora saved-for-backward bytes and step peak on CUDA: plain / M=32"]
    return rows


class Budget:
    """Seconds left to one section (NOTE [gpu budget])."""

    def __init__(self, section: str) -> None:
        self.section, self.limit, self.start = section, BUDGET_S[section], time.time()

    def left(self) -> float:
        return self.limit - (time.time() - self.start)

    def over(self, needs: float = 0.0) -> bool:
        return self.left() < needs


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


def bench_bits(budget: Budget) -> list[dict]:
    """Every GPU backend's RNG bits against numpy's (exact equality)."""
    b = BITS_BLOCK
    want = {d: getattr(rng, d)(b["seed"], b["step"], b["stream"], b["shape"], xp=np,
                                offset=b["offset"]) for d in DRAWS}  # fmt: skip
    draws: dict[str, Callable[[str], Any]] = {}
    import array_api_compat.torch as xtorch

    draws["core on CUDA torch"] = lambda d: getattr(rng, d)(
        b["seed"], b["step"], b["stream"], b["shape"], xp=xtorch, offset=b["offset"],
        device="cuda")  # fmt: skip
    if available("jax"):
        import jax
        import jax.numpy as jnp

        if any(dev.platform == "gpu" for dev in jax.devices()):
            draws["core on JAX GPU"] = lambda d: getattr(rng, d)(
                b["seed"], b["step"], b["stream"], b["shape"], xp=jnp,
                offset=b["offset"])  # fmt: skip
    if available("cupy"):
        import array_api_compat.cupy as xcupy

        from flora_core import cupy_kernels

        draws["CuPy kernel"] = lambda d: cupy_kernels.draw(
            KERNEL_KINDS[d], b["seed"], b["step"], b["stream"], b["shape"],
            offset=b["offset"])  # fmt: skip
        draws["core on CuPy"] = lambda d: getattr(rng, d)(
            b["seed"], b["step"], b["stream"], b["shape"], xp=xcupy,
            offset=b["offset"])  # fmt: skip
    if available("triton"):
        from flora_torch import triton_rng

        draws["Triton kernel"] = lambda d: triton_rng.draw(
            KERNEL_KINDS[d], b["seed"], b["step"], b["stream"], b["shape"], offset=b["offset"],
            device="cuda")  # fmt: skip
    rows = []
    for backend in BITS_BACKENDS:
        for d in DRAWS:
            row = {"kind": "bits", "what": f"{backend} {d}", "shape": list(b["shape"])}
            if backend not in draws:
                row["skipped"] = "backend not available here"
            elif budget.over():
                row["skipped"] = "over the section's time budget"
            else:
                try:
                    got = _host_words(draws[backend](d))
                    row["equal"] = bool(np.array_equal(got, want[d].view(np.uint32)))
                except Exception as error:  # noqa: BLE001
                    row["error"] = f"{type(error).__name__}: {error}"
            rows.append(row)
    streams = (4, 9, 13)  # one call for three parameters' projections
    got = rng.gaussian(7, 3, streams, (64, 300), xp=xtorch, device="cuda")
    equal = all(np.array_equal(_host_words(got[i]),
                               rng.gaussian(7, 3, s, (64, 300), xp=np).view(np.uint32))
                for i, s in enumerate(streams))  # fmt: skip
    rows.append({"kind": "bits", "what": "core on CUDA torch stacked streams gaussian",
                 "shape": [3, 64, 300], "equal": equal})  # fmt: skip
    return rows


def _host_words(x: Any) -> np.ndarray:
    """Any backend's uint32 words or float32 values as host uint32 bit patterns."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.view(torch.int32) if x.dtype in (torch.uint32, torch.float32) else x
        return x.numpy().view(np.uint32)
    if hasattr(x, "get"):
        x = x.get()
    return np.asarray(x).view(np.uint32)


def bench_rng(reps: int, budget: Budget | None = None) -> list[dict]:
    import array_api_compat.torch as xtorch
    from flora_torch import triton_compress, triton_rng

    from flora_core import policy, projection

    rows, dev = [], torch.device("cuda")
    for s in RNG_SHAPES:
        if budget is not None and budget.over():
            rows.append({"kind": "rng", "what": f"{s[0]}x{s[1]}",
                         "skipped": "over the section's time budget"})  # fmt: skip
            continue
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
        if budget is not None and budget.over():
            rows.append({"kind": "compress", "what": f"{s[0]}x{s[1]}",
                         "skipped": "over the section's time budget"})  # fmt: skip
            continue
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


def step_fn(name: str, mode: str, params: list) -> tuple[Callable[[], Any], Any]:
    """``optimizer.step`` of ``name`` in ``mode`` (eager, cuda graph, compiled)."""
    if mode == "cuda graph":
        optimizer = _optimizers.make_optimizer(name, params, rank=RANK)
        optimizer.capturable = True  # NOTE [capturable]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # state, stacks and counts exist before the capture
                optimizer.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            optimizer.step()
        return graph.replay, optimizer
    optimizer = _optimizers.make_optimizer(name, params, rank=RANK)
    if mode == "compiled":
        compiled = torch.compile(optimizer.step)
        for _ in range(2):  # the first call prepares the stacks, the second compiles
            compiled()
        return compiled, optimizer
    optimizer.step()  # state
    return optimizer.step, optimizer


def bench_step(reps: int, budget: Budget, device: str = "cuda",
               models: dict | None = None) -> list[dict]:  # fmt: skip
    rows: list[dict] = []
    for label, shapes in (models or STEP_MODELS).items():
        gen = torch.Generator(device=device).manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, device=device, generator=gen) * 0.02)
                  for s in shapes]  # fmt: skip
        for p in params:
            p.grad = torch.randn(p.shape, device=device, generator=gen) * 1e-3
        base = None
        for name, mode in STEP_VARIANTS:
            row = timing_row("step", f"{name} {mode}", (len(params),), math.nan,
                             model=label, params=sum(p.numel() for p in params))  # fmt: skip
            row.pop("seconds")
            needs = COMPILE_ESTIMATE_S if mode == "compiled" else 5.0
            if device != "cuda" and mode != "eager":
                row["skipped"] = "needs CUDA"
            elif budget.over(needs):
                row["skipped"] = f"over the section's time budget ({budget.limit} s)"
            else:
                try:
                    start = time.time()
                    fn, optimizer = step_fn(name, mode, params)
                    row["setup_s"] = time.time() - start
                    t = (
                        cuda_time(fn, reps, warmup=2)
                        if device == "cuda"
                        else _cpu_time(fn, reps)
                    )
                    base = t if name == "AdamW(fused)" else base
                    row["seconds"] = t
                    if base:
                        row["ratio"] = t / base
                    del fn, optimizer
                except Exception as error:  # noqa: BLE001
                    row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
                if device == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            print(f"  step {label} {name} {mode}: "
                  + (f"{row['seconds'] * 1e3:.2f} ms" if "seconds" in row
                     else row.get("skipped", row.get("error", ""))), flush=True)  # fmt: skip
        del params
    return rows


def _cpu_time(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_memory(args: argparse.Namespace, budget: Budget) -> list[dict]:
    rows = training_peak.measure(MEMORY_VARIANTS, "cuda", MEMORY_BATCH, RANK,
                                 args.flora_opt_path,
                                 deadline=time.time() + budget.left())  # fmt: skip
    return [{"kind": "memory", "what": row.pop("optimizer"), **row,
             **({"ratio": row["removed_share_of_adamw_state"]}
                if "removed_share_of_adamw_state" in row else {})}
            for row in rows]  # fmt: skip


def bench_velora(budget: Budget, device: str = "cuda") -> list[dict]:
    """Saved-for-backward bytes and the training step's peak, plain and VeLoRA."""
    import bench_velora
    from flora_torch import apply_velora

    torch.manual_seed(0)
    config = bench_velora.CONFIG
    tokens = torch.randint(0, config["vocab"], (config["batch"], config["seq"]),
                           device=device)  # fmt: skip
    rows = []
    for method, group_size in (("plain", None), ("VeLoRA M=32", 32)):
        model = bench_velora.GPT(**config).to(device)
        if group_size:
            apply_velora(model, group_size=group_size)
            model.loss(tokens).backward()  # "mean" init reads the first batch
            model.zero_grad(set_to_none=True)
        held = bench_velora.held_for_backward(model, tokens)
        row = {"kind": "velora", "what": method, "saved_bytes": held["total"],
               **{k: v for k, v in held.items() if k != "total"}}  # fmt: skip
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            model.loss(tokens).backward()
            torch.cuda.synchronize()
            row["step_peak_over_start_bytes"] = (
                torch.cuda.max_memory_allocated() - before
            )
        rows.append(row)
    plain = rows[0]["saved_bytes"]
    for row in rows:
        row["ratio"] = row["saved_bytes"] / plain
    return rows


RATIO_DOC = {"rng": "throughput / torch.randn's", "compress": "speed-up over torch-path A",
             "step": "time / AdamW(fused)'s", "memory": "share of AdamW state removed",
             "velora": "saved bytes / plain's", "bits": ""}  # fmt: skip


def write(rows: list[dict], meta: dict, out: Path = RESULTS) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    gpu, mib = meta["gpu"], 2**20
    title = meta.get("title", "The GPU check (benchmarks/gpu/run.sh)")
    lines = [
        f"# {title}\n", f"- Command: `{meta['command']}`",
        f"- GPU: {gpu['name']} ({gpu['memory_gib']:.0f} GiB), CUDA {gpu['cuda']}; "
        f"CPU {meta['machine']['cpu']}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- Date: {meta['date']}; "
        + meta.get("timing", "TF32 off; medians of CUDA-event timings"),
        "- Sections (budget / used s): " + ", ".join(
            f"{k} {BUDGET_S[k]} / {v:.0f}" for k, v in meta["section_seconds"].items())
        + "\n",
        "| kind | what | model / shape | ms | ratio | meaning of ratio | equal | peak MiB "
        "| state MiB | note |",
        "| --- | --- | --- | ---: | ---: | --- | --- | ---: | ---: | --- |",
    ]  # fmt: skip
    for r in rows:
        ms = f"{r['seconds'] * 1e3:.3f}" if "seconds" in r else ""
        ratio = f"{r['ratio']:.3f}" if "ratio" in r else ""
        peak = f"{r['peak_bytes'] / mib:.0f}" if "peak_bytes" in r else ""
        state = f"{r['state_bytes'] / mib:.0f}" if "state_bytes" in r else ""
        equal = str(r["equal"]) if "equal" in r else ""
        where = r.get("model", r.get("shape", ""))
        note = r.get("error", r.get("skipped", ""))
        lines.append(f"| {r['kind']} | {r.get('what', '')} | {where} | {ms} | {ratio} "
                     f"| {RATIO_DOC.get(r['kind'], '')} | {equal} | {peak} | {state} "
                     f"| {note} |")  # fmt: skip
    (out / "gpu.md").write_text("\n".join(lines) + "\n")


def dry_run(args: argparse.Namespace) -> None:
    print("bench_gpu.py would measure (nothing is run or written):")
    print("\n".join(f"  - {row}" for row in plan_measurements(args)))
    total = sum(BUDGET_S[s] for s in args.only)
    print("time budget (s): " + ", ".join(f"{s} {BUDGET_S[s]}" for s in args.only)
          + f"; total {total} s = {total / 60:.1f} min (limit 8 min)")  # fmt: skip
    print(f"installed: {provenance(*PACKAGES)['versions']}")


SMOKE_SHAPES = {"tiny GPT-2": gpt2_shapes(64, 2, vocab=128, ctx=32)}


def smoke_bits() -> list[dict]:
    """The ``bits`` comparison with the core on CPU torch (the GPU rows need CUDA)."""
    import array_api_compat.torch as xtorch

    b = BITS_BLOCK
    rows = []
    for d in DRAWS:
        args = (b["seed"], b["step"], b["stream"], b["shape"])
        want = getattr(rng, d)(*args, xp=np, offset=b["offset"]).view(np.uint32)
        got = _host_words(getattr(rng, d)(*args, xp=xtorch, offset=b["offset"]))
        rows.append({"kind": "bits", "what": f"core on CPU torch {d}",
                     "shape": list(b["shape"]),
                     "equal": bool(np.array_equal(got, want))})  # fmt: skip
    return rows


def smoke(args: argparse.Namespace) -> list[dict]:
    """``--smoke``: each section's code on CPU at tiny shapes (no GPU numbers)."""
    torch.set_num_threads(1)
    sections = {
        "bits": lambda b: smoke_bits(),
        "step": lambda b: bench_step(args.reps, b, device="cpu", models=SMOKE_SHAPES),
        "velora": lambda b: bench_velora(b, device="cpu"),
    }
    rows: list[dict] = []
    used: dict[str, float] = {}
    meta = {**provenance(*PACKAGES), "title": "bench_gpu.py --smoke: a CPU smoke run "
            "(checks the code; these are not GPU numbers)",
            "gpu": {"name": "none (CPU)", "cuda": None, "memory_gib": 0.0},
            "timing": "CPU, 1 thread, best of --reps"}  # fmt: skip
    for name in args.only:
        if name not in sections:
            rows.append({"kind": name, "skipped": "needs CUDA"})
            continue
        budget = Budget(name)
        rows += sections[name](budget)
        used[name] = time.time() - budget.start
    write(rows, {**meta, "section_seconds": used}, args.out)
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.dry_run:
        dry_run(args)
        return
    if args.smoke:
        rows = smoke(args)
        bad = [r for r in rows if "error" in r or r.get("equal") is False]
        print((args.out / "gpu.md").read_text())
        if bad:
            sys.exit(f"bench_gpu.py --smoke: {len(bad)} failing rows: {bad}")
        return
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU and none is available here "
                 "(torch.cuda.is_available() is False); nothing was measured or "
                 "written. Use --dry-run to list the measurements.")  # fmt: skip
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    sections = {
        "bits": lambda b: bench_bits(b),
        "rng": lambda b: bench_rng(args.reps, b),
        "step": lambda b: bench_step(args.reps, b),
        "memory": lambda b: bench_memory(args, b),
        "velora": lambda b: bench_velora(b),
    }
    rows: list[dict] = []
    used: dict[str, float] = {}
    props = torch.cuda.get_device_properties(0)
    gpu = {"name": props.name, "cuda": torch.version.cuda,
           "memory_gib": props.total_memory / 2**30}  # fmt: skip
    meta = {**provenance(*PACKAGES), "gpu": gpu}
    for name in args.only:
        budget = Budget(name)
        print(f"[{name}] budget {budget.limit} s", flush=True)
        try:  # a failing section is reported and does not cost the others
            rows += sections[name](budget)
        except Exception as error:  # noqa: BLE001
            rows.append({"kind": name, "error": f"{type(error).__name__}: {error}"})
        used[name] = time.time() - budget.start
        print(f"[{name}] used {used[name]:.0f} s of {budget.limit} s", flush=True)
        write(rows, {**meta, "section_seconds": used}, args.out)
    print((args.out / "gpu.md").read_text())


if __name__ == "__main__":
    main()
