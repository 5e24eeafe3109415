"""Keras' generic optimizer tests, run over FloraAdam and FloraAdafactor.

Written for this project after reading keras-team/keras
``keras/src/optimizers/optimizer_test.py`` (the base optimizer's behaviour),
``adam_test.py`` and ``adamw_test.py`` (FloraAdam in Adam's and AdamW's place: its
weights here are vectors or too small to compress, so it is exactly the base
optimizer) and ``loss_scale_optimizer_test.py`` (Flora as the inner optimizer). The
inputs, step counts, tolerances and golden numbers are Keras'. Where Keras' golden
numbers are SGD's (the base optimizer tests use ``SGD(learning_rate=1.0)``), the
expectation is the same Flora optimizer run without the feature under test (e.g.
the update of the accumulated mean, applied directly): the behaviour is Keras', the
numbers Flora's. Run once per Keras backend (``KERAS_BACKEND``).

Not applicable here, with the reason (nothing else is dropped):

- ``adam_test.py::test_correctness_with_golden``: its golden numbers are
  ``Adam(amsgrad=True)``'s; Flora has no amsgrad.
- ``adamw_test.py::test_weight_decay_is_none``: ``AdamW`` refuses
  ``weight_decay=None``; FloraAdam is Adam and AdamW in one, and None means Adam.
- ``optimizer_test.py::test_get_method``'s built-in names ("sgd", "adamw"): Flora's
  optimizers are found by their registered names (``flora_keras>FloraAdam``).
- ``amsgrad`` and ``nesterov`` arguments in the config tests: not Flora arguments.
"""

from __future__ import annotations

import json
import os
import pickle

import keras
import numpy as np
import pytest
from flora_keras import FloraAdafactor, FloraAdam
from keras import ops
from keras.optimizers import LossScaleOptimizer
from keras_testing import BACKEND, slot

CLASSES = pytest.mark.parametrize(
    "cls", [FloraAdam, FloraAdafactor], ids=lambda c: c.__name__
)


def close(actual, desired, atol: float = 1e-6, rtol: float = 1e-6) -> None:
    """Keras' ``assertAllClose`` (its default tolerances)."""
    np.testing.assert_allclose(
        ops.convert_to_numpy(actual),
        ops.convert_to_numpy(desired),
        atol=atol,
        rtol=rtol,
    )


def value(variable) -> np.ndarray:
    return np.array(ops.convert_to_numpy(variable))


def applied(optimizer, grads: list, values: list) -> list[np.ndarray]:
    """The values ``optimizer`` gives fresh variables ``values`` after one
    ``apply_gradients`` of ``grads``: the reference for Keras' SGD goldens."""
    variables = [keras.Variable(v) for v in values]
    optimizer.apply_gradients(zip(grads, variables, strict=True))
    return [value(v) for v in variables]


def overwrite_accumulator(optimizer, variable):
    """Flora's counterpart of Keras' ``_accumulated_gradients`` for a variable
    marked ``overwrite_with_gradient``."""
    return optimizer._overwrite_slots[optimizer._get_variable_index(variable)]


def assert_serialization_round_trips(instance) -> None:
    """Keras' ``run_class_serialization_test``: get_config and serialize round trips
    keep the config (as JSON) and the attributes."""
    config_json = json.dumps(instance.get_config(), sort_keys=True)
    revived = type(instance).from_config(instance.get_config())
    assert json.dumps(revived.get_config(), sort_keys=True) == config_json
    assert set(dir(revived)) == set(dir(instance))
    serialized = json.loads(json.dumps(keras.saving.serialize_keras_object(instance)))
    revived = keras.saving.deserialize_keras_object(serialized)
    assert type(revived) is type(instance)
    assert json.dumps(revived.get_config(), sort_keys=True) == config_json
    assert set(dir(revived)) - {"__annotations__"} == set(dir(instance)) - {
        "__annotations__"
    }


# ---------------------------------------------------------------- optimizer_test.py


@CLASSES
def test_iterations_counter(cls):
    v = keras.Variable([[1.0, 2.0], [3.0, 4.0]])
    grads = ops.convert_to_tensor([[1.0, 1.0], [1.0, 1.0]])
    optimizer = cls(learning_rate=1.0)
    close(optimizer.iterations, 0)
    optimizer.apply_gradients([(grads, v)])
    close(optimizer.iterations, 1)
    optimizer.apply_gradients([(grads, v)])
    close(optimizer.iterations, 2)


