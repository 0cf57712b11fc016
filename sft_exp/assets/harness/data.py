"""Loaders of the shipped demo tasks: the jsonl files beside this module, whatever the working directory.

Your own offline task needs no such module: `dataset_path: json` with `dataset_kwargs: {data_files: {test:
/abs/path/rows.jsonl}}` in its YAML (see README.md in this folder). A relative data_files path is relative to the
directory the run starts in, which is why the shipped tasks load through these functions instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

HERE = Path(__file__).parent


def _jsonl(name: str) -> Any:
    import datasets

    return datasets.DatasetDict({"test": datasets.load_dataset("json", data_files=str(HERE / name), split="train")})


def count(**_: Any) -> Any:
    """sftexp_count's rows: question, answer."""
    return _jsonl("count.jsonl")


def arith_mc(**_: Any) -> Any:
    """sftexp_arith_mc's rows: question, choices, label."""
    return _jsonl("arith_mc.jsonl")
