#!/usr/bin/env python
"""`python tools/convert_to_hf.py` = `periln-convert-to-hf`: periln_megatron/commands/convert_to_hf.py."""

import sys

from periln_megatron.commands.convert_to_hf import main

if __name__ == "__main__":
    sys.exit(main())
