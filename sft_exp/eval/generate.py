"""Generation-based evaluation: held-out rows -> prompts -> batched greedy generation -> scores per source and mode.

    GenerationEval.from_run(run, tokenizer)       the held-out prompts of every source, and their scorers
    GenerationEval.run(model, tokenizer, step)    generate + score -> the eval_generate.json dict
    metrics_block(results)                        -> the `eval_generate` block of metrics.json

Which rows: the held-out rows of each source, drawn exactly as the data pipeline draws them
(`sft_exp.data.mixture.split_heldout` over the source's valid rows, seeded by `mixture.seed` and the source's name,
before any weighting), so every run of a sweep generates for the same rows; the first `eval.generate.rows` of them
(in row order) are used.

Which turns (`eval.generate.turns`): ``all`` (default) makes every assistant turn of a row a prompt: the conversation
up to that turn, earlier assistant turns being the reference's (teacher forcing); ``last`` only the last assistant
turn. A multi-turn row thus gives several prompts; the turn counts are in the results. A prompt is rendered by the
run's chat template with `add_generation_prompt=True` and the row's own kwargs over the config's defaults
(`sft_exp.data.template.row_kwargs`: enable_thinking, date_string, xml_tools, ...), through the tokenizer's real
`apply_chat_template`. A turn's reasoning mode is the template's: a `/no_think` or `/think` flag in the system
prompt wins over the row's `enable_thinking`, which wins over `template.enable_thinking`.

Generation: prompts of every source together, sorted by length, in batches of `eval.generate.batch_size`, left
padded with an ordinary attention mask (never the packed, position-id masks of training), `model.generate` with its
KV cache, greedy unless asked otherwise, stopping at the tokenizer's end-of-turn token (`template.eos_token`, which
`build_tokenizer` makes the tokenizer's eos) or after `max_new_tokens`. A model trained with
`attn_implementation=varlen` (packed rows only) generates with sdpa, its attention switched back afterwards.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sft_exp.errors import ConfigError
from sft_exp.eval.scorers import Scorer, ScorerError, aggregate, compliance, flat_block, resolve_scorer

if TYPE_CHECKING:
    from sft_exp.config import RunConfig

RESULTS_FILE = "eval_generate.json"


# ---------------------------------------------------------------------------------------------------------- prompts
@dataclass
class Turn:
    """One prompt: a held-out row's conversation up to one of its assistant turns."""

    source: str
    row: int  # index of the row in the source as loaded
    turn: int  # which assistant turn of the row (0 = the first)
    think: bool  # the reasoning mode the template renders the turn in
    messages: list[dict[str, Any]]  # the prompt: every message before the turn
    reference: str  # the held-out assistant text of the turn
    record: dict[str, Any]  # the row as loaded (messages, chat_template_kwargs, ...)
    kwargs: dict[str, Any]  # template kwargs: the row's over the config's defaults

    @property
    def mode(self) -> str:
        return "think" if self.think else "no_think"


def turns_of(g: Any) -> str:
    """`eval.generate.turns` as a string ('all' or 'last'), whether given as the enum or a plain string."""
    return str(getattr(g.turns, "value", g.turns))


def think_mode(messages: list[dict[str, Any]], kwargs: dict[str, Any]) -> bool:
    """The reasoning mode the template renders a conversation in: a `/no_think` or `/think` flag in the system prompt
    wins, then `enable_thinking` (None or absent: think, as the smollm3 template)."""
    system = next((m.get("content") or "" for m in messages if m.get("role") == "system"), "")
    if "/no_think" in system:
        return False
    if "/think" in system:
        return True
    value = kwargs.get("enable_thinking")
    return True if value is None else bool(value)


def row_turns(source: str, index: int, record: dict[str, Any], defaults: Any, turns: str = "all") -> list[Turn]:
    """The prompts of one row.

    Args:
        source: the source's name.
        index: the row's index in the source.
        record: the row: `messages` (+ optional `chat_template_kwargs`).
        defaults: the RenderSpec whose defaults the row's kwargs go over (`sft_exp.data.template.row_kwargs`).
        turns: 'all' (every assistant turn) or 'last'.

    Returns:
        One Turn per assistant turn chosen, in order.
    """
    from sft_exp.data.sources import normalize_messages
    from sft_exp.data.template import row_kwargs

    messages = normalize_messages(record["messages"])
    kwargs = row_kwargs(defaults, record.get("chat_template_kwargs"))
    think = think_mode(messages, kwargs)
    at = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if turns == "last":
        at = at[-1:]
    n_before = {i: k for k, i in enumerate(i for i, m in enumerate(messages) if m.get("role") == "assistant")}
    return [
        Turn(source, index, n_before[i], think, messages[:i], str(messages[i].get("content") or ""), record, kwargs)
        for i in at
    ]