@CLASSES
def test_empty_gradients(cls):
    v = keras.Variable([[3.0, 4.0], [5.0, 6.0]])
    optimizer = cls(learning_rate=1.0)
    with pytest.raises(ValueError, match="No gradients provided for any variable."):
        optimizer.apply_gradients([(None, v)])
    # Filtering of empty gradients: v2 moves as if alone, v stays.
    v2 = keras.Variable([[3.0, 4.0], [5.0, 6.0]])
    grads2 = ops.convert_to_tensor([[1.0, 1.0], [1.0, 1.0]])
    optimizer = cls(learning_rate=1.0)
    with pytest.warns(UserWarning, match="Gradients do not exist"):
        optimizer.apply_gradients([(None, v), (grads2, v2)])
    close(v, [[3.0, 4.0], [5.0, 6.0]])
    close(v2, applied(cls(learning_rate=1.0), [grads2], [[[3.0, 4.0], [5.0, 6.0]]])[0])
    assert np.all(value(v2) != [[3.0, 4.0], [5.0, 6.0]])


@CLASSES
def test_clip_args(cls):
    assert cls(learning_rate=1.0, clipnorm=0.1).clipnorm == 0.1
    assert cls(learning_rate=1.0, clipvalue=0.1).clipvalue == 0.1
    assert cls(learning_rate=1.0, global_clipnorm=0.1).global_clipnorm == 0.1
    message = "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can"
    with pytest.raises(ValueError, match=message):
        cls(learning_rate=1.0, clipnorm=0.1, clipvalue=0.1)
    with pytest.raises(ValueError, match=message):
        cls(learning_rate=1.0, clipnorm=0.1, global_clipnorm=0.1)


@CLASSES
def test_clip_norm(cls):
    clipped = cls(clipnorm=1)._clip_gradients([ops.convert_to_tensor([100.0, 100.0])])
    close(clipped[0], [2**0.5 / 2, 2**0.5 / 2])


@CLASSES
def test_clip_value(cls):
    clipped = cls(clipvalue=1)._clip_gradients([ops.convert_to_tensor([100.0, 100.0])])
    close(clipped[0], [1.0, 1.0])


@CLASSES
def test_global_clip_norm(cls):
    grad = np.array([50.0, 100.0], dtype="float32")
    clipped = cls(global_clipnorm=1)._clip_gradients([ops.convert_to_tensor(grad)])
    close(clipped[0], grad / np.linalg.norm(grad))


@CLASSES
def test_ema(cls):
    """EMA initialised to the first updated value, then ``0.9 ema + 0.1 v``, and the
    variables overwritten with it on every third iteration."""
    v = keras.Variable([[3.0, 4.0], [5.0, 6.0]])
    grads = ops.convert_to_tensor([[1.0, 1.0], [1.0, 1.0]])
    optimizer = cls(
        learning_rate=1.0, use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=3
    )
    plain, reference = cls(learning_rate=1.0), keras.Variable([[3.0, 4.0], [5.0, 6.0]])
    ema = None
    for _ in range(3):
        optimizer.apply_gradients([(grads, v)])
        plain.apply_gradients([(grads, reference)])
        ema = value(reference) if ema is None else 0.9 * ema + 0.1 * value(reference)
        close(optimizer._model_variables_moving_average[0], ema)
    close(v, ema)  # overwritten on the third iteration
    assert np.all(ema != value(reference))


@pytest.mark.skipif(BACKEND == "numpy", reason="requires a trainable backend")
@CLASSES
def test_ema_with_model_fit(cls):
    """After fit, the weights are the EMA weights (``finalize_variable_values``)."""
    x_train = np.ones((1, 1)).astype("float32")
    y_train = np.zeros((1, 1)).astype("float32")
    optimizer = cls(learning_rate=0.1, use_ema=True, ema_momentum=0.9)
    model = keras.Sequential(
        [keras.layers.Dense(2, kernel_initializer="ones", use_bias=False)]
    )
    model.compile(loss="mse", optimizer=optimizer, run_eagerly=True)
    model.fit(x_train, y_train, batch_size=1, epochs=2, verbose=0)
    average = value(optimizer._model_variables_moving_average[0])
    close(model.trainable_variables[0], average, atol=1e-5)
    assert np.all(average < 1.0)


