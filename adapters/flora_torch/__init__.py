"""flora_torch: FLORA optimizers as native ``torch.optim.Optimizer`` subclasses.

``FloraAdam`` (AdamW with a compressed first moment) and ``FloraAdafactor`` (the
paper's Adafactor with compressed momentum) run the framework-free math of
``flora_core`` on torch tensors, on any device, with compressed gradient
accumulation inside backward (``accumulation_steps``), an optional layer-wise
update (``layerwise=True``), and a ``state_dict`` in the portable schema that
resumes bit-exactly and moves to Optax and Keras through ``export_state``.

Example:
    >>> import torch
    >>> from flora_torch import FloraAdam
    >>> model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.ReLU(),
    ...                             torch.nn.Linear(128, 10))
    >>> opt = FloraAdam(model.parameters(), lr=1e-3, accumulation_steps=2)
    >>> for _ in range(2):  # two micro-batches, compressed during backward
    ...     model(torch.randn(8, 128)).logsumexp(-1).mean().backward()
    >>> model[0].weight.grad is None  # nothing full-size kept between micro-batches
    True
    >>> opt.step(); opt.zero_grad()

References:
    Hao, Cao, Mou. "Flora: Low-Rank Adapters Are Secretly Gradient Compressors",
    ICML 2024.
"""

from flora_torch.adafactor import FloraAdafactor
from flora_torch.adam import FloraAdam
from flora_torch.velora import VeLoRALinear, apply_velora, velora_linear

__all__ = [
    "FloraAdafactor",
    "FloraAdam",
    "VeLoRALinear",
    "apply_velora",
    "velora_linear",
]