def heldout_rows(run: RunConfig, name: str, n: int | None) -> list[tuple[int, dict[str, Any]]]:
    """The first `n` held-out rows of a source (all of them when n is None), as (row index, row), in row order.

    The held-out set is the data pipeline's: `split_heldout` over the source's valid rows (with
    `mixture.on_bad_rows=drop`, the rows `row_problem` accepts; otherwise every row, since a bad row stops the run).

    Raises:
        ConfigError: the source has no held-out rows, or fewer than `n`.
    """
    from sft_exp.data.mixture import split_heldout
    from sft_exp.data.sources import load_source, row_problem

    m = run.mixture
    ds = load_source(name, m.sources[name])
    drop = getattr(m.on_bad_rows, "value", m.on_bad_rows) == "drop"
    valid = [i for i, msgs in enumerate(ds["messages"]) if row_problem(msgs) is None] if drop else range(len(ds))
    heldout, _ = split_heldout(len(valid), m.test_split_size, m.seed, name) if len(valid) > 1 else ([], None)
    if len(heldout) == 0:
        raise ConfigError(
            f"eval.generate: source '{name}' has no held-out rows (mixture.test_split_size={m.test_split_size}). "
            "Set mixture.test_split_size (e.g. 32) or eval.generate.enabled=false"
        )
    if n is not None and n > len(heldout):
        raise ConfigError(
            f"eval.generate.rows: {n} rows asked for, but source '{name}' holds out {len(heldout)}. "
            f"Use eval.generate.rows<={len(heldout)} or raise mixture.test_split_size"
        )
    chosen = [int(valid[int(i)]) for i in (heldout if n is None else heldout[:n])]
    return list(zip(chosen, ds.select(chosen).to_list()))


def file_rows(path: str, n: int | None, name: str) -> list[tuple[int, dict[str, Any]]]:
    """The first `n` valid rows of a conversation file or folder (any source format), for `sft_exp.evaluate --data`."""
    from sft_exp.config import SourceConfig
    from sft_exp.data.sources import load_source, row_problem

    ds = load_source(name, SourceConfig(path=path))
    out = []
    for i, row in enumerate(ds):
        if row_problem(row["messages"]) is None:
            out.append((i, row))
            if n is not None and len(out) == n:
                break
    if not out:
        raise ConfigError(f"--data {path}: no valid conversation rows")
    return out


# ------------------------------------------------------------------------------------------------------ generating
@dataclass
class Generation:
    """What the model wrote for one prompt."""

    text: str  # decoded, special tokens kept, the end-of-turn token (and what follows it) removed
    new_tokens: int  # generated tokens, the end-of-turn token included
    stopped: bool  # the end-of-turn token came within max_new_tokens


@contextlib.contextmanager
def generation_mode(model: Any) -> Iterator[Any]:
    """The model in eval mode, with an attention implementation that takes padding masks and a KV cache (varlen,
    which only takes packed rows, is switched to sdpa); everything restored afterwards. Yields the model."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    switch = impl == "varlen"
    was_training = model.training
    model.eval()
    if switch:
        model.set_attn_implementation("sdpa")
    try:
        yield model
    finally:
        if switch:
            model.set_attn_implementation(impl)
        model.train(was_training)


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The end-of-turn token id(s) generation stops at: the tokenizer's eos (the template's end-of-turn token)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("template.eos_token: the tokenizer has no end-of-turn (eos) token to stop generation at")
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int = 64,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> list[Generation]:
    """Batched generation with a KV cache: left padding, an ordinary attention mask, stop at the end-of-turn token.

    Args:
        model: a causal LM (transformers or peft), unwrapped from DDP; its device is used.
        tokenizer: the run's tokenizer (its eos is the stop token, its pad the padding).
        prompts: token ids per prompt (a rendered prompt, generation prompt included).
        max_new_tokens: generated tokens per prompt at most, the end-of-turn token included.
        batch_size: prompts per `generate` call (prompts are sorted by length first, so batches pad little).
        do_sample, temperature, top_p: sampling instead of greedy decoding (`sft_exp.chat`).

    Returns:
        One Generation per prompt, in the order of `prompts`.
    """
    import torch
    from transformers import GenerationConfig

    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = next(model.parameters()).device
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        num_beams=1,
        eos_token_id=stops,
        pad_token_id=pad,
        use_cache=True,
        **({"temperature": temperature, "top_p": top_p} if do_sample else {}),
    )
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[Generation | None] = [None] * len(prompts)
    with generation_mode(model):
        for b in range(0, len(order), max(1, batch_size)):
            idx = order[b : b + batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                p = prompts[i]
                ids[r, width - len(p) :] = torch.as_tensor(p, dtype=torch.long)
                mask[r, width - len(p) :] = 1
            # no_grad, not inference_mode: under ZeRO-3 the parameters gathered for generation would become
            # inference tensors, and the next training step's backward refuses them
            with torch.no_grad():
                seq = model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_config
                )
            new = seq[:, width:].cpu().tolist()
            for r, i in enumerate(idx):
                toks = new[r]
                end = next((j for j, t in enumerate(toks) if t in stops), None)
                body = toks if end is None else toks[:end]
                out[i] = Generation(
                    tokenizer.decode(body, skip_special_tokens=False),
                    len(toks) if end is None else end + 1,
                    end is not None,
                )
    return [g for g in out if g is not None]


# ------------------------------------------------------------------------------------------------------ evaluating
@dataclass
class SourcePrompts:
    """A source's prompts and how they are scored."""

    name: str
    scorer: Scorer
    rows: int
    turns: list[Turn] = field(default_factory=list)