@CLASSES
def test_constraints_are_applied(cls):
    v = keras.Variable(np.random.default_rng(0).random((2, 2)) - 1.0)
    v.constraint = keras.constraints.NonNeg()
    cls(learning_rate=0.0001).apply_gradients([(ops.zeros((2, 2)), v)])
    assert np.min(value(v)) == pytest.approx(0.0)


@CLASSES
def test_get_method(cls):
    name = keras.saving.get_registered_name(cls)
    assert isinstance(keras.optimizers.get(name), cls)
    assert keras.optimizers.get(None) is None
    with pytest.raises(ValueError):
        keras.optimizers.get("typo")


@CLASSES
def test_static_loss_scaling(cls):
    """Gradients of a loss scaled by 1024 move the variable as the unscaled ones."""
    grads = ops.convert_to_tensor([[1.0, 2.0], [3.0, 4.0]])
    optimizer = cls(learning_rate=1.0, loss_scale_factor=1024.0)
    v = keras.Variable([[1.0, 2.0], [3.0, 4.0]])
    optimizer.apply_gradients([(grads * 1024.0, v)])
    assert optimizer.scale_loss(1.0) == 1024.0
    close(v, applied(cls(learning_rate=1.0), [grads], [[[1.0, 2.0], [3.0, 4.0]]])[0])


@CLASSES
def test_set_weights(cls):
    x = keras.Variable([[1.0, 2.0], [3.0, 4.0]])
    optimizer_1 = cls()
    grads = ops.convert_to_tensor([[1.0, 2.0], [3.0, 4.0]])
    optimizer_1.apply_gradients(zip([grads], [x], strict=True))
    optimizer_2 = cls()
    with pytest.raises(ValueError, match="You are calling*"):
        optimizer_2.set_weights(optimizer_1.variables)
    optimizer_2.build([x])
    optimizer_2.set_weights(optimizer_1.variables)
    assert len(optimizer_1.variables) == len(optimizer_2.variables) > 2
    for a, b in zip(optimizer_1.variables, optimizer_2.variables, strict=True):
        close(a, b)


@CLASSES
def test_gradient_accumulation(cls):
    """``accumulation_steps=3`` (Flora's ``gradient_accumulation_steps``): the
    variable moves on every third call, by the update of the mean gradient;
    ``_iterations`` counts calls, ``iterations`` applied updates (Keras' own)."""
    v = keras.Variable([[1.0, 2.0], [3.0, 4.0]])
    grads = ops.convert_to_tensor([[1.0, 1.0], [1.0, 1.0]])
    optimizer = cls(learning_rate=1.0, accumulation_steps=3)
    assert optimizer.accumulation_steps == 3
    stepped = applied(cls(learning_rate=1.0), [grads], [[[1.0, 2.0], [3.0, 4.0]]])[0]
    expected = [
        ([[1.0, 2.0], [3.0, 4.0]], [[1.0, 1.0], [1.0, 1.0]], 1, 0),
        ([[1.0, 2.0], [3.0, 4.0]], [[2.0, 2.0], [2.0, 2.0]], 2, 0),
        (stepped, [[0.0, 0.0], [0.0, 0.0]], 3, 1),
        (stepped, [[1.0, 1.0], [1.0, 1.0]], 4, 1),
    ]
    for weights, accumulated, micro_batches, updates in expected:
        optimizer.apply_gradients([(grads, v)])
        close(v, weights)
        close(slot(optimizer, v, "acc"), accumulated)
        close(optimizer._iterations, micro_batches)
        close(optimizer.iterations, updates)


@CLASSES
def test_callable_learning_rate(cls):
    v = keras.Variable([[1.0, 2.0], [3.0, 4.0]])
    grads = ops.convert_to_tensor([[1.0, 1.0], [1.0, 1.0]])
    optimizer = cls(learning_rate=lambda: 0.1)
    close(optimizer.iterations, 0)
    optimizer.apply_gradients([(grads, v)])
    close(v, applied(cls(learning_rate=0.1), [grads], [[[1.0, 2.0], [3.0, 4.0]]])[0])
    close(optimizer.iterations, 1)


