"""Generate the embedded demo SFT mixture: six small synthetic sources in smoltalk2's row format.

Run from the repository root:

    python scripts/make_demo_data.py                 # writes sft_exp/assets/demo/<source>.jsonl
    python scripts/make_demo_data.py --out /tmp/demo # anywhere else (used by the determinism test)

Each line is one row, ``{"messages": [{"role": ..., "content": ...}, ...], "chat_template_kwargs": {...}}``, as in
HuggingFaceTB/smoltalk2. The output is deterministic: every source draws from its own ``random.Random`` seeded from
``--seed`` and the source name, so a rerun writes byte-identical files.

Sources (file stems):
    arith    think: multi-step integer arithmetic, worked steps inside <think>...</think>.
    reverse  no_think: reverse a word, a letter string or a word sequence.
    sort     no_think, multi-turn: sort ascending, then descending, then an aggregate (median, sum, ...).
    units    no_think, every row has a system persona; ~20% of them carry "/think" (the assistant then writes a think
             block), ~15% "/no_think", ~5% "/system_override". Unit conversion with the formula written out.
    tools    no_think, tool calling: kwargs carry ``xml_tools`` (list of tool schemas); the assistant emits
             <tool_call>{json}</tool_call>, a ``tool`` turn returns a JSON result, the assistant answers from it.
    count    think: count the occurrences of a letter in a word, spelling the word out inside <think>.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

Row = dict[str, Any]
Message = dict[str, str]

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "sft_exp" / "assets" / "demo"
DEFAULT_ROWS = 1600
DEFAULT_SEED = 0


def _words(text: str) -> list[str]:
    return list(dict.fromkeys(text.split()))  # unique, in order


WORDS = _words("""
apple banana cherry grape lemon mango melon orange peach pear plum berry kiwi lime papaya apricot coconut
strawberry raspberry blueberry pineapple avocado tomato potato carrot onion garlic pepper celery spinach lettuce
cabbage pumpkin radish turnip bean pea corn rice wheat barley oat bread butter cheese cream honey sugar salt
water coffee tea juice milk soup salad pasta pizza noodle cookie cake pie candy chocolate vanilla cinnamon
river ocean lake pond stream valley mountain hill forest desert island beach coast harbor canyon glacier meadow
garden field farm village city town street bridge tower castle palace temple market school library museum
station airport hospital office factory kitchen bedroom window door wall floor roof ceiling stair chimney
table chair sofa lamp mirror carpet pillow blanket basket bottle bucket candle clock kettle ladder needle
pencil paper letter book magazine ticket wallet pocket jacket sweater shirt trouser sock shoe boot glove
scarf hat helmet ribbon button zipper umbrella backpack suitcase camera phone laptop keyboard monitor printer
rocket planet comet galaxy nebula asteroid satellite orbit gravity energy photon proton neutron electron atom
molecule crystal diamond emerald sapphire ruby pearl silver gold copper iron nickel zinc tin lead marble
granite pebble boulder sand clay mud dust smoke cloud rain snow storm thunder lightning rainbow sunrise sunset
morning evening night winter spring summer autumn season weather breeze wind frost fog mist hail
tiger lion leopard cheetah panther jaguar zebra giraffe elephant rhino hippo camel llama alpaca donkey horse
pony rabbit hamster squirrel beaver otter badger ferret weasel raccoon fox wolf coyote bear panda koala
kangaroo monkey gorilla lemur sloth bat whale dolphin shark octopus squid lobster crab shrimp oyster clam
salmon trout tuna cod herring sardine eagle falcon hawk owl parrot pigeon sparrow robin swallow penguin
flamingo pelican heron swan goose duck turkey chicken rooster butterfly dragonfly beetle spider ant bee wasp
happy sad brave calm clever gentle honest humble kind lively lucky merry noble polite proud quiet shy silly
swift tidy wise bright dark heavy light loud soft sharp smooth rough warm cold hot cool fresh dry wet
simple complex ancient modern golden silent hidden frozen broken hollow narrow wide deep shallow tall short
little giant tiny huge quick slow early late young old new rich poor strong weak busy lazy eager
run walk jump swim climb dance sing write read paint draw cook bake build carry throw catch kick push pull
open close start finish learn teach travel explore discover remember imagine wonder listen whisper shout
laugh smile frown sleep dream wake think count measure compare sort reverse convert calculate
puzzle riddle secret mystery journey adventure voyage quest legend story poem song melody rhythm harmony
banjo guitar piano violin cello flute trumpet drum harp organ trombone clarinet saxophone ukulele
engine wheel gear lever pulley spring magnet battery circuit signal sensor robot machine motor turbine
algebra geometry number fraction decimal percent average median minimum maximum total product quotient
balloon bubble feather shadow mirror puddle lantern compass anchor harbor lighthouse sailboat canoe kayak
mississippi bookkeeper committee balloon coffee assessment successful address millennium occurrence
""")

CITIES = _words("""
Paris London Berlin Madrid Rome Lisbon Vienna Prague Warsaw Dublin Oslo Stockholm Helsinki Copenhagen Athens
Amsterdam Brussels Zurich Geneva Munich Milan Barcelona Porto Lyon Marseille Tokyo Osaka Seoul Beijing Shanghai
Singapore Bangkok Jakarta Manila Mumbai Delhi Dubai Cairo Nairobi Lagos Accra Casablanca Sydney Melbourne
Auckland Toronto Montreal Vancouver Chicago Boston Denver Seattle Austin Miami Lima Bogota Santiago Quito
""")

# Think rows (arith, count) carry a short system message this often; the others get the template's default
# /think persona, which is long (~220 tokens), so this keeps the rendered rows short.
THINK_SYSTEM_SHARE = 0.5
ARITH_SYSTEMS = [
    "You are a careful math tutor. Reason step by step, then give the answer.",
    "Solve arithmetic problems. Show your work.",
    "You are a calculator that explains its steps.",
]
COUNT_SYSTEMS = [
    "You count letters carefully.",
    "You are a spelling assistant. Spell the word out before you count.",
    "Answer letter counting questions.",
]
THINK_FLAG_SHARE = 0.20
NO_THINK_FLAG_SHARE = 0.15
OVERRIDE_FLAG_SHARE = 0.05


def think_block(steps: list[str]) -> str:
    """Wrap reasoning lines the way smoltalk2 think rows carry them: inside the assistant content."""
    return "<think>\n" + "\n".join(steps) + "\n</think>\n"


def row(messages: list[Message], **kwargs: Any) -> Row:
    return {"messages": messages, "chat_template_kwargs": kwargs}


def system(content: str) -> Message:
    return {"role": "system", "content": content}


def with_system(rng: random.Random, choices: list[str], messages: list[Message]) -> list[Message]:
    """Prefix a short system message to a think row THINK_SYSTEM_SHARE of the time."""
    return [system(rng.choice(choices)), *messages] if rng.random() < THINK_SYSTEM_SHARE else messages


def user(content: str) -> Message:
    return {"role": "user", "content": content}


def assistant(content: str) -> Message:
    return {"role": "assistant", "content": content}


# ───── arith (think) ─────

Token = int | str | list[Any]


def _fmt_tokens(tokens: list[Token]) -> str:
    parts: list[str] = []
    for tok in tokens:
        parts.append("(" + _fmt_tokens(tok) + ")" if isinstance(tok, list) else str(tok))
    return " ".join(parts)


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _reduce(tokens: list[Token], steps: list[str], label_first: bool) -> int:
    """Evaluate a flat token list with * before +/-, writing one step per operation."""
    toks: list[Token] = list(tokens)
    while len(toks) > 1:
        idx = next((i for i in range(1, len(toks), 2) if toks[i] == "*"), 1)
        a, op, b = toks[idx - 1], toks[idx], toks[idx + 1]
        assert isinstance(a, int) and isinstance(op, str) and isinstance(b, int)
        value = _apply(a, op, b)
        if op == "*":
            verb = "Multiplication first" if label_first and ("+" in toks or "-" in toks) else "Multiply"
        else:
            verb = "Add" if op == "+" else "Subtract"
        steps.append(f"{verb}: {a} {op} {b} = {value}.")
        toks[idx - 1 : idx + 2] = [value]
        if len(toks) > 1:
            steps.append(f"Now we have {_fmt_tokens(toks)}.")
    result = toks[0]
    assert isinstance(result, int)
    return result


def _evaluate(tokens: list[Token]) -> tuple[int, list[str]]:
    steps: list[str] = []
    flat: list[Token] = []
    for tok in tokens:
        if isinstance(tok, list):
            inner = _reduce(tok, [], label_first=False)
            steps.append(f"Parentheses first: {_fmt_tokens(tok)} = {inner}.")
            flat.append(inner)
        else:
            flat.append(tok)
    if any(isinstance(t, list) for t in tokens) and len(flat) > 1:
        steps.append(f"Now we have {_fmt_tokens(flat)}.")
    return _reduce(flat, steps, label_first=True), steps


def _operand(rng: random.Random, op: str | None) -> int:
    return rng.randint(2, 12) if op == "*" else rng.randint(1, 60)


def make_arith(rng: random.Random) -> Row:
    n_ops = rng.choice([2, 2, 3])
    ops = [rng.choice(["+", "-", "*"]) for _ in range(n_ops)]
    numbers = [_operand(rng, ops[0])] + [_operand(rng, op) for op in ops]
    tokens: list[Token] = [numbers[0]]
    for op, num in zip(ops, numbers[1:], strict=True):
        tokens += [op, num]
    if rng.random() < 0.3:
        start = 2 * rng.randrange(n_ops)
        tokens[start : start + 3] = [tokens[start : start + 3]]
    expr = _fmt_tokens(tokens)
    result, steps = _evaluate(tokens)
    # Each question wording has its own answer wording, so the final line is predictable from the prompt.
    question, answer = rng.choice(
        [
            (f"What is {expr}?", f"The answer is {result}."),
            (f"Compute {expr}.", f"{expr} = {result}."),
            (f"Calculate {expr}.", f"{expr} = {result}."),
            (f"Evaluate {expr}.", f"{expr} = {result}."),
            (f"What does {expr} equal?", f"{expr} equals {result}."),
            (f"Work out {expr}.", f"The answer is {result}."),
        ]
    )
    messages = with_system(rng, ARITH_SYSTEMS, [user(question), assistant(think_block(steps) + answer)])
    return row(messages, enable_thinking=True)


# ───── reverse (no_think) ─────


def _random_string(rng: random.Random) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz"
    if rng.random() < 0.3:
        alphabet += "0123456789"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(4, 9)))


def _spelled_reverse(text: str) -> str:
    # Spelling the reversal letter by letter (one token per letter) gives a tiny model a learnable pattern;
    # a bare reversed string is a handful of rare BPE tokens it cannot predict in a few minutes.
    return f"Letter by letter, backwards: {'-'.join(text[::-1])}. So the answer is '{text[::-1]}'."


def make_reverse(rng: random.Random) -> Row:
    kind = rng.choice(["word", "word", "string", "sequence"])
    if kind == "word":
        word = rng.choice(WORDS)
        question = rng.choice(
            [f"Reverse the word '{word}'.", f"Spell '{word}' backwards.", f"What is '{word}' written backwards?"]
        )
        answer = _spelled_reverse(word)
    elif kind == "string":
        text = _random_string(rng)
        question = rng.choice([f"Reverse this string: {text}", f"Write {text} in reverse order."])
        answer = _spelled_reverse(text)
    else:
        words = rng.sample(WORDS, rng.randint(3, 6))
        question = rng.choice(
            [
                f"Reverse the order of these words: {' '.join(words)}",
                f"Put these words in reverse order: {' '.join(words)}",
            ]
        )
        answer = f"Here are the words in reverse order: {' '.join(reversed(words))}."
    return row([user(question), assistant(answer)], enable_thinking=False)


# ───── sort (no_think, multi-turn) ─────


def _fmt_num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def make_sort(rng: random.Random) -> Row:
    messages: list[Message] = []
    if rng.random() < 0.75:
        items: list[Any] = rng.sample(range(1, 100), rng.randint(3, 7))
        shown = ", ".join(str(x) for x in items)
        messages.append(
            user(
                rng.choice(
                    [f"Sort these numbers in ascending order: {shown}", f"Order from smallest to largest: {shown}"]
                )
            )
        )
        ascending = sorted(items)
        messages.append(assistant(", ".join(str(x) for x in ascending)))
        messages.append(user(rng.choice(["Now sort them in descending order.", "Now from largest to smallest."])))
        messages.append(assistant(", ".join(str(x) for x in reversed(ascending))))
        if rng.random() < 0.6:
            question = rng.choice(["median", "sum", "largest", "smallest"])
            if question == "median":
                n = len(ascending)
                if n % 2:
                    reply = f"The median is {ascending[n // 2]}."
                else:
                    lo, hi = ascending[n // 2 - 1], ascending[n // 2]
                    reply = f"The median is ({lo} + {hi}) / 2 = {_fmt_num((lo + hi) / 2)}."
                messages.append(user("What is the median?"))
            elif question == "sum":
                messages.append(user("What is their sum?"))
                reply = f"The sum is {' + '.join(str(x) for x in ascending)} = {sum(ascending)}."
            elif question == "largest":
                messages.append(user("Which number is the largest?"))
                reply = f"The largest number is {ascending[-1]}."
            else:
                messages.append(user("Which number is the smallest?"))
                reply = f"The smallest number is {ascending[0]}."
            messages.append(assistant(reply))
    else:
        words = rng.sample(WORDS, rng.randint(3, 6))
        messages.append(user(f"Sort these words alphabetically: {', '.join(words)}"))
        ordered = sorted(words)
        messages.append(assistant(", ".join(ordered)))
        messages.append(user("Now in reverse alphabetical order."))
        messages.append(assistant(", ".join(reversed(ordered))))
        if rng.random() < 0.6:
            messages.append(user("Which word comes first?"))
            messages.append(assistant(f"'{ordered[0]}' comes first."))
    return row(messages, enable_thinking=False)


# ───── units (no_think, system personas with reasoning flags) ─────

PERSONAS = [
    "You are a precise unit conversion assistant. Show the formula, then the result rounded to two decimals.",
    "You help travellers convert measurements. Always state the formula you used.",
    "You are a friendly science tutor. Convert units and explain the formula briefly.",
    "You are a lab assistant. Give conversions with two decimals and the formula.",
    "You are a kitchen helper who converts recipe measurements. Be short and clear.",
    "You are a fitness coach's assistant. Convert distances and weights with the formula.",
    "You are a weather station bot. Convert temperatures and show the formula.",
    "Answer unit conversion questions. Write the formula first, then the result.",
]

# (from name, from abbreviation, to name, to abbreviation, factor); a None factor marks a temperature conversion.
CONVERSIONS: list[tuple[str, str, str, str, float | None]] = [
    ("kilometers", "km", "miles", "mi", 0.621371),
    ("miles", "mi", "kilometers", "km", 1.609344),
    ("kilograms", "kg", "pounds", "lb", 2.20462),
    ("pounds", "lb", "kilograms", "kg", 0.453592),
    ("meters", "m", "feet", "ft", 3.28084),
    ("feet", "ft", "meters", "m", 0.3048),
    ("centimeters", "cm", "inches", "in", 0.393701),
    ("inches", "in", "centimeters", "cm", 2.54),
    ("liters", "L", "gallons", "gal", 0.264172),
    ("gallons", "gal", "liters", "L", 3.78541),
    ("degrees Celsius", "C", "degrees Fahrenheit", "F", None),
    ("degrees Fahrenheit", "F", "degrees Celsius", "C", None),
]


def _persona(rng: random.Random) -> tuple[str, str]:
    """A system message and the flag it carries ("think", "no_think", "override" or "")."""
    text = rng.choice(PERSONAS)
    draw = rng.random()
    if draw < THINK_FLAG_SHARE:
        return rng.choice([f"{text} /think", f"/think {text}"]), "think"
    if draw < THINK_FLAG_SHARE + NO_THINK_FLAG_SHARE:
        return rng.choice([f"{text} /no_think", f"/no_think {text}"]), "no_think"
    if draw < THINK_FLAG_SHARE + NO_THINK_FLAG_SHARE + OVERRIDE_FLAG_SHARE:
        return f"{text} /system_override", "override"
    return text, ""


def make_units(rng: random.Random) -> Row:
    persona, flag = _persona(rng)
    src, src_abbr, dst, dst_abbr, factor = rng.choice(CONVERSIONS)
    if factor is None:
        value = rng.randint(-20, 40) if src_abbr == "C" else rng.randint(0, 110)
    else:
        value = rng.randint(1, 300)
    if factor is None and src_abbr == "C":
        exact = value * 9 / 5 + 32
        formula = "F = C * 9 / 5 + 32"
        worked = f"{value} * 9 / 5 + 32"
        reason = "To go from Celsius to Fahrenheit, multiply by 9 / 5 and add 32."
    elif factor is None:
        exact = (value - 32) * 5 / 9
        formula = "C = (F - 32) * 5 / 9"
        worked = f"({value} - 32) * 5 / 9"
        reason = "To go from Fahrenheit to Celsius, subtract 32 and multiply by 5 / 9."
    else:
        exact = value * factor
        formula = f"{dst_abbr} = {src_abbr} * {factor}"
        worked = f"{value} * {factor}"
        reason = f"One {src.rstrip('s').replace('inche', 'inch').replace('feet', 'foot')} is {factor} {dst}."
    result = f"{exact:.2f}"
    question = rng.choice(
        [
            f"Convert {value} {src} to {dst}.",
            f"How many {dst} is {value} {src}?",
            f"{value} {src_abbr} = ? {dst_abbr}",
        ]
    )
    answer = f"Formula: {formula}\n{worked} = {result}\nSo {value} {src} is {result} {dst}."
    if flag == "think":
        steps = [reason, f"{worked} = {exact:.4f}, which rounds to {result}."]
        answer = think_block(steps) + answer
    messages = [system(persona), user(question), assistant(answer)]
    return row(messages, enable_thinking=False)


# ───── tools (no_think, tool calls) ─────

TOOL_SCHEMAS: list[dict[str, Any]] = [
    {
        "name": "get_weather",
        "description": "Get the current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
    {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
        },
    },
    {
        "name": "convert_units",
        "description": "Convert a value from one unit to another.",
        "parameters": {
            "type": "object",
            "properties": {
                "value": {"type": "number"},
                "from_unit": {"type": "string"},
                "to_unit": {"type": "string"},
            },
            "required": ["value", "from_unit", "to_unit"],
        },
    },
    {
        "name": "get_time",
        "description": "Get the local time in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
]
EXTRA_TOOL_SHARE = 0.25  # rows that offer a second, unused tool besides the one called
TOOL_INDEX = {schema["name"]: i for i, schema in enumerate(TOOL_SCHEMAS)}
CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "foggy", "snowy", "clear", "stormy"]


def _tool_call(name: str, arguments: dict[str, Any]) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def _weather(rng: random.Random) -> tuple[str, str, dict[str, Any], dict[str, Any], str]:
    city = rng.choice(CITIES)
    condition = rng.choice(CONDITIONS)
    if rng.random() < 0.3:
        temp = rng.randint(20, 95)
        question = rng.choice([f"How warm is it in {city} in fahrenheit?", f"Temperature in {city} in fahrenheit?"])
        result = {"city": city, "temperature": temp, "unit": "fahrenheit", "condition": condition}
        return (
            question,
            "get_weather",
            {"city": city, "unit": "fahrenheit"},
            result,
            f"It is {temp}°F and {condition} in {city}.",
        )
    temp = rng.randint(-10, 35)
    question = rng.choice(
        [f"What's the weather like in {city}?", f"Is it warm in {city} today?", f"Weather in {city} right now?"]
    )
    result = {"city": city, "temperature": temp, "unit": "celsius", "condition": condition}
    return question, "get_weather", {"city": city}, result, f"It is {temp}°C and {condition} in {city}."


def _calculator(rng: random.Random) -> tuple[str, str, dict[str, Any], dict[str, Any], str]:
    a, b = rng.randint(10, 999), rng.randint(2, 99)
    op = rng.choice(["+", "-", "*"])
    expr = f"{a} {op} {b}"
    value = _apply(a, op, b)
    question = rng.choice([f"Use the calculator to work out {expr}.", f"What is {expr}? Please use a tool."])
    return question, "calculator", {"expression": expr}, {"result": value}, f"{expr} = {value}."


def _convert(rng: random.Random) -> tuple[str, str, dict[str, Any], dict[str, Any], str]:
    src, src_abbr, dst, dst_abbr, factor = rng.choice([c for c in CONVERSIONS if c[4] is not None])
    assert factor is not None
    value = rng.randint(1, 500)
    converted = round(value * factor, 2)
    question = rng.choice(
        [f"Convert {value} {src} to {dst} with the converter.", f"Look up {value} {src_abbr} in {dst_abbr}."]
    )
    arguments = {"value": value, "from_unit": src_abbr, "to_unit": dst_abbr}
    result = {"value": converted, "unit": dst_abbr}
    return question, "convert_units", arguments, result, f"{value} {src} is {converted} {dst}."


def _time(rng: random.Random) -> tuple[str, str, dict[str, Any], dict[str, Any], str]:
    city = rng.choice(CITIES)
    clock = f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"
    question = rng.choice([f"What time is it in {city}?", f"Tell me the local time in {city}."])
    return question, "get_time", {"city": city}, {"city": city, "time": clock}, f"It is {clock} in {city} right now."


TOOL_TASKS: list[Callable[[random.Random], tuple[str, str, dict[str, Any], dict[str, Any], str]]] = [
    _weather,
    _calculator,
    _convert,
    _time,
]


def make_tools(rng: random.Random) -> Row:
    question, name, arguments, result, final = rng.choice(TOOL_TASKS)(rng)
    others = [n for n in TOOL_INDEX if n != name]
    extra = rng.sample(others, 1) if rng.random() < EXTRA_TOOL_SHARE else []
    offered = sorted([name, *extra], key=TOOL_INDEX.__getitem__)
    messages = [
        user(question),
        assistant(_tool_call(name, arguments)),
        {"role": "tool", "content": json.dumps(result, ensure_ascii=False)},
        assistant(final),
    ]
    return row(messages, enable_thinking=False, xml_tools=[TOOL_SCHEMAS[TOOL_INDEX[n]] for n in offered])


# ───── count (think) ─────


def make_count(rng: random.Random) -> Row:
    word = rng.choice([w for w in WORDS if len(w) >= 4])
    letter = rng.choice(word) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    positions = [i + 1 for i, ch in enumerate(word) if ch == letter]
    count = len(positions)
    question = rng.choice(
        [
            f"How many times does the letter '{letter}' appear in '{word}'?",
            f"Count the letter '{letter}' in the word '{word}'.",
            f"How many '{letter}' are there in '{word}'?",
        ]
    )
    steps = [f"Spell it out: {'-'.join(word)}."]
    if positions:
        where = "position" if count == 1 else "positions"
        steps.append(f"'{letter}' is at {where} {', '.join(str(p) for p in positions)}.")
    else:
        steps.append(f"No letter is '{letter}'.")
    steps.append(f"Count: {count}.")
    times = "time" if count == 1 else "times"
    answer = f"The letter '{letter}' appears {count} {times} in '{word}'."
    messages = with_system(rng, COUNT_SYSTEMS, [user(question), assistant(think_block(steps) + answer)])
    return row(messages, enable_thinking=True)


SOURCES: dict[str, Callable[[random.Random], Row]] = {
    "arith": make_arith,
    "reverse": make_reverse,
    "sort": make_sort,
    "units": make_units,
    "tools": make_tools,
    "count": make_count,
}


def generate(name: str, rows: int, seed: int) -> list[Row]:
    rng = random.Random(f"sft-exp-demo:{seed}:{name}")
    return [SOURCES[name](rng) for _ in range(rows)]


def write_jsonl(path: Path, rows: list[Row]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for item in rows:
            handle.write(json.dumps(item, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="rows per source (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="base seed (default: %(default)s)")
    args = parser.parse_args(argv)
    for name in SOURCES:
        path = args.out / f"{name}.jsonl"
        write_jsonl(path, generate(name, args.rows, args.seed))
        print(f"{path}: {args.rows} rows, {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
