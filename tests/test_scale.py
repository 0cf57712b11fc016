"""Bounded memory at scale (issue 21): the packed sets hold only O(rows) integers and gather their tokens per access
from the memory-mapped cache, equal to packing the flattened sources in memory; the truncation report reads bounded
batches and finds the same."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from sft_exp.config import to_run_config
from tests.conftest import compose


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory):
    from sft_exp.data.pipeline import _pack, tokenize_source
    from sft_exp.data.template import RenderSpec
    from sft_exp.train.model import build_tokenizer

    run = to_run_config(compose(["packing.max_length=300"]))
    tok = build_tokenizer(run)
    spec = RenderSpec.build(run.template, tok)
    cache = tmp_path_factory.mktemp("cache")
    sources = [tokenize_source(n, run, spec, tok, cache) for n in ("reverse", "tools")]
    rng = np.random.default_rng(0)
    selections = [rng.integers(0, len(s.lengths), 700) for s in sources]  # repeats included, as weights > 1 give
    ds, _, _, rows = _pack(run, sources, selections)
    return run, sources, ds, rows


def _expected(sources, rows) -> list[dict[str, list[int]]]:
    """Every packed row built from the flattened (in-memory) sources, piece by piece."""
    out = []
    for r in range(len(rows)):
        ids, masks, lens, srcs = [], [], [], []
        for p in range(rows.row_offsets[r], rows.row_offsets[r + 1]):
            src = sources[rows.seq_source[p]]
            a = src.offsets[rows.seq_row[p]] + rows.start[p]
            ids += src.input_ids[a : a + rows.length[p]].tolist()
            masks += src.assistant_masks[a : a + rows.length[p]].tolist()
            lens.append(int(rows.length[p]))
            srcs.append(int(rows.seq_source[p]))
        out.append({"input_ids": ids, "loss_mask": masks, "seq_lengths": lens, "seq_sources": srcs})
    return out


def test_packed_set_is_gathered_per_access_and_equals_the_in_memory_packing(packed) -> None:
    _, sources, ds, rows = packed
    # the Arrow table holds one int64 per packed row: no token is held by the dataset
    assert ds.column_names == ["row"] and ds.data.nbytes == 8 * len(ds)
    # the token columns are zero-copy views of the memory-mapped cache, not copies
    assert all(not c[0].flags.owndata and not c[1].flags.owndata for s in sources for c in s.chunks)
    expected = _expected(sources, rows)
    assert len(ds) == len(expected) > 10
    assert [ds[i] for i in range(len(ds))] == expected  # row access
    assert ds.__getitems__([5, 0, 5, 3]) == [expected[i] for i in (5, 0, 5, 3)]  # a DataLoader batch
    assert ds["input_ids"] == [e["input_ids"] for e in expected]  # column access (tests, small sets)
    assert rows.trained_tokens(batch_tokens=257) == sum(sum(e["loss_mask"]) for e in expected)


def test_packed_rows_pickle_without_token_data(packed) -> None:
    _, sources, _, rows = packed
    blob = pickle.dumps(rows)
    assert len(blob) < 64 * 1024 + 100 * len(rows.length)  # the plan and cache paths, not the tokens
    back = pickle.loads(blob)  # a spawned DataLoader worker: maps the cache again
    batch = {"row": [0, len(rows) - 1]}
    assert back(batch) == rows(batch)


def test_truncation_report_in_small_batches_equals_one_batch(packed) -> None:
    from sft_exp.data.stats import truncation_report

    _, sources, _, _ = packed
    for src in sources:
        sel = np.arange(len(src.lengths))
        for max_length in (120, 200, 300):
            one = truncation_report(max_length, "truncate", src, sel)
            assert truncation_report(max_length, "truncate", src, sel, batch_tokens=64) == one


def test_bench_scale_generates_smoltalk_shaped_text(tmp_path: Path) -> None:
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("bench_scale", Path(__file__).parent.parent / "bench/bench_scale.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # type: ignore[union-attr]
    conf, n = bench.generate(tmp_path, 0.0002, 0.8, seed=0)
    files = sorted((tmp_path / "data").glob("*.jsonl"))
    assert len(files) == 25 and n == sum(len(f.read_text().splitlines()) for f in files)
    row = json.loads(files[0].read_text().splitlines()[0])
    words = " ".join(m["content"] for m in row["messages"]).split()
    assert len(set(words)) > 0.2 * len(words)  # varied words, not one repeated token
    assert (conf / "mixture" / "bench.yaml").read_text().count("path:") == 25
