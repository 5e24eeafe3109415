"""The torch step itself: aten ops per step and step time, eager and compiled (issue 15).

    nice -n 10 python benchmarks/bench_step.py [--models proxy gpt2-small]
        [--reps 15 3] [--threads 1] [--no-compile] [--quick]

Two parameter sets with fixed random gradients:

- ``proxy``: a GPT-2-shaped model of 12 blocks at width 128 (vocab 512, context 256:
  148 parameter tensors, 2.5 M parameters), rank "auto" (r = 32);
- ``gpt2-small``: GPT-2-small shapes (124.4 M parameters), r = 256.

Optimizers: AdamW(foreach), AdamW(fused), FloraAdam, FloraAdam(factored),
FloraAdafactor (each grouped, the default), plus FloraAdam per-tensor
(``foreach=False``, the reference path), each eager and under
``torch.compile(optimizer.step)``. One warm-up step each (state; the compile), then
steps interleaved round by round (each optimizer once per round, so load drift
hits all alike); the best of ``--reps`` rounds is reported. aten ops are the
top-level ``__torch_dispatch__`` calls of one warm eager step (a multi-tensor op
counts once). Ratios are taken within this run.

Writes benchmarks/results/step.json, step.md and step.png.

    python benchmarks/bench_step.py --peaks [--batch 1 256]

measures instead the GPT-2-small training-step peak (``training_peak.py``, CPU RSS,
float32, one subprocess each) of the grouped and the per-tensor path of FloraAdam,
FloraAdam(factored) and FloraAdafactor, with AdamW(foreach) as the reference, and
writes benchmarks/results/step_peak.json and step_peak.md (target: grouped within 5%
of per-tensor).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "adapters"), str(ROOT / "benchmarks")]

import torch  # noqa: E402
import training_peak  # noqa: E402
from _meta import markdown_header, provenance  # noqa: E402
from flora_torch import FloraAdafactor, FloraAdam  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
NAMES = ("AdamW(foreach)", "AdamW(fused)", "FloraAdam", "FloraAdam(factored)",
         "FloraAdafactor", "FloraAdam per-tensor")  # fmt: skip
MODELS = {  # width, blocks, vocab, context, rank
    "proxy": (128, 12, 512, 256, "auto"),
    "gpt2-small": (768, 12, 50257, 1024, 256),
}
QUICK = {"proxy": (64, 3, 128, 64, "auto"), "gpt2-small": (128, 2, 1024, 256, 32)}


def gpt2_shapes(d: int, blocks: int, vocab: int, ctx: int) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(blocks):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,)]
        shapes += [(d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [*shapes, (d,), (d,)]


def make(name: str, params: list, rank) -> torch.optim.Optimizer:
    lr = 1e-4
    if name.startswith("AdamW"):
        kind = "fused" if "fused" in name else "foreach"
        return torch.optim.AdamW(params, lr=lr, **{kind: True})
    if name == "FloraAdafactor":
        return FloraAdafactor(params, lr=lr, rank=rank)
    return FloraAdam(params, lr=lr, rank=rank, factored="factored" in name,
                     foreach=False if "per-tensor" in name else None)  # fmt: skip


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def measure_model(label: str, spec: tuple, names: tuple[str, ...], reps: int,
                  compile_: bool,
                  compile_names: tuple[str, ...] = NAMES) -> list[dict]:  # fmt: skip
    d, blocks, vocab, ctx, rank = spec
    shapes = gpt2_shapes(d, blocks, vocab, ctx)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
    grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]

    def set_grads() -> None:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()

    variants: dict[str, dict] = {}
    for name in names:
        compiled = compile_ and name in compile_names
        for mode in ("eager", "compiled") if compiled else ("eager",):
            optimizer = make(name, params, rank)
            step = optimizer.step
            row = {"model": label, "optimizer": name, "mode": mode,
                   "tensors": len(params), "params": sum(p.numel() for p in params),
                   "rank": rank}  # fmt: skip
            if mode == "compiled":
                torch._dynamo.reset()
                step = torch.compile(optimizer.step)
            start = time.perf_counter()
            try:
                set_grads()
                step()  # warm-up: state (and the compile)
                if mode == "compiled":
                    set_grads()
                    step()  # NOTE [step layout]: the graph after the first call
            except Exception as error:  # noqa: BLE001 - reported, the rest goes on
                row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
                print(f"{label} {name} {mode}: {row['error']}", flush=True)
                variants[f"{name} {mode}"] = row
                continue
            row["warmup_s"] = time.perf_counter() - start
            if mode == "eager":
                set_grads()
                with OpCounter() as counter:
                    step()
                row["aten_ops"] = counter.count
            row["times"] = []
            variants[f"{name} {mode}"] = {**row, "_step": step}
            print(f"{label} {name} {mode}: ready ({row['warmup_s']:.1f} s)", flush=True)
    for _ in range(reps):  # interleaved rounds
        for row in variants.values():
            if "error" in row:
                continue
            set_grads()
            start = time.perf_counter()
            row["_step"]()
            row["times"].append(time.perf_counter() - start)
    rows = []
    for row in variants.values():
        row.pop("_step", None)
        if "times" in row:
            row["step_s"] = min(row["times"])
        rows.append(row)
    return rows


def ratios(rows: list[dict]) -> dict:
    out = {}
    for label in sorted({r["model"] for r in rows}):
        t = {f"{r['optimizer']} {r['mode']}": r.get("step_s")
             for r in rows if r["model"] == label}  # fmt: skip
        ops = {r["optimizer"]: r.get("aten_ops") for r in rows
               if r["model"] == label and r["mode"] == "eager"}  # fmt: skip

        def ratio(a: str, b: str, t: dict = t) -> float | None:
            return t[a] / t[b] if t.get(a) and t.get(b) else None

        out[label] = {
            "FloraAdam eager / AdamW(foreach) eager": ratio(
                "FloraAdam eager", "AdamW(foreach) eager"),
            "FloraAdam compiled / AdamW(fused) eager": ratio(
                "FloraAdam compiled", "AdamW(fused) eager"),
            "FloraAdam per-tensor / grouped, eager": ratio(
                "FloraAdam per-tensor eager", "FloraAdam eager"),
            "FloraAdam aten ops per step": ops.get("FloraAdam"),
            "FloraAdam per-tensor aten ops per step": ops.get("FloraAdam per-tensor"),
        }  # fmt: skip
    return out


def markdown(result: dict) -> str:
    text = markdown_header("The torch step: aten ops and step time (issue 15)",
                           result["meta"])  # fmt: skip
    text += (f"- torch threads: {result['threads']}; load average at start / end: "
             f"{result['load_start']} / {result['load_end']}; best of "
             f"{result['reps']} interleaved rounds after warm-up\n\n")  # fmt: skip
    text += (
        "| model | optimizer | mode | tensors | aten ops/step | step ms | warm-up s |"
    )
    text += "\n|---|---|---|---:|---:|---:|---:|\n"
    for r in result["rows"]:
        ms = f"{r['step_s'] * 1e3:.2f}" if "step_s" in r else r.get("error", "")
        text += (f"| {r['model']} | {r['optimizer']} | {r['mode']} | {r['tensors']} | "
                 f"{r.get('aten_ops', '')} | {ms} | {r.get('warmup_s', 0):.1f} |\n")  # fmt: skip
    text += "\n| model | ratio | value |\n|---|---|---:|\n"
    for label, values in result["ratios"].items():
        for key, value in values.items():
            shown = (
                ""
                if value is None
                else (f"{value:.2f}" if isinstance(value, float) else str(value))
            )
            text += f"| {label} | {key} | {shown} |\n"
    return text + "\n" + result.get("verdict", "") + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({r["model"] for r in result["rows"]})
    fig, axes = plt.subplots(
        1, len(labels), figsize=(6 * len(labels), 4), squeeze=False
    )
    for ax, label in zip(axes[0], labels, strict=True):
        rows = [r for r in result["rows"] if r["model"] == label and "step_s" in r]
        names = [f"{r['optimizer']}\n{r['mode']}" for r in rows]
        ax.barh(names, [r["step_s"] * 1e3 for r in rows])
        ax.set(xlabel="step ms (best of rounds, 1 thread)", title=label)
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"{result['meta']['date']} {result['meta']['machine']['cpu']}",
                 fontsize=7)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS),
                        default=["proxy", "gpt2-small"])  # fmt: skip
    parser.add_argument("--reps", type=int, nargs="+", default=[15, 3],
                        help="rounds per model, in --models order")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--compile-names", nargs="+", choices=NAMES,
                        default=list(NAMES), help="optimizers also compiled")  # fmt: skip
    parser.add_argument("--compile-models", nargs="+", default=["proxy"],
                        help="models whose steps are also compiled (default: the "
                        "proxy; on a shared 2-core CPU a GPT-2-small compile takes "
                        "tens of minutes)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke)")
    parser.add_argument("--out", default=str(RESULTS / "step"))
    parser.add_argument("--peaks", action="store_true",
                        help="the training-step peaks instead (see the docstring)")  # fmt: skip
    parser.add_argument("--batch", type=int, nargs=2, default=(1, 256))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.peaks:
        peaks(tuple(args.batch), args.threads)
        return
    load_start = round(os.getloadavg()[0], 2)
    rows = []
    for i, label in enumerate(args.models):
        spec = (QUICK if args.quick else MODELS)[label]
        reps = args.reps[min(i, len(args.reps) - 1)]
        compile_ = not args.no_compile and label in args.compile_models
        rows += measure_model(label, spec, NAMES, reps, compile_,
                              tuple(args.compile_names))  # fmt: skip
    result = {"meta": provenance("torch"), "threads": args.threads, "reps": args.reps,
              "load_start": load_start, "load_end": round(os.getloadavg()[0], 2),
              "rows": rows, "ratios": ratios(rows)}  # fmt: skip
    result["verdict"] = verdict(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows_json = [{k: v for k, v in r.items() if k != "times"} | {"times": r.get("times")}
                 for r in rows]  # fmt: skip
    out.with_suffix(".json").write_text(
        json.dumps({**result, "rows": rows_json}, indent=1)
    )
    out.with_suffix(".md").write_text(markdown(result))
    plot(result, out.with_suffix(".png"))
    print(out.with_suffix(".md").read_text())


PEAK_NAMES = ("AdamW(foreach)", "FloraAdam", "FloraAdam per-tensor",
              "FloraAdam(factored)", "FloraAdam(factored) per-tensor", "FloraAdafactor",
              "FloraAdafactor per-tensor")  # fmt: skip


def peaks(batch: tuple[int, int], threads: int) -> None:
    meta = provenance("torch", "transformers")
    rows = training_peak.measure(PEAK_NAMES, "cpu", batch, 256, threads=threads)
    by_name = {r["optimizer"]: r for r in rows if "peak_bytes" in r}
    text = markdown_header("GPT-2-small training-step peak: grouped against per-tensor",
                           meta)  # fmt: skip
    text += (f"Peak RSS of one training step (transformers GPT2LMHeadModel, 124.4 M "
             f"params, batch {batch[0]} x {batch[1]}, float32, r = 256) after a warm-up "
             "step, one process per optimizer (`benchmarks/training_peak.py`).\n\n"
             "| optimizer | state MiB | peak MiB | grouped / per-tensor peak |\n"
             "|---|---:|---:|---:|\n")  # fmt: skip
    for r in rows:
        if "peak_bytes" not in r:
            text += f"| {r['optimizer']} | | | {r.get('skipped', r.get('error'))} |\n"
            continue
        other = by_name.get(r["optimizer"] + " per-tensor")
        ratio = f"{r['peak_bytes'] / other['peak_bytes']:.3f}" if other else ""
        if other:
            r["grouped_over_per_tensor"] = r["peak_bytes"] / other["peak_bytes"]
        text += (f"| {r['optimizer']} | {r['state_bytes'] / 2**20:,.0f} | "
                 f"{r['peak_bytes'] / 2**20:,.0f} | {ratio} |\n")  # fmt: skip
    worst = max((r["grouped_over_per_tensor"] for r in rows
                 if "grouped_over_per_tensor" in r), default=None)  # fmt: skip
    if worst is not None:
        text += (
            f"\nLargest grouped / per-tensor peak: {worst:.3f} "
            f"({'met' if worst <= 1.05 else 'MISSED'}, target <= 1.05).\n"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "step_peak.json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                       indent=1))  # fmt: skip
    (RESULTS / "step_peak.md").write_text(text)
    print(text)


def verdict(result: dict) -> str:
    proxy = result["ratios"].get("proxy")
    if not proxy:
        return ""
    eager = proxy["FloraAdam eager / AdamW(foreach) eager"]
    compiled = proxy["FloraAdam compiled / AdamW(fused) eager"]
    ops = proxy["FloraAdam aten ops per step"]

    def met(value, bound) -> str:
        if value is None:
            return "not measured"
        return (
            f"{value:.2f} ({'met' if value <= bound else 'MISSED'}, target <= {bound})"
        )

    return (f"Targets on the proxy, one thread: FloraAdam eager / AdamW(foreach) "
            f"{met(eager, 1.0)}; FloraAdam compiled / AdamW(fused) {met(compiled, 2.0)}; "
            f"aten ops per step {ops} ({'met' if ops is not None and ops <= 300 else 'MISSED'}, "
            f"target <= 300).")  # fmt: skip


if __name__ == "__main__":
    main()
