"""A real client: a tiny GPT-2 trained by the Hugging Face Trainer with FloraAdam."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from flora_torch import FloraAdam  # noqa: E402

VOCAB, LENGTH = 256, 32


class CountingSequences(torch.utils.data.Dataset):
    """Token sequences ``a, a+k, a+2k, ...`` (mod 256): learnable from context."""

    def __init__(self, size: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (size, 1), generator=g)
        stride = torch.randint(1, 4, (size, 1), generator=g)
        self.tokens = (start + stride * torch.arange(LENGTH)) % VOCAB

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_trainer_gpt2_loss_falls(accumulation_steps: int, tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=LENGTH, n_embd=64, n_layer=2, n_head=2
    )
    model = transformers.GPT2LMHeadModel(config)  # random weights, nothing downloaded
    steps = 40
    # r = 32 of d = 64: a sketch fine enough to learn in 40 steps (r = 8 learns too,
    # more slowly, as two stacked random projections are noisy when r << d)
    optimizer = FloraAdam(model.parameters(), lr=3e-3, rank=32, kappa=10,
                          accumulation_steps=accumulation_steps)  # fmt: skip
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, 4, steps)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8,
        gradient_accumulation_steps=accumulation_steps, logging_steps=5,
        report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=CountingSequences(640),
        optimizers=(optimizer, scheduler),
    )  # fmt: skip
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == steps // 5
    assert losses[-1] < losses[0] - 0.6, losses  # ln(256) = 5.5 at the start
    wte = model.transformer.wte.weight  # 256 x 64, tied with lm_head
    assert optimizer.state[wte]["mu"].shape == (256, 32)
    assert optimizer.state[wte]["count"] == steps
