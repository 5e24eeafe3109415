"""The demo's GPT in plain JAX, trained with Optax transformations."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax


def init_params(key, vocab: int, width: int, depth: int, context: int) -> dict:
    keys = iter(jax.random.split(key, 4 + 4 * depth))
    normal = lambda shape, std=0.02: std * jax.random.normal(next(keys), shape)  # noqa: E731
    residual_std = 0.02 / math.sqrt(2 * depth)
    blocks = [
        {
            "ln1": jnp.ones(width),
            "ln1_b": jnp.zeros(width),
            "qkv": normal((width, 3 * width)),
            "qkv_b": jnp.zeros(3 * width),
            "proj": normal((width, width), residual_std),
            "proj_b": jnp.zeros(width),
            "ln2": jnp.ones(width),
            "ln2_b": jnp.zeros(width),
            "up": normal((width, 4 * width)),
            "up_b": jnp.zeros(4 * width),
            "down": normal((4 * width, width), residual_std),
            "down_b": jnp.zeros(width),
        }  # fmt: skip
        for _ in range(depth)
    ]
    return {
        "embed": normal((vocab, width)), "position": jnp.zeros((context, width)),
        "blocks": blocks, "ln": jnp.ones(width), "ln_b": jnp.zeros(width),
        "head": normal((width, vocab)),
    }  # fmt: skip


def _layer_norm(x, gain, bias):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * gain + bias


def _block(p, x, heads: int):
    b, t, c = x.shape
    qkv = _layer_norm(x, p["ln1"], p["ln1_b"]) @ p["qkv"] + p["qkv_b"]
    q, k, v = jnp.split(qkv.reshape(b, t, 3, heads, c // heads), 3, axis=2)
    q, k, v = (a[:, :, 0].transpose(0, 2, 1, 3) for a in (q, k, v))
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(c // heads)
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
    att = (jax.nn.softmax(scores, -1) @ v).transpose(0, 2, 1, 3).reshape(b, t, c)
    x = x + att @ p["proj"] + p["proj_b"]
    hidden = jax.nn.gelu(_layer_norm(x, p["ln2"], p["ln2_b"]) @ p["up"] + p["up_b"])
    return x + hidden @ p["down"] + p["down_b"]


def loss_fn(params, tokens, targets, heads: int):
    x = params["embed"][tokens] + params["position"][: tokens.shape[1]]
    for block in params["blocks"]:
        x = _block(block, x, heads)
    logits = _layer_norm(x, params["ln"], params["ln_b"]) @ params["head"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def make_optimizer(
    name: str, lr: float, rank, kappa: int
) -> optax.GradientTransformation:
    import flora_optax

    if name == "adamw":
        return optax.adamw(lr, weight_decay=0.0)
    if name == "adafactor":
        return optax.adafactor(lr, momentum=0.9)
    if name == "flora-adafactor":
        return flora_optax.flora_adafactor(lr, momentum=0.9, rank=rank, kappa=kappa)
    if name == "flora-adam":
        return flora_optax.flora_adam(lr, rank=rank, kappa=kappa)
    raise ValueError(f"Unknown optimizer {name!r}")


def state_bytes(state) -> int:
    return sum(
        leaf.nbytes for leaf in jax.tree.leaves(state) if hasattr(leaf, "nbytes")
    )


def train(args, name: str, data, progress) -> dict:
    params = init_params(jax.random.key(args.seed), data.vocab_size, args.width,
                         args.depth, args.context)  # fmt: skip
    optimizer = make_optimizer(name, args.lr[name], args.rank, args.kappa)
    opt_state = optimizer.init(params)
    grad_fn = jax.value_and_grad(loss_fn)

    @jax.jit
    def step(params, opt_state, tokens, targets):
        loss, grads = grad_fn(params, tokens, targets, args.heads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    curve = []
    for i in progress(range(args.steps)):
        x, y = data.batch("train", i, args.batch, args.context)
        params, opt_state, loss = step(params, opt_state, x, y)
        curve.append(float(loss))
    evaluate = jax.jit(lambda p, x, y: loss_fn(p, x, y, args.heads))
    val = [float(evaluate(params, *data.batch("val", i, args.batch, args.context)))
           for i in range(args.eval_batches)]  # fmt: skip
    count = sum(leaf.size for leaf in jax.tree.leaves(params))
    return {"val_loss": sum(val) / len(val), "state_bytes": state_bytes(opt_state),
            "curve": curve, "params": count}  # fmt: skip