class GenerationEval:
    """The prompts of every source (built once) and a `run` that generates and scores them with a given model."""

    def __init__(
        self,
        sources: list[SourcePrompts],
        max_new_tokens: int = 128,
        batch_size: int = 64,
        samples: int = 3,
        turns: str = "all",
    ) -> None:
        self.sources = sources
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.samples = samples
        self.turns = turns
        self._ids: list[list[int]] | None = None

    @classmethod
    def from_run(
        cls,
        run: RunConfig,
        tokenizer: Any,
        *,
        rows: int | None = None,
        sources: list[str] | None = None,
        extra: dict[str, tuple[str, Scorer]] | None = None,
    ) -> GenerationEval:
        """The generation eval a run's config asks for (`eval.generate.*`, `mixture.sources.<name>.scorer`).

        Args:
            run: the run's config.
            tokenizer: the run's tokenizer (`build_tokenizer`, or the one saved in the run directory).
            rows: rows per source instead of `eval.generate.rows` (`sft_exp.evaluate --rows`; 0: every held-out row).
            sources: only these sources of the mixture (None: every one; [] none, with `extra` only).
            extra: more sources from files, name -> (path, scorer): their first `rows` valid rows are the prompts.

        Raises:
            ConfigError: an unknown scorer or bad scorer args, a source without held-out rows or with fewer than
                `rows`, an unknown source name.
        """
        from sft_exp.data.template import RenderSpec

        g = run.eval.generate
        n = g.rows if rows is None else (rows or None)
        spec = RenderSpec.build(run.template, tokenizer)
        names = sorted(run.mixture.sources) if sources is None else list(sources)
        out = []
        for name in names:
            if name not in run.mixture.sources:
                known = sorted(run.mixture.sources)
                raise ConfigError(f"source '{name}' is not in the run's mixture. Use one of {known}")
            sc = run.mixture.sources[name]
            scorer = resolve_scorer(sc.scorer, dict(sc.scorer_args or {}), f"mixture.sources.{name}")
            picked = heldout_rows(run, name, n)
            turns = [t for i, rec in picked for t in row_turns(name, i, rec, spec, turns_of(g))]
            out.append(SourcePrompts(name, scorer, len(picked), turns))
        for name, (path, scorer) in (extra or {}).items():
            picked = file_rows(path, n, name)
            turns = [t for i, rec in picked for t in row_turns(name, i, rec, spec, turns_of(g))]
            out.append(SourcePrompts(name, scorer, len(picked), turns))
        return cls(out, g.max_new_tokens, g.batch_size, g.samples, turns_of(g))

    def prompt_ids(self, tokenizer: Any) -> list[list[int]]:
        """Every prompt rendered by the tokenizer's chat template (generation prompt on) and tokenised; cached."""
        if self._ids is None:
            texts = [
                tokenizer.apply_chat_template(t.messages, tokenize=False, add_generation_prompt=True, **t.kwargs)
                for s in self.sources
                for t in s.turns
            ]
            enc = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
            self._ids = [list(x) for x in enc]
        return self._ids

    def run(self, model: Any, tokenizer: Any, *, step: int | None = None, label: str = "end") -> dict[str, Any]:
        """Generate for every prompt and score each source.

        Args:
            model: the (unwrapped) model to evaluate; left in the mode it was in.
            tokenizer: the run's tokenizer.
            step: the optimizer step the model is at (recorded).
            label: 'before' (eval_before_train), 'step' (eval.generate.when=steps) or 'end'.

        Returns:
            The results (the content of eval_generate.json): per source its scorer, rows, turns per mode, metrics
            (`aggregate`), samples (every turn of the first `samples` rows) and `error` (a ScorerError message, or
            None); `all` (the `metrics_block` entry); timing. A failing scorer does not raise here: its source's
            `error` is set and `errors` lists it, so the caller can save everything before it reports the failure
            (`raise_first_error`).
        """
        t0 = time.perf_counter()
        ids = self.prompt_ids(tokenizer)
        gens = generate(model, tokenizer, ids, self.max_new_tokens, self.batch_size)
        seconds = time.perf_counter() - t0
        control = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
        results: dict[str, Any] = {
            "label": label,
            "step": step,
            "max_new_tokens": self.max_new_tokens,
            "turns": self.turns,
            "prompts": len(ids),
            "generate_seconds": round(seconds, 3),
            "new_tokens": sum(g.new_tokens for g in gens),
            "sources": {},
            "errors": [],
        }
        k = 0
        for src in self.sources:
            records: list[tuple[str, dict[str, float | None]]] = []
            samples = []
            sample_rows = sorted({t.row for t in src.turns})[: self.samples]
            error = None
            for t in src.turns:
                g = gens[k]
                k += 1
                scores: dict[str, float | None] = dict(compliance(g.text, g.stopped, g.new_tokens, t.think, control))
                if error is None:
                    where = f"source {src.name}, row {t.row}, turn {t.turn}"
                    try:
                        scores.update(src.scorer(t.messages, t.reference, g.text, t.record, where))
                    except ScorerError as e:
                        error = f"mixture.sources.{src.name}.scorer: {e}"
                records.append((t.mode, scores))
                if t.row in sample_rows:
                    samples.append(
                        {
                            "row": t.row,
                            "turn": t.turn,
                            "mode": t.mode,
                            "prompt": t.messages,
                            "reference": t.reference,
                            "generation": g.text,
                            "stopped": g.stopped,
                            "scores": scores,
                        }
                    )
            if error is not None:
                results["errors"].append(error)
            results["sources"][src.name] = {
                "scorer": src.scorer.name,
                "scorer_args": src.scorer.args,
                "rows": src.rows,
                "turns": {
                    "all": len(src.turns),
                    "think": sum(t.think for t in src.turns),
                    "no_think": sum(not t.think for t in src.turns),
                },
                "metrics": aggregate(records),
                "directions": {m: src.scorer.direction(m) for m in aggregate(records)},
                "error": error,
                "samples": samples,
            }
        results["seconds"] = round(time.perf_counter() - t0, 3)
        results["all"] = metrics_block(results)["all"]
        results["sources"] = results.pop("sources")  # the long per-source part last
        return results


