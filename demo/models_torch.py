"""The demo's GPT in torch, and its optimizers."""

from __future__ import annotations

import math

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (
            self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).unbind(2)
        )
        att = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, c))
        return x + self.down(nn.functional.gelu(self.up(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, width: int, depth: int, heads: int, context: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        for block in self.blocks:  # GPT-2's scaled init of residual projections
            for layer in (block.proj, block.down):
                nn.init.normal_(layer.weight, std=0.02 / math.sqrt(2 * depth))

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln(x))
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def make_optimizer(
    name: str, params, lr: float, rank, kappa: int
) -> torch.optim.Optimizer:
    from flora_torch import FloraAdafactor, FloraAdam

    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if name == "adafactor":  # Adafactor with (uncompressed) momentum: the paper's base
        return FloraAdafactor(params, lr=lr, momentum=0.9, rank=None)
    if name == "flora-adafactor":
        return FloraAdafactor(params, lr=lr, momentum=0.9, rank=rank, kappa=kappa)
    if name == "flora-adam":
        return FloraAdam(params, lr=lr, rank=rank, kappa=kappa)
    raise ValueError(f"Unknown optimizer {name!r}")


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    )


def train(args, name: str, data, progress) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model = GPT(data.vocab_size, args.width, args.depth, args.heads, args.context)
    optimizer = make_optimizer(
        name, model.parameters(), args.lr[name], args.rank, args.kappa
    )
    curve = []
    for step in progress(range(args.steps)):
        x, y = map(
            torch.from_numpy, data.batch("train", step, args.batch, args.context)
        )
        loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        curve.append(loss.item())
    model.eval()
    with torch.no_grad():
        val = [
            float(
                model(
                    *map(
                        torch.from_numpy, data.batch("val", i, args.batch, args.context)
                    )
                )
            )
            for i in range(args.eval_batches)
        ]
    return {"val_loss": sum(val) / len(val), "state_bytes": state_bytes(optimizer),
            "curve": curve, "params": sum(p.numel() for p in model.parameters())}  # fmt: skip
