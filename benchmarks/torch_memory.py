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
from _optimizers import state_bytes
from flora_torch import FloraAdam
from training_peak import Meter

TAU = 8
PEAK_VARIANTS = (
    "AdamW plain loop",
    "FloraAdam plain loop",
    "FloraAdam accumulation_steps=8",
    "FloraAdam accumulation_steps=8 layerwise",
)


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
    meter = Meter("cpu")
    before = meter.current() / 2**20
    meter.reset_peak()
    cycle()
    peak = meter.peak() / 2**20
    print(json.dumps({
        "variant": variant, "params": sum(p.numel() for p in model.parameters()),
        "peak_delta_mib": peak - before, "peak_mib": peak, "before_mib": before,
        "state_mib": state_bytes(optimizer) / 2**20,
    }))  # fmt: skip
