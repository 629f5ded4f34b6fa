#!/usr/bin/env python
"""`python tools/convert_from_hf.py` = `periln-convert-from-hf`: periln_megatron/commands/convert_from_hf.py."""

import sys

from periln_megatron.commands.convert_from_hf import main

if __name__ == "__main__":
    sys.exit(main())
