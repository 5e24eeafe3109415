"""A small GPT-style decoder and LoRA, built here (no model hub).

Pre-LayerNorm blocks with a fused ``qkv`` projection, an attention output ``proj``,
and an MLP ``up``/``down`` (4x); learned positions; untied head. The paper applies
LoRA and FLORA "to attention and feed-forward layers only, while following the naive
procedure for other layers (i.e., token embeddings and vector weights)": those four
matrices per block are :func:`matrix_modules`; everything else is "other".

LoRA (Hu et al., 2022) is implemented here: ``y = W x + s B A x`` (s = alpha / r)
with ``A`` Gaussian, ``B`` zero and ``W`` frozen (the linear layers have no biases).
Trained from scratch (the paper's momentum protocol) ``W`` is a frozen *random* init.
"""

from __future__ import annotations

import math

import torch
from data import CONTEXT, IGNORE, VOCAB_SIZE
from torch import nn

MATRIX_NAMES = ("qkv", "proj", "up", "down")
# NOTE [init scale]: GPT-2 draws weights with std 0.02 at width 768, i.e. about
# 0.5 / sqrt(width); a fixed 0.02 would make a width-64 model's random weights
# (the frozen base of LoRA from scratch) 3.5x smaller relative to its activations.
INIT_SCALE = 0.5


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = (
            nn.LayerNorm(width, bias=False),
            nn.LayerNorm(width, bias=False),
        )
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        self.up = nn.Linear(width, 4 * width, bias=False)
        self.down = nn.Linear(4 * width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        qkv = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads)
        q, k, v = (z.transpose(1, 2) for z in qkv.unbind(2))
        att = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, c))
        return x + self.down(nn.functional.gelu(self.up(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, width: int = 64, depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB_SIZE, width)
        self.position = nn.Parameter(torch.zeros(CONTEXT, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.ln = nn.LayerNorm(width, bias=False)
        self.head = nn.Linear(width, VOCAB_SIZE, bias=False)
        std = INIT_SCALE / math.sqrt(width)  # NOTE [init scale]
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=std)
        for block in self.blocks:  # GPT-2's scaled init of residual projections
            for layer in (block.proj, block.down):
                nn.init.normal_(layer.weight, std=std / math.sqrt(2 * depth))

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the target characters."""
        logits = self.logits(tokens)
        return nn.functional.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE
        )


def matrix_modules(model: GPT) -> list[nn.Linear]:
    """The attention and feed-forward ``nn.Linear`` layers (after LoRA: the bases)."""
    out = []
    for block in model.blocks:
        for name in MATRIX_NAMES:
            layer = getattr(block, name)
            out.append(layer.base if isinstance(layer, LoRALinear) else layer)
    return out


def split_params(model: GPT) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(weight matrices that FLORA compresses, every other trainable parameter)."""
    matrices = [m.weight for m in matrix_modules(model)]
    ids = {id(p) for p in matrices}
    others = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
    return [p for p in matrices if p.requires_grad], others


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) · (x Aᵀ) Bᵀ``; ``base.weight`` frozen, A and B trained."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        self.scale = (alpha if alpha is not None else rank) / rank
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(
            base.in_features))  # fmt: skip
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * (x @ self.lora_a.T) @ self.lora_b.T


def add_lora(model: GPT, rank: int) -> list[nn.Parameter]:
    """Wrap every attention/feed-forward matrix in LoRA; returns the adapters."""
    adapters = []
    for block in model.blocks:
        for name in MATRIX_NAMES:
            layer = LoRALinear(getattr(block, name), rank)
            setattr(block, name, layer)
            adapters += [layer.lora_a, layer.lora_b]
    return adapters
