"""The runnable examples in the public data and training docstrings are true (doctest)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "sft_exp.data.mixture",
    "sft_exp.data.packing",
    "sft_exp.data.template",
    "sft_exp.train.collator",
    "sft_exp.train.sft_config",
    "sft_exp.rundir",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0, result
