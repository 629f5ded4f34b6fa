#!/usr/bin/env python3
"""Plot Peri-LN diagnostics from training runs: `python -m periln_megatron.training.plots` (same flags)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from periln_megatron.training.plots import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
