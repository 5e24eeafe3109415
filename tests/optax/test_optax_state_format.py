"""flora_optax refuses, by name and with both values, every state that it would
misread (issue 16, docs/spec.md §5.6), through ``import_state`` of a flat mapping
or a file; the header says what the optax state records. The core's own checks
are tested in tests/core/test_state.py; this is the adapter's plumbing."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import flora_optax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax_testing import assert_trees_equal, make_grads, make_params, train

from flora_core import state as portable
from flora_core import state_files

SHAPES = {"a": (16, 12), "b": (16, 12)}
RANK = 4


@pytest.fixture
def params() -> dict[str, Any]:
    return make_params(shapes=SHAPES)


def adam(**kwargs: Any) -> optax.GradientTransformation:
    return flora_optax.flora_adam(1e-2, **{"rank": RANK, **kwargs})


def trained(tx: optax.GradientTransformation, params: Any, steps: int = 3) -> Any:
    return train(tx, params, make_grads(params, steps))[1]


def edited(flat: dict, key: str, value: Any) -> dict:
    """``flat`` with ``key`` set and the checksum recomputed (a well-formed file
    whose values are wrong)."""
    out = {**flat, key: np.asarray(value)}
    out[portable.CHECKSUM_KEY] = portable.checksum(out)
    return out


def test_the_header_records_rule_hyperparameters_tau_and_tree_paths(params):
    tx = flora_optax.flora_multi_steps(adam(kappa=7, factored=True), 3, rank=RANK)
    header = flora_optax.state_header(tx.init(params))
    assert header.names == ("['a']", "['b']")
    assert header.optimizer == ("adam", "adam")
    assert header.accumulation_steps == (3, 3)
    config = header.hyperparameters[0]
    assert config["kappa"] == 7 and config["factored"] is True
    assert config["b1"] == pytest.approx(0.9) and config["second_moment"] == "projected"
    document = portable.read_header(flora_optax.export_state(tx.init(params)))
    assert document["framework"] == "optax"
    sgd = flora_optax.flora_multi_steps(optax.sgd(0.1), 2, rank=RANK)
    assert flora_optax.state_header(sgd.init(params)).optimizer == ("accumulation",) * 2


def test_hyperparameters_traced_at_init_come_from_inject_hyperparams(params):
    tx = optax.inject_hyperparams(flora_optax.flora_adam, static_args=("rank", "seed"))(
        learning_rate=1e-2, kappa=5, rank=RANK
    )
    state = jax.jit(tx.init)(params)  # kappa, b1, ... arrive traced
    assert flora_optax.state_header(state).hyperparameters[0]["kappa"] == 5
    with pytest.raises(ValueError, match="Parameter 0 kappa: file 5, optimizer 1000"):
        flora_optax.import_state(flora_optax.export_state(state), adam().init(params))


def test_kappa_of_another_optimizer_is_refused(params):
    flat = flora_optax.export_state(trained(adam(kappa=1000), params))
    with pytest.raises(ValueError, match="Parameter 0 kappa: file 1000, optimizer 10"):
        flora_optax.import_state(flat, adam(kappa=10).init(params))


def test_a_state_of_another_optimizer_kind_is_refused(params):
    flat = flora_optax.export_state(trained(adam(), params))
    other = flora_optax.flora_adafactor(1e-2, rank=RANK).init(params)
    with pytest.raises(
        ValueError, match="Parameter 0 optimizer: file 'adam', optimizer 'adafactor'"
    ):
        flora_optax.import_state(flat, other)


def test_parameters_of_other_tree_paths_are_refused(params, tmp_path: Path):
    flora_optax.export_state(trained(adam(), params), path=tmp_path / "s.npz")
    renamed = {"x": params["a"], "y": params["b"]}  # same shapes, other paths
    with pytest.raises(
        ValueError,
        match=re.escape("Parameter 0 name: file \"['a']\", optimizer \"['x']\""),
    ):
        flora_optax.import_state(tmp_path / "s.npz", adam().init(renamed))


def setting(key, value):
    return lambda flat: edited(flat, key, value)


def nu_with(flat: dict, value: float) -> dict:
    nu = flat["param.0.nu"].copy()
    nu[0, 0] = value
    return edited(flat, "param.0.nu", nu)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (setting("param.0.count", np.int64(-1)), "Parameter 0: count -1 is out of range"),
        (setting("param.0.count", 7.9), "Parameter 0: count must be an integer scalar, got 7.9"),
        (lambda f: nu_with(f, float("nan")), "Parameter 0: nu holds non-finite"),
        (lambda f: nu_with(f, -1.0), "Parameter 0: nu holds negative values"),
        (lambda f: {**f, "param.0.mu": f["param.0.mu"] + 1}, "checksum does not match"),
    ],
)  # fmt: skip
def test_counters_values_and_checksum_are_checked(params, change, message):
    flat = change(flora_optax.export_state(trained(adam(), params)))
    with pytest.raises(ValueError, match=message):
        flora_optax.import_state(flat, adam().init(params))


def multi_steps(k: int, inner: Any = None) -> optax.GradientTransformation:
    return flora_optax.flora_multi_steps(inner or adam(), k, rank=RANK)


def test_a_cycle_longer_than_k_is_refused(params):
    """A τ = 4 state after 3 micro-batches into flora_multi_steps(..., 2): would
    never emit again (issue 16, case 1)."""
    flat = flora_optax.export_state(trained(multi_steps(4), params, steps=3))
    assert int(flat["param.0.micro_step"]) == 3
    with pytest.raises(
        ValueError, match="Parameter 0: micro_step 3 is not below accumulation_steps 2"
    ):
        flora_optax.import_state(flat, multi_steps(2).init(params))


def test_a_partial_cycle_into_a_plain_optimizer_is_refused(params):
    flat = flora_optax.export_state(trained(multi_steps(2), params, steps=3))
    with pytest.raises(ValueError, match="holds 1 accumulated micro-batches"):
        flora_optax.import_state(flat, adam().init(params))
    finished = flora_optax.export_state(trained(multi_steps(2), params, steps=4))
    state = flora_optax.import_state(finished, adam().init(params))  # no cycle left
    assert int(state.count) == 2


def test_format_1_loads_with_a_warning_naming_what_was_not_checked(
    params, tmp_path: Path
):
    state = trained(multi_steps(2), params, steps=3)
    flat = flora_optax.export_state(state)
    old = {k: v for k, v in flat.items() if k not in ("flora.header", "flora.checksum")}
    old["flora.format_version"] = np.asarray(1, np.int64)
    state_files.save_state(old, tmp_path / "v1.safetensors")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored = flora_optax.import_state(
            tmp_path / "v1.safetensors", multi_steps(2).init(params)
        )
    (warning,) = [w for w in caught if w.category is portable.FloraStateWarning]
    assert re.search(r"kappa.*accumulation_steps.*names", str(warning.message))
    assert_trees_equal(restored, state)


def test_a_file_of_another_layout_is_refused_before_reading(params, tmp_path: Path):
    flora_optax.export_state(trained(adam(), params), path=tmp_path / "s.npz")
    with pytest.raises(
        ValueError, match=r"param\.0\.mu: file <f4 \(16, 4\), optimizer"
    ):
        flora_optax.import_state(tmp_path / "s.npz", adam(rank=3).init(params))


def test_jitted_states_export_the_same_header(params):
    state = trained(adam(kappa=9), params)
    assert flora_optax.state_header(state) == flora_optax.state_header(
        adam(kappa=9).init(params)
    )
    assert jnp.asarray(state.count) == 3
