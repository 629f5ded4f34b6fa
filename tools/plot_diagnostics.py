#!/usr/bin/env python3
"""`python tools/plot_diagnostics.py` = `periln-plot-diagnostics`: periln_megatron/commands/plot_diagnostics.py
(the plots: periln_megatron/training/plots.py)."""

import sys

from periln_megatron.commands.plot_diagnostics import main

if __name__ == "__main__":
    sys.exit(main())
