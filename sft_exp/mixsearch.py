"""python -m sft_exp.mixsearch <sweep dir> [--objective ...] [--propose K] [--out DIR]: fit a mixture sweep and
propose the next mixtures (the implementation and its contract: sft_exp/tools/mixsearch.py)."""

from __future__ import annotations

import sys

from sft_exp.tools.mixsearch import main

if __name__ == "__main__":
    sys.exit(main())