@CLASSES
def test_overwrite_with_gradient(cls):
    v = keras.Variable([[1.0, 2.0], [3.0, 4.0]])
    v.overwrite_with_gradient = True
    v2 = keras.Variable([[1.0, 2.0], [3.0, 4.0]])
    grads = ops.convert_to_tensor([[1.0, 1.0], [1.0, 1.0]])
    grads2 = ops.convert_to_tensor([[1.0, 1.0], [1.0, 1.0]])
    cls(learning_rate=1.0).apply_gradients([(grads, v), (grads2, v2)])
    close(v, [[1.0, 1.0], [1.0, 1.0]])  # overwritten by its gradient
    close(v2, applied(cls(learning_rate=1.0), [grads2], [[[1.0, 2.0], [3.0, 4.0]]])[0])


@CLASSES
def test_overwrite_with_gradient_with_gradient_accumulation(cls):
    """Under accumulation a variable marked ``overwrite_with_gradient`` (float8
    scales) keeps the cycle's element-wise maximum and is written on the applied
    step only, as Keras does."""
    v = keras.Variable([[1.0, 2.0], [3.0, 4.0]])
    v.overwrite_with_gradient = True
    v2 = keras.Variable([[1.0, 2.0], [3.0, 4.0]])
    ones = ops.convert_to_tensor([[1.0, 1.0], [1.0, 1.0]])
    twos = ops.convert_to_tensor([[2.0, 2.0], [2.0, 2.0]])
    optimizer = cls(learning_rate=1.0, accumulation_steps=2)
    stepped = applied(cls(learning_rate=1.0), [(ones + twos) / 2],
                      [[[1.0, 2.0], [3.0, 4.0]]])[0]  # fmt: skip
    start = [[1.0, 2.0], [3.0, 4.0]]
    expected = [  # (grads, _iterations, iterations, v, v2, v's and v2's accumulators)
        (ones, 1, 0, start, start, [[1.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]),
        (twos, 2, 1, [[2.0, 2.0], [2.0, 2.0]], stepped, np.zeros((2, 2)), np.zeros((2, 2))),
        (ones, 3, 1, [[2.0, 2.0], [2.0, 2.0]], stepped, [[1.0, 1.0], [1.0, 1.0]],
         [[1.0, 1.0], [1.0, 1.0]]),
    ]  # fmt: skip
    for grads, micro_batches, updates, want_v, want_v2, acc_v, acc_v2 in expected:
        optimizer.apply_gradients([(grads, v), (grads, v2)])
        close(optimizer._iterations, micro_batches)
        close(optimizer.iterations, updates)
        close(v, want_v)
        close(v2, want_v2)
        close(overwrite_accumulator(optimizer, v), acc_v)
        close(slot(optimizer, v2, "acc"), acc_v2)


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: FloraAdam(weight_decay=0.05, **kw),
        lambda **kw: FloraAdafactor(weight_decay_rate=0.05, **kw),
    ],
    ids=["FloraAdam", "FloraAdafactor"],
)
def test_gradient_accumulation_with_weight_decay(make):
    """Three accumulated micro-batches = one step on their mean, decay included."""
    optimizer1, optimizer3 = make(), make(accumulation_steps=3)
    variable1 = keras.Variable([[0.9], [0.5]])
    variable3 = keras.Variable([[0.9], [0.5]])
    rng = np.random.default_rng(0)
    for _ in range(8):
        grads3 = rng.random([3, 2, 1]).astype("float32")
        optimizer1.apply_gradients(
            [(ops.convert_to_tensor(grads3.mean(axis=0)), variable1)]
        )
        for batch in range(3):
            optimizer3.apply_gradients(
                [(ops.convert_to_tensor(grads3[batch]), variable3)]
            )
    close(variable1, variable3)
    assert np.all(value(variable1) != [[0.9], [0.5]])


@CLASSES
def test_setting_lr_to_callable_untracks_lr_var(cls):
    optimizer = cls(learning_rate=0.001)
    assert len(optimizer.variables) == 2
    optimizer.learning_rate = keras.optimizers.schedules.PolynomialDecay(
        optimizer.learning_rate, 4
    )
    assert len(optimizer.variables) == 1


