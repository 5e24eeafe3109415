"""The demo's GPT in Keras 3 (any backend: KERAS_BACKEND is set before import)."""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import layers, ops


class PositionEmbedding(layers.Layer):
    def __init__(self, context: int, width: int, **kwargs):
        super().__init__(**kwargs)
        self.table = self.add_weight(shape=(context, width), initializer="zeros")

    def call(self, x):
        return x + self.table[: ops.shape(x)[1]]


def build_model(
    vocab: int, width: int, depth: int, heads: int, context: int
) -> keras.Model:
    init = keras.initializers.RandomNormal(stddev=0.02)
    residual = keras.initializers.RandomNormal(stddev=0.02 / math.sqrt(2 * depth))
    tokens = keras.Input((context,), dtype="int32")
    x = layers.Embedding(vocab, width, embeddings_initializer=init)(tokens)
    x = PositionEmbedding(context, width)(x)
    for _ in range(depth):
        h = layers.LayerNormalization(epsilon=1e-5)(x)
        h = layers.MultiHeadAttention(heads, width // heads, kernel_initializer=init)(
            h, h, use_causal_mask=True
        )
        x = x + h
        h = layers.LayerNormalization(epsilon=1e-5)(x)
        h = layers.Dense(4 * width, activation="gelu", kernel_initializer=init)(h)
        x = x + layers.Dense(width, kernel_initializer=residual)(h)
    x = layers.LayerNormalization(epsilon=1e-5)(x)
    logits = layers.Dense(vocab, use_bias=False, kernel_initializer=init)(x)
    return keras.Model(tokens, logits)


def make_optimizer(
    name: str, lr: float, rank, kappa: int
) -> keras.optimizers.Optimizer:
    import flora_keras

    if name == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=0.0)
    if name == "adafactor":  # Adafactor with (uncompressed) momentum: the paper's base
        return flora_keras.FloraAdafactor(lr, momentum=0.9, rank=None)
    if name == "flora-adafactor":
        return flora_keras.FloraAdafactor(lr, momentum=0.9, rank=rank, kappa=kappa)
    if name == "flora-adam":
        return flora_keras.FloraAdam(lr, rank=rank, kappa=kappa)
    raise ValueError(f"Unknown optimizer {name!r}")


def train(args, name: str, data, progress) -> dict:
    keras.utils.set_random_seed(args.seed)
    model = build_model(
        data.vocab_size, args.width, args.depth, args.heads, args.context
    )
    optimizer = make_optimizer(name, args.lr[name], args.rank, args.kappa)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=optimizer, loss=loss)
    curve = []
    for i in progress(range(args.steps)):
        x, y = data.batch("train", i, args.batch, args.context)
        curve.append(float(model.train_on_batch(x.astype("int32"), y)))
    val = [float(model.test_on_batch(*data.batch("val", i, args.batch, args.context)))
           for i in range(args.eval_batches)]  # fmt: skip
    state = sum(
        int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in optimizer.variables
    )
    return {"val_loss": sum(val) / len(val), "state_bytes": state, "curve": curve,
            "params": model.count_params()}  # fmt: skip
