"""Peak memory of one accumulation cycle, measured in its own process.

Used by ``bench_torch.py --peak VARIANT`` (one subprocess per variant). A cycle is 8
backward passes and one ``step()`` on a 50.4 M-parameter model (12 x Linear(2048,
2048)). After a warm-up cycle (the optimizer state exists), the kernel's peak RSS is
reset through ``/proc/self/clear_refs`` and the next cycle runs; the result is
``VmHWM - VmRSS`` around it, printed as one JSON line.
"""

from __future__ import annotations

import gc
import json

import torch
from flora_torch import FloraAdam

TAU = 8
PEAK_VARIANTS = (
    "AdamW plain loop",
    "FloraAdam plain loop",
    "FloraAdam accumulation_steps=8",
    "FloraAdam accumulation_steps=8 layerwise",
)


def _status(field: str) -> float:
    """A ``/proc/self/status`` field in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def _state_mib(optimizer: torch.optim.Optimizer) -> float:
    tensors = [
        v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)
    ]
    return sum(t.untyped_storage().nbytes() for t in tensors) / 2**20


def peak_main(variant: str, quick: bool) -> None:
    width, layers = (256, 4) if quick else (2048, 12)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    if variant == "AdamW plain loop":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    else:
        tau = TAU if "accumulation_steps" in variant else 1
        optimizer = FloraAdam(model.parameters(), lr=1e-4, accumulation_steps=tau,
                              layerwise="layerwise" in variant)  # fmt: skip
    plain = "plain" in variant
    data = torch.randn(TAU, 4, width)

    def cycle() -> None:
        for (
            x
        ) in data:  # the plain loop scales the loss; compressed accumulation averages
            loss = model(x).square().mean()
            (loss / TAU if plain else loss).backward()
        optimizer.step()
        optimizer.zero_grad()

    cycle()
    gc.collect()
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (the peak RSS) to the current RSS
    cycle()
    peak = _status("VmHWM")
    print(json.dumps({
        "variant": variant, "params": sum(p.numel() for p in model.parameters()),
        "peak_delta_mib": peak - before, "peak_mib": peak, "before_mib": before,
        "state_mib": _state_mib(optimizer),
    }))  # fmt: skip