@CLASSES
def test_pickleable_optimizers(cls):
    optimizer = cls()
    reloaded = pickle.loads(pickle.dumps(optimizer))
    assert optimizer.get_config() == reloaded.get_config()


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.train.Checkpoint: TF only")
@CLASSES
def test_tf_checkpointing(cls, tmp_path):
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.Dense(2)])
    # Keras' Adam() moves the predictions by more than 1e-3 in a step; Adafactor's
    # relative step (lr x 0.1 from its un-debiased momentum x rms(w)) needs 0.1
    # for that. The checks below are Keras'.
    optimizer = cls() if cls is FloraAdam else cls(learning_rate=0.1)
    rng = np.random.default_rng(0)
    x, y = rng.random((1, 2)), rng.random((1, 2))
    model.compile(optimizer, "mse")
    model.train_on_batch(x, y)
    ref_pred = model.predict(x, verbose=0)
    checkpoint = tf.train.Checkpoint(model, optimizer=optimizer)
    save_path = checkpoint.save(os.path.join(tmp_path, "tf_ckpt"))
    model.train_on_batch(x, y)
    assert not np.allclose(model.predict(x, verbose=0), ref_pred, atol=1e-3)
    checkpoint.restore(save_path)
    close(model.predict(x, verbose=0), ref_pred, atol=1e-5)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.Variable: TF only")
@CLASSES
def test_mixed_with_tf_variables(cls):
    import tensorflow as tf

    v = keras.Variable([[1.0, 2.0], [3.0, 4.0]])
    grads = ops.convert_to_tensor([[1.0, 1.0], [1.0, 1.0]])
    tf_v = tf.Variable([[1.0, 2.0], [3.0, 4.0]])
    tf_grads = ops.convert_to_tensor([[1.0, 1.0], [1.0, 1.0]])
    optimizer = cls(learning_rate=1.0)
    optimizer.apply_gradients([(grads, v), (tf_grads, tf_v)])
    close(optimizer.iterations, 1)
    with pytest.warns(UserWarning, match="Gradients do not exist for variables"):
        optimizer.apply_gradients([(grads, v), (None, tf_v)])
    close(optimizer.iterations, 2)


@CLASSES
def test_optimizer_auto_naming(cls):
    keras.backend.clear_session()  # Keras' TestCase does it before every test
    base = {"FloraAdam": "flora_adam", "FloraAdafactor": "flora_adafactor"}[
        cls.__name__
    ]
    first, second = cls(), cls()
    assert (first.name, second.name) == (base, f"{base}_1")
    assert cls(name="my_flora").name == "my_flora"
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(second))
    assert restored.name == f"{base}_1"
    custom = keras.optimizers.serialize(cls(name="my_flora"))
    assert keras.optimizers.deserialize(custom).name == "my_flora"


# --------------------------------------------------------- adam_test / adamw_test


@pytest.mark.parametrize("weight_decay", [None, 0.008], ids=["adam", "adamw"])
def test_config(weight_decay):
    assert_serialization_round_trips(
        FloraAdam(learning_rate=0.5, beta_1=0.5, beta_2=0.67, epsilon=1e-5,
                  weight_decay=weight_decay)
    )  # fmt: skip


@pytest.mark.parametrize(
    ("weight_decay", "golden"),
    [(None, [0.5, 1.5, 2.5, 3.5]), (0.004, [0.4980, 1.4960, 2.494, 3.492])],
    ids=["adam", "adamw"],
)
def test_single_step(weight_decay, golden):
    optimizer = FloraAdam(learning_rate=0.5, weight_decay=weight_decay)
    variables = keras.Variable([1.0, 2.0, 3.0, 4.0])
    optimizer.apply_gradients(
        zip([ops.array([1.0, 6.0, 7.0, 2.0])], [variables], strict=True)
    )
    close(variables, golden, rtol=1e-4, atol=1e-4)


