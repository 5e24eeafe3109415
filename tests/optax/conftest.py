"""Fixtures of the flora_optax tests (helpers live in ``optax_testing``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from optax_testing import make_grads, make_params


@pytest.fixture
def params() -> dict[str, Any]:
    return make_params()


@pytest.fixture
def grads(params: dict[str, Any]) -> Callable[[int], list[Any]]:
    return lambda steps: make_grads(params, steps)
