"""prepare_data end to end, in process: packed rows hold exactly the selected rows' tokens and masks."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from sft_exp.config import to_run_config
from tests.conftest import compose


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from sft_exp.data.pipeline import prepare_data
    from sft_exp.train.model import build_tokenizer

    run = to_run_config(
        compose(["mixture.sources.sort.weight=1.5", "mixture.sources.units.weight=0.25", "packing.max_length=512"])
    )
    tok = build_tokenizer(run)
    cache = tmp_path_factory.mktemp("cache")
    return run, prepare_data(run, tok, cache), prepare_data(run, tok, cache)


def _sequences(ds) -> Counter:
    out = Counter()
    for row in ds:
        ids, mask, start = row["input_ids"], row["loss_mask"], 0
        for n in row["seq_lengths"]:
            out[(tuple(ids[start : start + n]), tuple(mask[start : start + n]))] += 1
            start += n
    return out


def test_packed_rows_are_exactly_the_selected_rows(prepared) -> None:
    from sft_exp.data.mixture import select_mixture

    run, data, _ = prepared
    m = run.mixture
    stats = data.stats.sources
    assert stats["sort"].rows == int(1.5 * 1568) and stats["units"].rows == int(0.25 * 1568)
    # the expected multiset of (ids, mask) sequences, rebuilt from the cached tokenised sources
    import datasets

    cache = Path(data.stats.cache["dir"])
    cached = {
        n: datasets.load_from_disk(str(next(p for p in cache.glob(f"{n}-*") if p.is_dir()))) for n in data.source_names
    }
    trained = {n: np.asarray(ds["trained"]) for n, ds in cached.items()}
    expected = Counter()
    sel = select_mixture(
        trained, {n: s.weight for n, s in m.sources.items()}, m.test_split_size, m.seed, m.weighting.value
    )
    for name in data.source_names:
        ds = cached[name]
        for r in sel[name].train.tolist():
            ids, mask = ds[r]["input_ids"], ds[r]["assistant_masks"]
            expected[(tuple(ids[:512]), tuple(mask[:512]))] += 1
    assert _sequences(data.train) == expected


def test_every_packed_row_fits_and_eval_sets_are_per_source(prepared) -> None:
    run, data, _ = prepared
    lens = [len(r) for r in data.train["input_ids"]]
    assert max(lens) <= 512 and data.stats.packing["bins"] == len(lens)
    assert set(data.eval) == set(data.source_names)
    for name, ds in data.eval.items():
        assert sum(sum(x) for x in ds["seq_lengths"]) == sum(len(x) for x in ds["input_ids"])
        assert sum(len(x) for x in ds["seq_lengths"]) == 32  # every held-out row of the source
        assert set(np.concatenate(ds["seq_sources"]).tolist()) == {data.source_names.index(name)}


def test_second_prepare_hits_the_cache_and_gives_the_same_rows(prepared) -> None:
    _, first, second = prepared
    assert first.stats.cache["misses"] == 6 and second.stats.cache["hits"] == 6
    assert first.train["input_ids"] == second.train["input_ids"]


def test_plain_messages_source_warns_and_takes_its_own_mode(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A source without chat_template_kwargs is rendered in the template's default mode, said in a warning naming
    its share of trained tokens; mixture.sources.<name>.enable_thinking chooses its mode instead (and is keyed). It
    mixes with sources that carry kwargs."""
    import json

    from sft_exp.config import ASSETS
    from sft_exp.data.pipeline import prepare_data
    from sft_exp.train.model import build_tokenizer

    plain = tmp_path / "units.jsonl"
    rows = [json.loads(line) for line in (ASSETS / "demo" / "units.jsonl").read_text().splitlines()]
    plain.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows))
    only = [f"mixture.sources.{n}.weight=0" for n in ("arith", "count", "reverse", "sort", "tools")]
    base = [*only, f"mixture.sources.units.path={plain}", "mixture.sources.units.columns=null"]

    def think_share(extra: list[str]) -> float:
        run = to_run_config(compose([*base, *extra]))
        data = prepare_data(run, build_tokenizer(run), tmp_path / "cache")
        return data.stats.sources["units"].think_share

    default = think_share([])  # the smollm3 template's default, think, except where a system prompt says /no_think
    out = capsys.readouterr().out
    assert "warning: units: its rows carry no chat_template_kwargs.enable_thinking" in out and "100.0%" in out
    no_think = think_share(["+mixture.sources.units.enable_thinking=false"])
    assert "warning: units" not in capsys.readouterr().out
    assert think_share(["+mixture.sources.units.enable_thinking=true"]) == default
    assert 0.0 < no_think < default  # only the rows whose system prompt carries /think stay in think mode