# --------------------------------------------------------------------------------------------------------- outputs
def metrics_block(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The `eval_generate` block of metrics.json from a `GenerationEval.run` result: source -> metric -> value
    (`metric/think`, `metric/no_think` per mode), plus `all` (see `sft_exp.eval.scorers.flat_block`)."""
    return flat_block({name: s["metrics"] for name, s in results["sources"].items()})


def format_table(results: dict[str, Any]) -> str:
    """The printed summary of one evaluation: a row per source (its main score, mode compliance, think / no_think
    split of think_ok), then `all`."""
    cols = ["score", "stops", "think_ok", "think_ok/think", "think_ok/no_think", "role_leak", "mean_new_tokens"]
    block = metrics_block(results)
    head = ["source", "scorer", "turns", *cols]
    body = []
    for name, src in results["sources"].items():
        row = [name, src["scorer"], str(src["turns"]["all"])]
        body.append(row + [_fmt(block[name].get(c)) for c in cols])
    body.append(["all", "", str(results["prompts"]), *[_fmt(block["all"].get(c)) for c in cols]])
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    step = "" if results.get("step") is None else f", step {results['step']}"
    title = (
        f"generation eval ({results.get('label')}{step}): {results['prompts']} turns, "
        f"{results['new_tokens']} new tokens, {results['generate_seconds']:.1f} s"
    )
    return "\n".join([title, fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)])


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3f}"


def raise_first_error(results: dict[str, Any]) -> None:
    """Raise the first scorer failure of a result as a ScorerError (after the caller has saved what it must)."""
    if results.get("errors"):
        raise ScorerError(results["errors"][0])


def write_results(path: Path, results: dict[str, Any], history: list[dict[str, Any]] | None = None) -> None:
    """Write eval_generate.json atomically: the final results, plus `history` (earlier evaluations of the run:
    before training and every `when=steps` evaluation, each with its step and `all` / per-source blocks)."""
    import os

    data = dict(results)
    if history:
        data["history"] = history
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def history_entry(results: dict[str, Any]) -> dict[str, Any]:
    """A compact record of one evaluation for eval_generate.json's history: label, step, metrics block."""
    return {"label": results["label"], "step": results["step"], "metrics": metrics_block(results)}


def log_scalars(results: dict[str, Any], prefix: str = "gen") -> dict[str, float]:
    """Flat scalars for trackers and the Trainer's log: `gen/<source or all>/<metric>[/<mode>]` -> value."""
    return {
        f"{prefix}/{src}/{metric}": float(v)
        for src, metrics in metrics_block(results).items()
        for metric, v in metrics.items()
        if v is not None
    }
