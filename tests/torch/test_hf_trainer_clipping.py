"""HF Trainer with Flora's compressed accumulation: clipping happens, by the factor.

Trainer clips with ``accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)``,
i.e. ``torch.nn.utils.clip_grad_norm_``; with ``accumulation_steps > 1`` the hooks
have consumed every ``p.grad``, so that clip sees nothing (Trainer logs a grad norm
of 0.0). Regression (issue 17): without ``max_grad_norm`` on the optimizer this now
warns; with it, ``step()`` clips the accumulated mean gradient. The run is one
update of a tiny random GPT-2 (nothing downloaded), in Adam's linear regime (``eps``
far above every ``|ĝ|``, so the update is ``-lr ĝ / eps``) so that the clipped
update must be the unclipped one times ``c / (norm + 1e-6)``.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from flora_torch import FloraAdam  # noqa: E402
from flora_torch._checkpoint import XP  # noqa: E402

from flora_core import accumulation  # noqa: E402

_path = Path(__file__).with_name("test_hf_trainer.py")
_spec = importlib.util.spec_from_file_location("hf_trainer_client", _path)
client = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = client
_spec.loader.exec_module(client)

TAU = 2


def materialised_norm(optimizer: FloraAdam) -> float:
    """The global norm of every pending ``decompress(acc) / n``, in float64."""
    total = 0.0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            steps = max(optimizer._cycle_micro_steps, state["micro_step"])
            grad = accumulation.accumulated_gradient(
                state["acc"].double(), state["count"], steps,
                plan=optimizer.plan_of(p), xp=XP,
            )  # fmt: skip
            total += float(grad.square().sum())
    return math.sqrt(total)


def one_update(tmp_path: Path, max_grad_norm: float | None) -> dict:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=client.VOCAB, n_positions=client.LENGTH, n_embd=64, n_layer=2,
        n_head=2,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = FloraAdam(model.parameters(), lr=100.0, eps=1e3, rank=16,
                          accumulation_steps=TAU, max_grad_norm=max_grad_norm)  # fmt: skip
    norms: list[float] = []
    optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: norms.append(materialised_norm(opt))
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8,
        gradient_accumulation_steps=TAU, max_grad_norm=1.0, logging_steps=1,
        report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=client.CountingSequences(32),
        optimizers=(optimizer, None),
    )  # fmt: skip
    trainer.train()
    logged = [
        log["grad_norm"] for log in trainer.state.log_history if "grad_norm" in log
    ]
    return {
        "norm": norms[0],
        "logged": logged,
        "update": [
            p.detach() - b for p, b in zip(model.parameters(), before, strict=True)
        ],
        "mu": [optimizer.state[p]["mu"] for p in model.parameters()],
    }


def test_trainer_max_grad_norm_clips_by_the_expected_factor(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="HF Trainer's max_grad_norm.*clip nothing"):
        free = one_update(tmp_path / "free", None)
    assert free["logged"] == [0.0]  # Trainer's own clip found no gradient
    c = free["norm"] / 4  # clips by about 4x
    clipped = one_update(tmp_path / "clipped", c)
    assert clipped["norm"] == pytest.approx(free["norm"], rel=1e-6)  # same data
    factor = c / (clipped["norm"] + 1e-6)
    assert 0.2 < factor < 0.3
    for mu_free, mu_clipped in zip(free["mu"], clipped["mu"], strict=True):
        # the first moment is linear in the gradient: exactly the factor
        scale = float(mu_free.abs().max())
        torch.testing.assert_close(
            mu_clipped, factor * mu_free, rtol=1e-5, atol=1e-6 * scale
        )
    pairs = list(zip(clipped["update"], free["update"], strict=True))
    num = sum(float((a * b).sum()) for a, b in pairs)
    den = sum(float((b * b).sum()) for b in free["update"])
    assert num / den == pytest.approx(factor, rel=2e-3)  # the update: the factor
    for u_free, u_clipped in zip(free["update"], clipped["update"], strict=True):
        scale = float(u_free.abs().max())
        torch.testing.assert_close(
            u_clipped, factor * u_free, rtol=0, atol=2e-3 * scale
        )
