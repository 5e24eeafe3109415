"""flora_keras refuses, by name and with both values, every state that it would
misread (issue 16, docs/spec.md §5.6), through ``import_state`` of a flat mapping
or a file, and leaves the optimizer as it was. The core's own checks are tested in
tests/core/test_state.py; this is the adapter's plumbing."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import flora_keras
import keras
import numpy as np
import pytest
from flora_keras import FloraAdafactor, FloraAdam

from flora_core import state as portable
from flora_core import state_files

SHAPE = (16, 12)


def variables(names=("a", "b")):
    rs = np.random.default_rng(0)
    values = {n: rs.standard_normal(SHAPE).astype("float32") for n in ("a", "b")}
    return [keras.Variable(values[n], name=n) for n in names]


def built(cls=FloraAdam, names=("a", "b"), **kwargs):
    optimizer = cls(1e-2, **{"rank": 4, **kwargs})
    optimizer.build(variables(names))
    return optimizer


def trained(steps=3, **kwargs):
    """A FloraAdam after ``steps`` calls (with accumulation_steps=2: one update and
    a micro-batch of the next)."""
    weights = variables()
    optimizer = FloraAdam(1e-2, **{"rank": 4, "accumulation_steps": 2, **kwargs})
    rs = np.random.default_rng(1)
    for _ in range(steps):
        grads = [rs.uniform(0.5, 1.5, SHAPE).astype("float32") for _ in weights]
        optimizer.apply_gradients(zip(grads, weights, strict=True))
    return optimizer


def edited(flat, key, value):
    """``flat`` with ``key`` set and the checksum recomputed (a well-formed file
    whose values are wrong)."""
    out = {**flat, key: np.asarray(value)}
    out[portable.CHECKSUM_KEY] = portable.checksum(out)
    return out


def refused(optimizer, source, message):
    before = [keras.ops.convert_to_numpy(v).copy() for v in optimizer.variables]
    with pytest.raises(ValueError, match=message):
        flora_keras.import_state(optimizer, source)
    for got, want in zip(optimizer.variables, before, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(got), want)


def test_the_header_records_rule_config_tau_and_paths():
    header = flora_keras.state_header(trained(kappa=7))
    assert header.optimizer == "adam" and header.accumulation_steps == 2
    assert header.names == ("a", "b")
    assert header.hyperparameters[0]["kappa"] == 7
    assert header.hyperparameters[0]["b1"] == 0.9
    assert header.framework == f"keras-{keras.backend.backend()}"
    assert flora_keras.state_header(built(FloraAdafactor)).optimizer == "adafactor"


def test_kappa_of_another_optimizer_is_refused():
    flat = flora_keras.export_state(trained(kappa=1000))
    target = built(kappa=10, accumulation_steps=2)
    refused(target, flat, "Parameter 0 kappa: file 1000, optimizer 10")


def test_a_state_of_another_optimizer_kind_is_refused():
    flat = flora_keras.export_state(trained())
    target = built(FloraAdafactor, accumulation_steps=2)
    refused(target, flat, "Parameter 0 optimizer: file 'adam', optimizer 'adafactor'")


def test_weights_in_another_order_are_refused(tmp_path: Path):
    flora_keras.export_state(trained(), tmp_path / "s.safetensors")
    swapped = built(names=("b", "a"), accumulation_steps=2)  # same shapes
    refused(
        swapped, tmp_path / "s.safetensors", "Parameter 0 name: file 'a', optimizer 'b'"
    )


def setting(key, value):
    return lambda flat: edited(flat, key, value)


def nu_with(flat, value):
    nu = flat["param.0.nu"].copy()
    nu[0, 0] = value
    return edited(flat, "param.0.nu", nu)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (setting("param.0.count", np.int64(-1)), "Parameter 0: count -1 is out of range"),
        (setting("param.0.count", 7.9), "Parameter 0: count must be an integer scalar, got 7.9"),
        (setting("param.0.micro_step", np.int64(-5)), "Parameter 0: micro_step -5 is out of range"),
        (lambda f: nu_with(f, float("nan")), "Parameter 0: nu holds non-finite"),
        (lambda f: nu_with(f, -1.0), "Parameter 0: nu holds negative values"),
        (lambda f: {**f, "param.0.mu": f["param.0.mu"] + 1}, "checksum does not match"),
        (setting("param.1.count", np.int64(5)), r"different counts \[1, 5\]"),
    ],
)  # fmt: skip
def test_counters_values_and_checksum_are_checked(change, message):
    flat = change(flora_keras.export_state(trained()))
    refused(built(accumulation_steps=2), flat, message)


def test_a_cycle_longer_than_tau_is_refused():
    flat = flora_keras.export_state(trained(steps=3, accumulation_steps=4))
    refused(
        built(accumulation_steps=2), flat,
        "Parameter 0: micro_step 3 is not below accumulation_steps 2",
    )  # fmt: skip


def test_a_partial_cycle_into_an_optimizer_without_accumulation_is_refused():
    flat = flora_keras.export_state(trained(steps=3))
    refused(built(), flat, "holds 1 accumulated micro-batches")


def test_iterations_follow_the_imported_counters(tmp_path: Path):
    source = trained(steps=5)
    source_path = tmp_path / "s.npz"
    flora_keras.export_state(source, source_path)
    target = built(accumulation_steps=2)
    flora_keras.import_state(target, source_path)
    assert int(keras.ops.convert_to_numpy(target._iterations)) == 5
    assert int(keras.ops.convert_to_numpy(target.iterations)) == 2


def test_format_1_loads_with_a_warning_naming_what_was_not_checked(tmp_path: Path):
    flat = flora_keras.export_state(trained())
    old = {k: v for k, v in flat.items() if k not in ("flora.header", "flora.checksum")}
    old["flora.format_version"] = np.asarray(1, np.int64)
    state_files.save_state(old, tmp_path / "v1.npz")
    target = built(accumulation_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flora_keras.import_state(target, tmp_path / "v1.npz")
    (warning,) = [w for w in caught if w.category is portable.FloraStateWarning]
    assert re.search(r"kappa.*accumulation_steps.*names", str(warning.message))
    again = flora_keras.export_state(target)
    for key in flat:
        if key not in ("flora.header", "flora.checksum"):
            np.testing.assert_array_equal(again[key], flat[key], err_msg=key)


def test_a_file_of_another_layout_is_refused_before_reading(tmp_path: Path):
    flora_keras.export_state(trained(), tmp_path / "s.npz")
    with pytest.raises(
        ValueError, match=r"param\.0\.mu: file <f4 \(16, 4\), optimizer"
    ):
        flora_keras.import_state(
            built(rank=3, accumulation_steps=2), tmp_path / "s.npz"
        )


def keras_store(optimizer):
    """What Keras' ``save_own_variables`` writes: each variable by its index."""
    return {str(i): keras.ops.convert_to_numpy(v) for i, v in enumerate(
        optimizer.variables)}  # fmt: skip


@pytest.mark.parametrize("fault", ["iterations", "nan", "negative"])
def test_keras_restore_range_checks(fault):
    """load_model / load_weights restore through load_own_variables: the same range
    checks as import_state refuse a negative counter and broken statistics."""
    optimizer = trained(steps=3)
    store = keras_store(optimizer)
    index = {id(v): str(i) for i, v in enumerate(optimizer.variables)}
    nu = next(v for v in optimizer.variables if "nu" in v.name and len(v.shape) == 2)
    if fault == "iterations":
        store[index[id(optimizer._iterations)]] = np.asarray(-5, "int64")
        message = r"iterations: the restored counter is negative \(-5\)"
    else:
        value = store[index[id(nu)]].copy()
        value[0, 0] = np.nan if fault == "nan" else -1.0
        store[index[id(nu)]] = value
        message = "nu holds " + ("non-finite" if fault == "nan" else "negative")
    fresh = trained(steps=3)
    with pytest.raises(ValueError, match=message):
        fresh.load_own_variables(store)
    fresh.load_own_variables(keras_store(optimizer))  # an intact store loads
