"""Fault injection on optimizer-state files: each damaged file must be refused with a
named error or load unchanged, never load altered (issue 16, docs/spec.md §5).

    python benchmarks/fault_injection.py [--seeds 0 1 2]

Per seed, the catalogue of ``conformance/faults.py`` (16 truncations and 200 random
single-bit flips of each container, and the crafted files, seed-independent, once)
against three readers:

* ``core``: ``state_files.load_state(path, like=...)`` + ``state.import_state`` of a
  FloraAdafactor state (numpy), ``.npz`` and ``.safetensors``;
* ``flora_torch``: ``FloraAdam.import_state(path)`` of a file its ``export_state(path)``
  wrote mid-accumulation-cycle (named parameters), ``.npz`` and ``.safetensors``;
* ``flora_optax`` / ``flora_keras`` (where JAX / Keras are installed; Keras on the
  JAX backend): ``import_state(path, ...)`` of a FloraAdam state their
  ``export_state(..., path)`` wrote mid-cycle, ``.npz`` and ``.safetensors``;
* ``torch.save``: the same truncations and flips of ``torch.save(optimizer.state_dict())``
  read by ``torch.load(weights_only=True)`` + ``load_state_dict``: torch's own
  container, which has no checksum, measured for contrast (not a Flora format).

Writes ``benchmarks/results/fault_injection.{json,md}``; exits 1 if a Flora container
(core or an adapter) loaded altered values or refused without a ``ValueError``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "adapters"), str(ROOT / "benchmarks")]
RESULTS = ROOT / "benchmarks" / "results"

from _meta import markdown_header, provenance  # noqa: E402

from conformance import faults  # noqa: E402

# Measured before format 2 (issue 16), the same kinds of fault by hand.
BEFORE = [
    (
        "random single-byte flips of a .safetensors state",
        "40 of 40 loaded altered values",
    ),
    ("random single-byte flips of a .npz state", "35 of 40 caught by zip's CRC, 5 not"),
    ("0.5 MiB .npz (deflated member)", "expanded to 512 MiB on load"),
    ("339-byte .npz declaring 2**36 floats", "numpy tried to allocate 256 GiB"),
    ("process killed mid-save_state", "the good .npz became a truncated one"),
]


def core_target() -> tuple[dict, Callable[[Path], bool]]:
    flat, plans, header = faults.sample_state(seed=11)
    return flat, faults.loader(flat, plans, header)


def torch_optimizer() -> tuple[Any, Callable[[], Any]]:
    """A trained FloraAdam mid-accumulation-cycle, and a builder of fresh ones."""
    import torch
    from flora_torch import FloraAdam

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 96), torch.nn.Tanh(), torch.nn.Linear(96, 24)
    )

    def build() -> Any:
        return FloraAdam(model.named_parameters(), lr=1e-2, rank=8, kappa=4,
                         accumulation_steps=2, max_grad_norm=float("inf"))  # fmt: skip

    optimizer = build()
    for _ in range(5):  # 2 updates and one micro-batch of the third
        model(torch.randn(4, 32)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer, build


def torch_adapter_loader(
    flat: dict, build: Callable[[], Any]
) -> Callable[[Path], bool]:
    def load(path: Path) -> bool:
        fresh = build()
        fresh.import_state(path)
        return same_flat(fresh.export_state(), flat)

    return load


def same_flat(back: dict, flat: dict) -> bool:
    return back.keys() == flat.keys() and all(
        np.array_equal(back[k], flat[k]) for k in flat
    )


def optax_target() -> tuple[dict, Callable[[Path], bool]] | None:
    """A flora_multi_steps(flora_adam) state mid-cycle, and its loader."""
    try:
        import flora_optax
        import jax.numpy as jnp
    except ImportError:
        return None
    params = {"w": jnp.ones((96, 32)), "b": jnp.zeros((24,))}
    tx = flora_optax.flora_multi_steps(flora_optax.flora_adam(1e-2, rank=8), 2)
    state = tx.init(params)
    rs = np.random.default_rng(0)
    for _ in range(3):
        grads = {k: jnp.asarray(rs.standard_normal(v.shape), jnp.float32)
                 for k, v in params.items()}  # fmt: skip
        _, state = tx.update(grads, state, params)
    flat = flora_optax.export_state(state, params)

    def load(path: Path) -> bool:
        loaded = flora_optax.import_state(path, tx.init(params), params)
        return same_flat(flora_optax.export_state(loaded, params), flat)

    return flat, load


def keras_target() -> tuple[dict, Callable[[Path], bool]] | None:
    """A Keras FloraAdam(accumulation_steps=2) state mid-cycle, and its loader."""
    import os

    os.environ.setdefault("KERAS_BACKEND", "jax")
    try:
        import flora_keras
        import keras
    except ImportError:
        return None

    def build() -> tuple[Any, list[Any]]:
        weights = [keras.Variable(np.ones((96, 32), "float32"), name="w"),
                   keras.Variable(np.zeros((24,), "float32"), name="b")]  # fmt: skip
        optimizer = flora_keras.FloraAdam(1e-2, rank=8, accumulation_steps=2)
        optimizer.build(weights)
        return optimizer, weights

    optimizer, weights = build()
    rs = np.random.default_rng(0)
    for _ in range(3):
        grads = [rs.standard_normal(w.shape).astype("float32") for w in weights]
        optimizer.apply_gradients(zip(grads, weights, strict=True))
    flat = flora_keras.export_state(optimizer)

    def load(path: Path) -> bool:
        fresh, _ = build()
        flora_keras.import_state(fresh, path)
        return same_flat(flora_keras.export_state(fresh), flat)

    return flat, load


def equal(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and a.keys() == b.keys()
            and all(equal(a[k], b[k]) for k in a)
        )
    if isinstance(a, list | tuple):
        return (
            type(a) is type(b)
            and len(a) == len(b)
            and all(equal(x, y) for x, y in zip(a, b, strict=True))
        )
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    return type(a) is type(b) and a == b


def torch_save_loader(
    reference: dict, build: Callable[[], Any]
) -> Callable[[Path], bool]:
    import torch

    def load(path: Path) -> bool:
        fresh = build()
        fresh.load_state_dict(torch.load(path, weights_only=True))
        return equal(fresh.state_dict(), reference)

    return load


def torch_save_faults(reference: dict, seed: int) -> Iterator[faults.Fault]:
    import torch

    buffer = io.BytesIO()
    torch.save(reference, buffer)
    yield from faults.damaged(buffer.getvalue(), ".pt", np.random.default_rng(seed))


def run(seeds: list[int]) -> dict:
    rows: dict[tuple[str, str, str], dict] = {}
    peak = 0  # the most memory any refusal of a crafted file allocated

    def record(reader: str, fault: faults.Fault, result: str, error: Any) -> None:
        row = rows.setdefault(
            (reader, fault.container, fault.kind),
            {"reader": reader, "container": fault.container, "kind": fault.kind,
             "tried": 0, "refused": 0, "unchanged": 0, "altered": 0,
             "unnamed": 0, "errors": Counter()},
        )  # fmt: skip
        row["tried"] += 1
        row[result] += 1
        if error is not None:
            row["errors"][faults.error_name(error)] += 1
            row["unnamed"] += not isinstance(error, ValueError)

    core_flat, core_load = core_target()
    optimizer, build = torch_optimizer()
    torch_flat = optimizer.export_state()
    torch_load = torch_adapter_loader(torch_flat, build)
    reference = optimizer.state_dict()
    pt_load = torch_save_loader(reference, build)
    targets = [("core", core_flat, core_load), ("flora_torch", torch_flat, torch_load)]
    for reader, target in (("flora_optax", optax_target()),
                           ("flora_keras", keras_target())):  # fmt: skip
        if target is not None:
            targets.append((reader, *target))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for seed in seeds:
            for reader, flat, load in targets:
                for fault in faults.faults(flat, work, seed):
                    if fault.kind == "crafted" and seed != seeds[0]:
                        continue  # the same files for every seed
                    if fault.kind != "crafted":
                        record(reader, fault, *faults.judge(fault, load, work))
                        continue
                    tracemalloc.start()
                    result, error = faults.judge(fault, load, work)
                    peak = max(peak, tracemalloc.get_traced_memory()[1])
                    tracemalloc.stop()
                    record(reader, fault, result, error)
            for fault in torch_save_faults(reference, seed):
                record("torch.save", fault, *faults.judge(fault, pt_load, work))
    return {"rows": list(rows.values()), "crafted_peak_bytes": peak}


FLORA_READERS = ("core", "flora_torch", "flora_optax", "flora_keras")


def totals(rows: list[dict], readers: tuple[str, ...]) -> dict[str, int]:
    keys = ("tried", "refused", "unchanged", "altered", "unnamed")
    return {k: sum(r[k] for r in rows if r["reader"] in readers) for k in keys}


def markdown(out: dict) -> str:
    flora = out["totals"]["flora"]
    lines = [
        markdown_header("Fault injection on optimizer-state files", out["meta"]),
        f"Seeds {out['seeds']}: {faults.TRUNCATIONS} truncations and {faults.FLIPS} "
        "random single-bit flips per container and seed, and crafted files (once). "
        "*refused*: the load raised (a named `ValueError` unless counted in *unnamed*); "
        "*unchanged*: it loaded every value equal to the original (the flip hit bytes "
        "that carry nothing: zip timestamps, JSON padding); *altered*: it loaded "
        "different values without a word.\n",
        f"**Flora's containers (core and the adapters): {flora['tried']} faults, "
        f"{flora['refused']} refused, {flora['unchanged']} loaded unchanged, "
        f"{flora['altered']} loaded altered, {flora['unnamed']} refused without a "
        "named error.** Refusing a crafted file allocated at most "
        f"{out['crafted_peak_bytes'] / 2**10:.0f} KiB.\n",
        "| reader | container | fault | tried | refused | unchanged | altered | unnamed |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in out["rows"]:
        lines.append(
            f"| {r['reader']} | {r['container']} | {r['kind']} | {r['tried']} | "
            f"{r['refused']} | {r['unchanged']} | {r['altered']} | {r['unnamed']} |"
        )
    pt = out["totals"]["torch.save"]
    lines += [
        "",
        f"`torch.save(optimizer.state_dict())` (torch's own container, no checksum): "
        f"{pt['tried']} faults, {pt['refused']} refused, {pt['unchanged']} unchanged, "
        f"**{pt['altered']} altered**: a flip in a tensor's bytes or in a pickled "
        "hyper-parameter loads unless a range check catches it. For a verified "
        "checkpoint use `optimizer.export_state(path)` / `import_state(path)`.",
        "",
        "## Errors",
        "",
        "| reader | error | count |",
        "| --- | --- | ---: |",
    ]
    errors: dict[tuple[str, str], int] = Counter()
    for r in out["rows"]:
        for name, count in r["errors"].items():
            errors[(r["reader"], name)] += count
    for (reader, name), count in sorted(errors.items()):
        lines.append(f"| {reader} | `{name}` | {count} |")
    lines += ["", "## Before format 2 (issue 16)", "", "| fault | before | now |",
              "| --- | --- | --- |"]  # fmt: skip
    now = {
        "safetensors": _now(out["rows"], ".safetensors"),
        "npz": _now(out["rows"], ".npz"),
    }
    after = [
        now["safetensors"], now["npz"], "refused before reading (zip bomb)",
        "refused before allocating", "the previous file survives (tests/core)",
    ]  # fmt: skip
    for (fault, before), a in zip(BEFORE, after, strict=True):
        lines.append(f"| {fault} | {before} | {a} |")
    return "\n".join(lines) + "\n"


def _now(rows: list[dict], container: str) -> str:
    flips = [r for r in rows if r["container"] == container and r["kind"] == "flip"
             and r["reader"] != "torch.save"]  # fmt: skip
    t = {k: sum(r[k] for r in flips) for k in ("tried", "refused", "altered")}
    return f"{t['refused']} of {t['tried']} single-bit flips refused, {t['altered']} altered"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    out = {"meta": provenance("torch"), "seeds": args.seeds, **run(args.seeds)}
    out["totals"] = {
        "flora": totals(out["rows"], FLORA_READERS),
        "torch.save": totals(out["rows"], ("torch.save",)),
    }
    out["before"] = [{"fault": f, "before": b} for f, b in BEFORE]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fault_injection.json").write_text(json.dumps(out, indent=1) + "\n")
    (RESULTS / "fault_injection.md").write_text(markdown(out))
    print(markdown(out))
    flora = out["totals"]["flora"]
    return 1 if flora["altered"] or flora["unnamed"] else 0


if __name__ == "__main__":
    sys.exit(main())