def test_weight_decay():
    grads, var1, var2, var3 = (
        ops.zeros(()),
        keras.Variable(2.0),
        keras.Variable(2.0, name="exclude"),
        keras.Variable(2.0),
    )
    FloraAdam(learning_rate=1.0, weight_decay=0.004).apply_gradients(
        zip([grads], [var1], strict=True)
    )
    optimizer_2 = FloraAdam(learning_rate=1.0, weight_decay=0.004)
    optimizer_2.exclude_from_weight_decay(var_names=["exclude"])
    optimizer_2.apply_gradients(zip([grads, grads], [var1, var2], strict=True))
    optimizer_3 = FloraAdam(learning_rate=1.0, weight_decay=0.004)
    optimizer_3.exclude_from_weight_decay(var_list=[var3])
    optimizer_3.apply_gradients(zip([grads, grads], [var1, var3], strict=True))
    assert float(value(var1)) == pytest.approx(1.9760959, abs=1.5e-6)
    assert float(value(var2)) == pytest.approx(2.0, abs=1.5e-6)
    assert float(value(var3)) == pytest.approx(2.0, abs=1.5e-6)


def test_adamw_correctness_with_golden():
    """Keras AdamW's golden numbers with epsilon=2: FloraAdam's epsilon is Keras'
    (added to sqrt(v) before the bias correction)."""
    optimizer = FloraAdam(learning_rate=1.0, weight_decay=0.5, epsilon=2)
    x = keras.Variable(np.ones([10], dtype="float32"))
    grads = ops.arange(0.1, 1.1, 0.1)
    first_grads = ops.full((10,), 0.01)
    golden = np.array(
        [[0.4998] * 10,
         [0.2486, 0.2475, 0.2463, 0.2451, 0.244, 0.2428, 0.2417, 0.2405, 0.2394, 0.2382],
         [0.1223, 0.1198, 0.1174, 0.1149, 0.1124, 0.11, 0.1075, 0.1051, 0.1027, 0.1003],
         [0.0586, 0.0549, 0.0512, 0.0475, 0.0439, 0.0402, 0.0366, 0.033, 0.0294, 0.0258],
         [0.0263, 0.0215, 0.0167, 0.012, 0.0073, 0.0026, -0.0021, -0.0067, -0.0113,
          -0.0159]]
    )  # fmt: skip
    optimizer.apply_gradients(zip([first_grads], [x], strict=True))
    for i in range(5):
        close(x, golden[i], rtol=5e-4, atol=5e-4)
        optimizer.apply_gradients(zip([grads], [x], strict=True))


def test_adam_ema():
    optimizer = FloraAdam(learning_rate=1.0, use_ema=True, ema_momentum=0.9)
    var = keras.Variable([1.0, 2.0], dtype="float32")
    grads = ops.array([0.1, 0.2], dtype="float32")
    optimizer.apply_gradients([(grads, var)])
    v1 = value(var)
    close(optimizer._model_variables_moving_average[0], v1)
    optimizer.apply_gradients([(grads, var)])
    v2 = value(var)
    expected_ema = 0.9 * v1 + 0.1 * v2
    close(optimizer._model_variables_moving_average[0], expected_ema)
    optimizer.finalize_variable_values([var])
    close(var, expected_ema)


def test_adam_ema_overwrite_frequency():
    optimizer = FloraAdam(
        learning_rate=1.0, use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=2
    )
    optimizer_no_ema = FloraAdam(learning_rate=1.0)
    var = keras.Variable([1.0, 2.0], dtype="float32")
    var_no_ema = keras.Variable([1.0, 2.0], dtype="float32")
    grads = ops.array([0.1, 0.2], dtype="float32")
    optimizer.apply_gradients([(grads, var)])
    optimizer_no_ema.apply_gradients([(grads, var_no_ema)])
    v1 = value(var_no_ema)
    close(var, v1)  # not overwritten yet
    optimizer.apply_gradients([(grads, var)])
    optimizer_no_ema.apply_gradients([(grads, var_no_ema)])
    expected_ema = 0.9 * v1 + 0.1 * value(var_no_ema)
    close(var, expected_ema)  # overwritten at the second step
    close(optimizer._model_variables_moving_average[0], expected_ema)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="IndexedSlices: TF only")
def test_clipnorm_indexed_slices():
    model = keras.Sequential(
        [keras.layers.Embedding(10, 4), keras.layers.Flatten(), keras.layers.Dense(2)]
    )
    model.compile(optimizer=FloraAdam(clipnorm=100), loss="mse")
    history = model.fit(ops.ones((8, 5)), ops.zeros((8, 2)), verbose=0)
    assert np.isfinite(history.history["loss"][0])


