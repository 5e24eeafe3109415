"""Peak memory of one GPT-2-small training step, one optimizer per process.

    python benchmarks/training_peak.py NAME --device cpu|cuda [--batch 1 256] [--rank 256]

prints one JSON line; ``measure`` runs every name in its own subprocess (a fresh
allocator each). The model is transformers' ``GPT2LMHeadModel`` with the default
config (124.4 M parameters, random weights, SDPA attention). One warm-up step
(forward, backward, ``step()``, ``zero_grad``) creates the optimizer state; then the
peak is reset and one more step runs:

- ``cuda``: ``torch.cuda.max_memory_allocated`` over the step, bf16 autocast;
- ``cpu``: the process's peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``),
  float32, with ``MALLOC_MMAP_THRESHOLD_`` set so freed tensors go back to the OS and
  RSS follows live memory.

``removed_share_of_adamw_state`` = (AdamW's peak - this peak) / AdamW's state bytes
(the first AdamW among the names): how much of AdamW's optimizer state the optimizer
takes off the step's peak.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "adapters"), str(ROOT / "benchmarks")]

import torch  # noqa: E402
from _optimizers import FLORA_OPT_PATH, NAMES, make_optimizer, missing, state_bytes  # noqa: E402


def _status_bytes(field: str) -> int:
    """A ``/proc/self/status`` field (reported in kB) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


class Meter:
    """``current()``, ``reset_peak()`` and ``peak()`` in bytes for one device."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def current(self) -> int:
        self.sync()
        return torch.cuda.memory_allocated() if self.cuda else _status_bytes("VmRSS")

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS

    def peak(self) -> int:
        self.sync()
        return (
            torch.cuda.max_memory_allocated() if self.cuda else _status_bytes("VmHWM")
        )


def one_variant(name: str, device: str, batch: tuple[int, int], rank: int,
                flora_opt_path: str) -> dict:  # fmt: skip
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(attn_implementation="sdpa")
    model = GPT2LMHeadModel(config).to(device)
    optimizer = make_optimizer(name, list(model.parameters()), rank=rank,
                               flora_opt_path=flora_opt_path)  # fmt: skip
    tokens = torch.randint(0, config.vocab_size, batch, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")

    def train_step() -> None:
        with autocast:
            loss = model(tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    meter = Meter(device)
    train_step()
    gc.collect()
    before = meter.current()
    meter.reset_peak()
    train_step()
    return {
        "optimizer": name, "device": device, "batch": list(batch), "rank": rank,
        "params": sum(p.numel() for p in model.parameters()),
        "before_step_bytes": before, "peak_bytes": meter.peak(),
        "state_bytes": state_bytes(optimizer),
    }  # fmt: skip


def measure(names: tuple[str, ...], device: str, batch: tuple[int, int], rank: int,
            flora_opt_path: str = FLORA_OPT_PATH, threads: int = 1,
            deadline: float | None = None) -> list[dict]:  # fmt: skip
    """Each name's row (or why it is missing), from its own subprocess.

    ``deadline`` (a ``time.time()``): names not started by then are skipped, and a
    subprocess running past it is stopped (a GPU run's time budget).
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows: list[dict] = []
    for name in names:
        reason = missing(name, flora_opt_path)
        left = None if deadline is None else deadline - time.time()
        if left is not None and left < 10:
            reason = reason or "over the time budget"
        if reason:
            rows.append({"optimizer": name, "skipped": reason})
            continue
        command = [sys.executable, __file__, name, "--device", device, "--batch",
                   *map(str, batch), "--rank", str(rank), "--threads", str(threads),
                   "--flora-opt-path", flora_opt_path]  # fmt: skip
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True,
                                  timeout=left)  # fmt: skip
        except subprocess.TimeoutExpired:
            rows.append({"optimizer": name, "skipped": "over the time budget"})
            continue
        if done.returncode:
            error = (done.stderr.strip().splitlines() or ["?"])[-1]
            rows.append({"optimizer": name, "error": error})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        row = rows[-1]
        if "peak_bytes" in row:
            print(f"training peak {name:>18}: {row['peak_bytes'] / 2**20:,.0f} MiB "
                  f"(state {row['state_bytes'] / 2**20:,.0f} MiB)", flush=True)  # fmt: skip
    adamw = (
        r for r in rows if r["optimizer"].startswith("AdamW") and "peak_bytes" in r
    )
    base = next(adamw, None)
    for row in rows:
        if base and "peak_bytes" in row:
            row["removed_share_of_adamw_state"] = (
                base["peak_bytes"] - row["peak_bytes"]
            ) / base["state_bytes"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=NAMES)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, nargs=2, default=(1, 256))
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--flora-opt-path", default=FLORA_OPT_PATH)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    row = one_variant(args.name, args.device, tuple(args.batch), args.rank,
                      args.flora_opt_path)  # fmt: skip
    print(json.dumps(row))


if __name__ == "__main__":
    main()
