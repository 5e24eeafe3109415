"""Flora core: FLORA and VeLoRA over array operations, one copy for every framework.

``import flora_core`` loads numpy and array-api-compat only, never a framework.

Modules:
    rng           FLORA-RNG v1 (Philox4x32-10): ``random_bits``, ``gaussian``, ...
    policy        which parameters are compressed (``plan``, ``should_compress``)
    projection    ``projection``, ``compress``, ``decompress``, ``transfer``
    momentum      compressed EMA (FLORA Algorithm 2)
    accumulation  compressed gradient accumulation (FLORA Algorithm 1)
    rules         ``flora_adam`` and ``flora_adafactor`` (pure update rules)
    state         the portable state schema, ``export_state`` / ``import_state``
    velora        VeLoRA sub-token compression of saved activations
"""

from flora_core import accumulation, momentum, policy, projection, rng, rules, state
from flora_core.policy import CompressionPlan, plan, should_compress
from flora_core.rules import (
    AdafactorConfig,
    AdamConfig,
    flora_adafactor,
    flora_adafactor_init,
    flora_adam,
    flora_adam_init,
)

__version__ = "0.1.0"

__all__ = [
    "AdafactorConfig",
    "AdamConfig",
    "CompressionPlan",
    "accumulation",
    "flora_adafactor",
    "flora_adafactor_init",
    "flora_adam",
    "flora_adam_init",
    "momentum",
    "plan",
    "policy",
    "projection",
    "rng",
    "rules",
    "should_compress",
    "state",
]
