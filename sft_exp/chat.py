"""Talk to a trained model from the terminal, with the run's chat template and reasoning modes.

    python -m sft_exp.chat outputs/runs/<date>/<time>                       # interactive (Ctrl-D or /exit ends)
    python -m sft_exp.chat <run> --no-think --prompt "Reverse the word 'melon'."   # one question, one answer
    python -m sft_exp.chat <run>/checkpoint-40 --think --system "You count letters carefully."

The conversation is rendered by the tokenizer saved with the model (the run's template) with
`add_generation_prompt=True` and the run's template defaults (date_string, enable_thinking), `--think` /
`--no-think` setting enable_thinking (a /think or /no_think flag in the system prompt still wins, as in the
template). Greedy decoding unless --temperature > 0; the reply stops at the end-of-turn token or --max-new-tokens.
In the interactive loop: /think and /no_think switch the mode, /reset starts a new conversation, /exit ends.
Replies are printed as generated, think block included; a reply cut by --max-new-tokens is marked on stderr.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sft_exp.errors import SftExpError


class Chat:
    """A conversation with a loaded model: `reply(text)` appends the user turn and the model's answer."""

    def __init__(
        self,
        run: Any,
        tokenizer: Any,
        model: Any,
        *,
        think: bool | None = None,
        system: str | None = None,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float = 1.0,
    ) -> None:
        from sft_exp.data.template import RenderSpec, row_kwargs

        self.tokenizer, self.model = tokenizer, model
        self.kwargs = row_kwargs(RenderSpec.build(run.template, tokenizer), None)
        if think is not None:
            self.kwargs["enable_thinking"] = think
        self.system = system
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        """Start a new conversation (the system prompt is kept)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def set_think(self, think: bool) -> None:
        self.kwargs["enable_thinking"] = think

    def reply(self, text: str) -> tuple[str, bool]:
        """Add a user turn, generate the assistant's, add it to the conversation.

        Returns:
            (the reply, special tokens and think block included; whether it ended with the end-of-turn token).
        """
        from sft_exp.eval.generate import generate

        self.messages.append({"role": "user", "content": text})
        prompt = self.tokenizer.apply_chat_template(
            self.messages, tokenize=False, add_generation_prompt=True, **self.kwargs
        )
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        sample = self.temperature > 0
        (g,) = generate(
            self.model,
            self.tokenizer,
            [list(ids)],
            self.max_new_tokens,
            1,
            do_sample=sample,
            temperature=self.temperature if sample else 1.0,
            top_p=self.top_p,
        )
        self.messages.append({"role": "assistant", "content": g.text})
        return g.text, g.stopped


def main(argv: list[str] | None = None) -> int:
    """The CLI (see the module docstring). Returns the exit code."""
    ap = argparse.ArgumentParser(
        prog="python -m sft_exp.chat",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    ap.add_argument("path", help="a run directory or one of its checkpoint-N folders")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--think", dest="think", action="store_true", default=None, help="reasoning mode /think")
    mode.add_argument("--no-think", dest="think", action="store_false", help="reasoning mode /no_think")
    ap.add_argument("--prompt", help="one user message: print the reply and exit")
    ap.add_argument("--system", help="a system prompt")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0 samples")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    a = ap.parse_args(argv)
    from pathlib import Path

    from sft_exp.eval.saved import load_trained

    try:
        run, tokenizer, model, _, model_dir = load_trained(Path(a.path), a.device)
    except (SftExpError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    chat = Chat(
        run,
        tokenizer,
        model,
        think=a.think,
        system=a.system,
        max_new_tokens=a.max_new_tokens,
        temperature=a.temperature,
        top_p=a.top_p,
    )

    def answer(text: str) -> None:
        reply, stopped = chat.reply(text)
        print(reply, flush=True)
        if not stopped:
            print(f"[cut at --max-new-tokens={a.max_new_tokens}: no end-of-turn token]", file=sys.stderr, flush=True)

    if a.prompt is not None:
        answer(a.prompt)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        mode_name = "/think" if chat.kwargs.get("enable_thinking", True) else "/no_think"
        print(f"chatting with {model_dir} ({mode_name}); /think, /no_think, /reset, /exit", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            chat.reset()
            continue
        if text in ("/think", "/no_think"):
            chat.set_think(text == "/think")
            continue
        answer(text)


if __name__ == "__main__":
    raise SystemExit(main())
