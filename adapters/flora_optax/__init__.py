"""Flora for Optax: FLORA's compressed momentum and accumulation as JAX transformations.

Every transformation is a pure ``optax.GradientTransformationExtraArgs`` that runs
``flora_core`` with ``xp=jax.numpy``: jit-, sharding- and ``optax``-composable
(``chain``, ``masked``, ``multi_transform``, ``inject_hyperparams``, ``MultiSteps``),
with the same numbers as ``flora_torch`` and ``flora_keras``.

    scale_by_flora_momentum  compressed EMA (Algorithm 2) as a building block
    flora_adam               AdamW with a compressed first moment
    flora_adafactor          optax.adafactor(momentum=...) with a compressed momentum
    flora_multi_steps        optax.MultiSteps with a compressed accumulator (Alg. 1)
    export_state / import_state / plans / state_header   the portable state,
                             format 2, in memory or in a file (docs/spec.md §5)

Stream ids follow ``jax.tree_util`` flatten order of the params (``param_indices``
overrides them); see :func:`flora_adam`.

``optax.tree.map_params`` works on every Flora state (its pytree structure does not
depend on the params). ``f`` sees each per-parameter field: ``mu`` and ``acc`` of a
compressed leaf have shape ``(n, r)`` or ``(r, m)``, factored ``nu_row`` /
``nu_col`` one axis, and a field a leaf does not use holds None. To map the params'
shardings, pass the params along and ``is_leaf=lambda x: x is None``, e.g.
``f = lambda leaf, p, s: None if leaf is None else (s if leaf.shape == p.shape else
replicated)``. A mapped state trains as the original; it carries no plans until its
next update, so export it with the params: ``export_state(state, params)``.

Example:
    >>> import jax, jax.numpy as jnp, optax, flora_optax
    >>> params = {"w": jnp.ones((128, 64)), "b": jnp.zeros(64)}
    >>> tx = flora_optax.flora_multi_steps(flora_optax.flora_adam(1e-3), 2)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = jax.jit(tx.update)(grads, state, params)
"""

from flora_optax._common import FloraSpec
from flora_optax._rule import FloraAdafactorState, FloraAdamState
from flora_optax.accumulation import FloraMultiStepsState, flora_multi_steps
from flora_optax.alias import flora_adafactor, flora_adam
from flora_optax.checkpoint import export_state, import_state, plans, state_header
from flora_optax.momentum import (
    FloraMomentumState,
    MomentumConfig,
    scale_by_flora_momentum,
)

__all__ = [
    "FloraAdafactorState",
    "FloraAdamState",
    "FloraMomentumState",
    "FloraMultiStepsState",
    "FloraSpec",
    "MomentumConfig",
    "export_state",
    "flora_adafactor",
    "flora_adam",
    "flora_multi_steps",
    "import_state",
    "plans",
    "scale_by_flora_momentum",
    "state_header",
]