# --------------------------------------------------- loss_scale_optimizer_test.py

STATELESS = pytest.mark.parametrize(
    "stateless", [True, False], ids=["stateless", "stateful"]
)


def skip_for_stateless(stateless: bool) -> None:
    if not stateless and BACKEND == "jax":
        pytest.skip("LossScaleOptimizer must use stateless_apply with JAX.")
    if stateless and BACKEND == "tensorflow":
        pytest.skip("stateless_apply is not supported with the TF backend.")


def lso_apply(optimizer, grads, variables, stateless: bool) -> list:
    if stateless:
        optimizer.build(variables)
        new, _ = optimizer.stateless_apply(
            [v.value for v in optimizer.variables], grads, [v.value for v in variables]
        )
        return new
    optimizer.apply(grads, variables)
    return variables


def unscaled_step() -> np.ndarray:
    """FloraAdam(0.5)'s step on Keras' test gradients (its goldens are SGD's)."""
    grads = [ops.array([1.0, 6.0, 7.0, 2.0])]
    return applied(FloraAdam(learning_rate=0.5), grads, [[1.0, 2.0, 3.0, 4.0]])[0]


def test_lso_config():
    inner = FloraAdam(learning_rate=0.5, beta_1=0.06, weight_decay=0.004)
    assert_serialization_round_trips(LossScaleOptimizer(inner))


def test_lso_apply_with_no_vars():
    skip_for_stateless(False)
    optimizer = LossScaleOptimizer(FloraAdam(learning_rate=0.5))
    grads = [ops.array([1.0, 6.0, 7.0, 2.0]) * optimizer.initial_scale]
    variables = [keras.Variable([1.0, 2.0, 3.0, 4.0])]
    optimizer.build(variables)
    optimizer.apply(grads)
    close(variables[0], unscaled_step(), rtol=1e-4, atol=1e-4)


@STATELESS
@pytest.mark.parametrize("inner_scale", [None, 100], ids=["plain", "inner_loss_scale"])
def test_lso_finite_step(stateless, inner_scale):
    skip_for_stateless(stateless)
    inner = FloraAdam(learning_rate=0.5, loss_scale_factor=inner_scale)
    optimizer = LossScaleOptimizer(inner)
    grads = [ops.array([1.0, 6.0, 7.0, 2.0]) * optimizer.initial_scale]
    variables = [keras.Variable([1.0, 2.0, 3.0, 4.0])]
    variables = lso_apply(optimizer, grads, variables, stateless)
    close(variables[0], unscaled_step(), rtol=1e-4, atol=1e-4)


@STATELESS
def test_lso_infinite_step(stateless):
    skip_for_stateless(stateless)
    optimizer = LossScaleOptimizer(FloraAdam(learning_rate=0.5))
    grads = [ops.array([np.inf, np.inf, np.inf, np.inf])]
    variables = [keras.Variable([1.0, 2.0, 3.0, 4.0])]
    variables = lso_apply(optimizer, grads, variables, stateless)
    close(variables[0], [1.0, 2.0, 3.0, 4.0], rtol=1e-4, atol=1e-4)


@STATELESS
def test_lso_finite_step_with_overwrite(stateless):
    skip_for_stateless(stateless)
    optimizer = LossScaleOptimizer(FloraAdam(learning_rate=0.5))
    grads = [ops.array([1.0, 6.0, 7.0, 2.0])]
    variables = [keras.Variable([1.0, 2.0, 3.0, 4.0])]
    variables[0].overwrite_with_gradient = True
    variables = lso_apply(optimizer, grads, variables, stateless)
    close(variables[0], grads[0])


def _lso_loop(optimizer, grads, variables, steps: int, stateless: bool) -> None:
    optimizer.build(variables)
    values = [v.value for v in optimizer.variables]
    for _ in range(steps):
        if stateless:
            _, values = optimizer.stateless_apply(
                values, grads, [v.value for v in variables]
            )
            for ref, new in zip(optimizer.variables, values, strict=True):
                ref.assign(new)
        else:
            optimizer.apply(grads, variables)


