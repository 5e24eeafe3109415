"""The examples in flora_optax's docstrings run (doctest)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["flora_optax", "flora_optax.alias", "flora_optax.momentum",
           "flora_optax.accumulation", "flora_optax.checkpoint"]  # fmt: skip


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_run(module: str) -> None:
    result = doctest.testmod(
        importlib.import_module(module), optionflags=doctest.ELLIPSIS
    )
    assert result.attempted > 0
    assert result.failed == 0
