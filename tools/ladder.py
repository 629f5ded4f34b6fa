#!/usr/bin/env python3
"""`python tools/ladder.py` = `periln-ladder`: periln_megatron/commands/ladder.py (the grid: periln_megatron/ladder/)."""

import sys

from periln_megatron.commands.ladder import main

if __name__ == "__main__":
    sys.exit(main())