@STATELESS
def test_lso_downscaling(stateless):
    skip_for_stateless(stateless)
    optimizer = LossScaleOptimizer(FloraAdam(learning_rate=0.5), initial_scale=400.0)
    variables = [keras.Variable([1.0, 2.0, 3.0, 4.0])]
    _lso_loop(optimizer, [ops.array([np.inf] * 4)], variables, 4, stateless)
    close(optimizer.scale_loss(1.0), 25.0)


@STATELESS
def test_lso_upscaling(stateless):
    skip_for_stateless(stateless)
    optimizer = LossScaleOptimizer(
        FloraAdam(learning_rate=0.5), initial_scale=2.0, dynamic_growth_steps=2
    )
    variables = [keras.Variable([1.0, 2.0, 3.0, 4.0])]
    _lso_loop(optimizer, [ops.array([1.0, 6.0, 7.0, 2.0])], variables, 8, stateless)
    close(optimizer.scale_loss(1.0), 32.0)


@STATELESS
def test_lso_iterations_update(stateless):
    skip_for_stateless(stateless)
    optimizer = LossScaleOptimizer(FloraAdam(learning_rate=0.5))
    variables = [keras.Variable([1.0, 2.0, 3.0, 4.0])]
    optimizer.build(variables)
    values = [v.value for v in optimizer.variables]
    grads = [ops.array([1.0, 6.0, 7.0, 2.0])]
    assert int(value(optimizer.iterations)) == 0
    for i in range(3):
        if stateless:
            _, values = optimizer.stateless_apply(
                values, grads, [v.value for v in variables]
            )
            for ref, new in zip(optimizer.variables, values, strict=True):
                ref.assign(new)
        else:
            optimizer.apply(grads, variables)
        assert int(value(optimizer.iterations)) == i + 1


def test_lso_serialization():
    optimizer = LossScaleOptimizer(
        FloraAdam(learning_rate=0.5), initial_scale=3.0, dynamic_growth_steps=2,
        name="test_opt",
    )  # fmt: skip
    config = optimizer.get_config()
    assert len(config) == 4
    assert config["name"] == "test_opt"
    assert config["initial_scale"] == 3.0
    assert config["dynamic_growth_steps"] == 2
    assert "inner_optimizer" in config
    restored = LossScaleOptimizer.from_config(config)
    assert type(restored.inner_optimizer) is FloraAdam


def test_lso_init_args():
    inner = FloraAdam(learning_rate=0.5)
    LossScaleOptimizer(inner, dynamic=True)
    with pytest.raises(ValueError, match="set `loss_scale_factor`"):
        LossScaleOptimizer(inner, dynamic=False)
    with pytest.raises(ValueError, match="arguments: `foo`, `bar`"):
        LossScaleOptimizer(inner, foo=True, bar=3)


@pytest.mark.parametrize(
    ("arg_name", "arg_value"),
    [("weight_decay", 0.5), ("clipnorm", 0.5), ("global_clipnorm", 0.5),
     ("clipvalue", 0.5), ("use_ema", True), ("ema_momentum", 0.5),
     ("ema_overwrite_frequency", 2), ("loss_scale_factor", 0.5),
     ("gradient_accumulation_steps", 2)],
)  # fmt: skip
def test_lso_init_base_optimizer_unsupported_args(arg_name, arg_value):
    with pytest.raises(ValueError, match="on the `inner_optimizer`"):
        LossScaleOptimizer(FloraAdam(learning_rate=0.5), **{arg_name: arg_value})


def test_lso_deserialization_backwards_compatibility():
    base = {
        "weight_decay": None, "clipnorm": None, "global_clipnorm": None,
        "clipvalue": None, "use_ema": False, "ema_momentum": 0.99,
        "ema_overwrite_frequency": None, "loss_scale_factor": None,
        "gradient_accumulation_steps": None,
    }  # fmt: skip
    inner = keras.optimizers.serialize(FloraAdam(learning_rate=0.5))
    config = {"name": "loss_scale_optimizer", **base, "inner_optimizer": inner,
              "initial_scale": 2.0, "dynamic_growth_steps": 2}  # fmt: skip
    restored = LossScaleOptimizer.from_config(config)
    assert type(restored.inner_optimizer) is FloraAdam
    assert float(restored.inner_optimizer.learning_rate) == 0.5
