#!/usr/bin/env python
"""`python tools/evaluate.py` = `periln-evaluate`: periln_megatron/commands/evaluate.py."""

import sys

from periln_megatron.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
