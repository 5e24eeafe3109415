"""Resume half of the bit-exact resume test, run in a fresh process.

``python resume_worker.py CASE CHECKPOINT OUT THREADS`` loads the model and optimizer
state dicts (``weights_only=True``), runs the remaining micro-batches of ``CASE``
and saves the parameters to ``OUT``. The test imports ``build`` and ``train`` from
here so that both halves build the same model and data.
"""

from __future__ import annotations

import sys

import torch
from flora_torch import FloraAdafactor, FloraAdam

STEPS = 20
CASES = {
    "adam": (FloraAdam, {"lr": 1e-2, "rank": 8, "kappa": 4, "seed": 3}),
    "adam_factored_accumulate": (
        FloraAdam,
        {"lr": 1e-2, "rank": 8, "kappa": 4, "factored": True, "accumulation_steps": 2},
    ),  # fmt: skip
    "adafactor": (
        FloraAdafactor,
        {"lr": 1e-2, "rank": 8, "kappa": 4, "min_dim_size_to_factor": 16},
    ),  # fmt: skip
}


def build(case: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 96), torch.nn.Tanh(), torch.nn.Linear(96, 24)
    )
    cls, kwargs = CASES[case]
    return model, cls(model.parameters(), **kwargs)


def split(case: str) -> tuple[int, int]:
    """(micro-batches before the checkpoint, total): mid-cycle when accumulating."""
    tau = CASES[case][1].get("accumulation_steps", 1)
    return STEPS // 2 * tau + (1 if tau > 1 else 0), STEPS * tau


def train(model, optimizer, case: str, start: int, stop: int) -> None:
    tau = CASES[case][1].get("accumulation_steps", 1)
    for k in range(start, stop):
        x = torch.randn(16, 32, generator=torch.Generator().manual_seed(k))
        model(x).square().mean().backward()
        if (k + 1) % tau == 0:
            optimizer.step()
            optimizer.zero_grad()


def main(case: str, checkpoint: str, out: str, threads: int) -> None:
    torch.set_num_threads(threads)
    model, optimizer = build(case)
    saved = torch.load(checkpoint, weights_only=True)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    train(model, optimizer, case, split(case)[0], split(case)[1])
    torch.save([p.detach() for p in model.parameters()], out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
