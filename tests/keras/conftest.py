"""Fixtures of the flora_keras tests; helpers live in ``keras_testing``."""

from __future__ import annotations

import keras
import pytest


@pytest.fixture
def float32_policy():
    """Restore the global dtype policy after a test that changes it."""
    yield
    keras.config.set_dtype_policy("float32")
