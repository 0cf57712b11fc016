"""Hydra's composition errors as sft-exp's one-line `error: <key>: <what>. <fix>` (Hydra itself prints a block and
exits 1). `check_composes` composes the command's overrides once, before Hydra's own run, and translates what fails."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf.errors import OmegaConfBaseException

from sft_exp.errors import ConfigError

_FULL_KEY = re.compile(r"full_key: (\S+)")
_NOT_IN = re.compile(r"Key '([^']+)' not in '(\w+)'")
_MISSING_OPTION = re.compile(r"Could not find '([^']+)/([^']+)'")
_MISSING_GROUP = re.compile(r"Could not find '([^'/]+)'")


def check_composes(conf_dir: Path, config_name: str, argv: list[str]) -> None:
    """Compose `argv`'s overrides as `python launch.py argv` would; raise ConfigError naming the key if that fails.

    Skipped for flags (--cfg, --help, -m: Hydra handles those) and for sweeps (overrides with sweep syntax, whose
    points compose per job); overrides of Hydra's own settings (hydra.*) are left to Hydra."""
    if any(a.startswith("-") for a in argv):
        return
    overrides = [a for a in argv if not a.lstrip("+~").startswith(("hydra.", "hydra/", "hydra="))]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise ConfigError(translate(e, conf_dir)) from None
    if any(o.is_sweep_override() for o in parsed):  # a sweep (a,b / range / choice): each job composes its own
        return
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(translate(e, conf_dir)) from None


def translate(e: BaseException, conf_dir: Path) -> str:
    """`<key>: <what>. <fix>` for one of Hydra's composition errors (the original wording kept in <what>)."""
    cause = e.__cause__ or e
    text = str(cause)
    first = text.strip().splitlines()[0] if text.strip() else type(cause).__name__
    key = _FULL_KEY.search(text)
    if isinstance(e, OverrideParseException):
        return f"{first}. Check the override's syntax (quote values with spaces or brackets: 'key=[a, b]')"
    if isinstance(e, MissingConfigException) or _MISSING_OPTION.search(text):
        m = _MISSING_OPTION.search(text)
        if m:
            group, option = m.groups()
            options = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
            close = difflib.get_close_matches(option, options, n=1)
            hint = f"Did you mean {group}={close[0]}? " if close else ""
            return f"{group}: {first}. {hint}Choose one of: {', '.join(options)}"
        m = _MISSING_GROUP.search(text)
        return f"{m.group(1) if m else 'config'}: {first}"
    m = _NOT_IN.search(text)
    if m and key:
        return f"{key.group(1)}: {first}. Check the name (`python launch.py --cfg job` lists every key)"
    if key:
        return f"{key.group(1)}: {first}"
    return f"{first} ({str(e).strip().splitlines()[0]})"
