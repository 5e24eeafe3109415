"""A LLaMA-style decoder in plain torch: RMSNorm, SwiGLU, rotary positions, untied
embeddings, no biases.

Each block is ``x + o(attn(rope(q), rope(k), v))`` then ``x + down(silu(gate) * up)``
on RMS-normalised inputs (pre-norm), as LLaMA. The attention and feed-forward
matrices (``q k v o gate up down``) are what GaLore, APOLLO and the FLORA runs of the
LM benchmark project (:func:`block_matrices`); embeddings, the output head and the
norm gains get each method's base optimizer, as in GaLore's and APOLLO's LLaMA
pre-training scripts. Initialisation: normal(0, 0.02) for every matrix (LLaMA's
``initializer_range``), norm gains 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

MATRIX_NAMES = ("q", "k", "v", "o", "gate", "up", "down")
INIT_STD = 0.02


@dataclass(frozen=True)
class Config:
    vocab: int = 4096
    width: int = 128
    depth: int = 4
    heads: int = 4
    context: int = 128
    multiple_of: int = 32  # the SwiGLU hidden size 8/3 * width is rounded up to it

    @property
    def hidden(self) -> int:
        h = int(8 * self.width / 3)
        return -(-h // self.multiple_of) * self.multiple_of

    def as_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary_tables(context: int, head_dim: int, base: float = 10000.0):
    """cos and sin of the rotary angles, shape (context, head_dim) (halves repeated)."""
    inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(context, dtype=torch.float32), inv)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions on (batch, heads, time, head_dim) (the rotate-half form)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Block(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        w, h = cfg.width, cfg.hidden
        self.heads = cfg.heads
        self.attn_norm, self.mlp_norm = RMSNorm(w), RMSNorm(w)
        self.q, self.k, self.v, self.o = (nn.Linear(w, w, bias=False) for _ in "qkvo")
        self.gate, self.up = nn.Linear(w, h, bias=False), nn.Linear(w, h, bias=False)
        self.down = nn.Linear(h, w, bias=False)

    def forward(self, x, cos, sin):
        b, t, c = x.shape
        y = self.attn_norm(x)
        q, k, v = (
            layer(y).view(b, t, self.heads, c // self.heads).transpose(1, 2)
            for layer in (self.q, self.k, self.v)
        )
        att = nn.functional.scaled_dot_product_attention(
            rotate(q, cos, sin), rotate(k, cos, sin), v, is_causal=True
        )
        x = x + self.o(att.transpose(1, 2).reshape(b, t, c))
        y = self.mlp_norm(x)
        return x + self.down(nn.functional.silu(self.gate(y)) * self.up(y))


class Llama(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        if cfg.width % cfg.heads or (cfg.width // cfg.heads) % 2:
            raise ValueError(
                f"width {cfg.width} needs an even head size for {cfg.heads}"
            )
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.vocab, bias=False)  # untied
        cos, sin = rotary_tables(cfg.context, cfg.width // cfg.heads)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=INIT_STD)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.cfg.context:
            raise ValueError(f"{t} tokens exceed the context {self.cfg.context}")
        x = self.embed(tokens)
        cos, sin = self.cos[:t], self.sin[:t]
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.head(self.norm(x))

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy (nats per token)."""
        logits = self.logits(tokens)
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def block_matrices(model: Llama) -> list[nn.Parameter]:
    """The attention and feed-forward weights, in model order."""
    return [getattr(b, n).weight for b in model.blocks for n in MATRIX_NAMES]


def count(model: Llama) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    matrices = sum(p.numel() for p in block_matrices(model))
    embed = model.embed.weight.numel() + model.head.weight.numel()
    return {"total": total, "block_matrices": matrices, "embedding_and_head": embed,
            "other": total - matrices - embed}  # fmt: skip
