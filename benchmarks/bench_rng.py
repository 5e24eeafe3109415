"""Projection generation throughput per backend, eager and compiled, against each
framework's own normal RNG for the same shape, in the same run.

    python benchmarks/bench_rng.py [--rows 256 --cols 4096 --repeats 20]

Each backend runs in its own subprocess (frameworks installed in this environment
only). Writes benchmarks/results/rng.json and rng.md. Throughput is in million
float32 values per second (one value per 32-bit word).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
RESULTS = ROOT / "benchmarks" / "results"
BACKENDS = {
    "numpy": "numpy",
    "torch": "torch",
    "jax": "jax",
    "tensorflow": "tensorflow",
}


def timed(fn, repeats: int, sync) -> float:
    sync(fn())  # warm up / compile
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            out = fn()
        sync(out)
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def measure(backend: str, rows: int, cols: int, repeats: int) -> list[dict]:
    from flora_core import _xp, rng

    xp = _xp.namespace_for(backend)
    shape = (rows, cols)
    cases = []
    if backend == "numpy":
        import numpy as np

        gen = np.random.default_rng(0)
        cases += [
            ("flora gaussian", lambda: rng.gaussian(1, 2, 3, shape, xp=xp)),
            ("flora random_bits", lambda: rng.random_bits(1, 2, 3, shape, xp=xp)),
            (
                "native standard_normal",
                lambda: gen.standard_normal(shape, dtype=np.float32),
            ),
        ]
        sync = lambda x: x  # noqa: E731
    elif backend == "torch":
        import torch

        torch.set_num_threads(2)
        eager = lambda step: rng.gaussian(1, step, 3, shape, xp=xp)  # noqa: E731
        compiled = torch.compile(eager, dynamic=False)
        step = torch.tensor(2)
        cases += [
            ("flora gaussian (eager)", lambda: eager(step)),
            ("flora gaussian (torch.compile)", lambda: compiled(step)),
            ("native torch.randn", lambda: torch.randn(shape)),
        ]
        sync = lambda x: x  # noqa: E731
    elif backend == "jax":
        import jax

        eager = lambda step: rng.gaussian(1, step, 3, shape, xp=xp)  # noqa: E731
        jitted = jax.jit(eager)
        native = jax.jit(lambda key: jax.random.normal(key, shape))
        step, key = jax.numpy.asarray(2, dtype=jax.numpy.uint32), jax.random.key(0)
        cases += [
            ("flora gaussian (eager)", lambda: eager(step)),
            ("flora gaussian (jax.jit)", lambda: jitted(step)),
            ("native jax.random.normal (jit)", lambda: native(key)),
        ]
        sync = lambda x: x.block_until_ready()  # noqa: E731
    else:
        import tensorflow as tf

        eager = lambda step: rng.gaussian(1, step, 3, shape, xp=xp)  # noqa: E731
        compiled = tf.function(eager, jit_compile=True)
        native = tf.function(
            lambda: tf.random.stateless_normal(shape, seed=[1, 2]), jit_compile=True
        )
        step = tf.constant(2, tf.uint32)
        cases += [
            ("flora gaussian (eager)", lambda: eager(step)),
            ("flora gaussian (tf.function jit)", lambda: compiled(step)),
            ("native stateless_normal (tf.function jit)", native),
        ]
        sync = lambda x: x.numpy()  # noqa: E731
    out = []
    for name, fn in cases:
        seconds = timed(fn, repeats, sync)
        out.append({"backend": backend, "case": name, "seconds": seconds,
                    "mvalues_per_s": rows * cols / seconds / 1e6})  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend:  # child process
        print(json.dumps(measure(args.backend, args.rows, args.cols, args.repeats)))
        return
    from _meta import markdown_header, provenance

    rows = []
    for backend, module in BACKENDS.items():
        if importlib.util.find_spec(module) is None:
            continue
        cmd = [sys.executable, __file__, "--backend", backend, "--rows", str(args.rows),
               "--cols", str(args.cols), "--repeats", str(args.repeats)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows += json.loads(proc.stdout.strip().splitlines()[-1])
    meta = provenance("torch", "jax", "jaxlib", "tensorflow", "array-api-compat")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "rng.json").write_text(json.dumps({**meta, "shape": [args.rows, args.cols],
                                                  "results": rows}, indent=1))  # fmt: skip
    lines = [markdown_header("FLORA-RNG v1 throughput", meta),
             f"Shape {args.rows} x {args.cols} float32 (a rank-{args.rows} projection of a "
             f"{args.cols}-wide axis); best of 3 runs of {args.repeats}.\n",
             "| backend | case | M values/s | vs native |", "|---|---|---|---|"]  # fmt: skip
    for backend in BACKENDS:
        group = [r for r in rows if r["backend"] == backend]
        native = next((r for r in group if r["case"].startswith("native")), None)
        for r in group:
            ratio = (
                r["mvalues_per_s"] / native["mvalues_per_s"] if native else float("nan")
            )
            lines.append(
                f"| {backend} | {r['case']} | {r['mvalues_per_s']:.1f} | {ratio:.2f}x |"
            )
    (RESULTS / "rng.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
