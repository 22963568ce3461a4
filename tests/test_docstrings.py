"""The examples in the public API's docstrings run (pydantic-core tests/test_docstrings.py style)."""

from __future__ import annotations

import doctest
import importlib

import pytest


@pytest.mark.parametrize("module", ["theta_store", "theta_store.repo", "theta_store.reader", "theta_store.s3store"])
def test_docstring_examples(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
