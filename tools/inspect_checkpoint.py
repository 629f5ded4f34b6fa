#!/usr/bin/env python
"""`python tools/inspect_checkpoint.py` = `periln-inspect-checkpoint`: periln_megatron/commands/inspect_checkpoint.py."""

import sys

from periln_megatron.commands.inspect_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
