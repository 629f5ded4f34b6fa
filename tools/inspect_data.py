#!/usr/bin/env python
"""Inspect a megatron-core indexed dataset prefix: periln_megatron/data/inspect.py (--help; also
`python -m periln_megatron.data.inspect` and `periln-inspect-data`)."""

import sys

from periln_megatron.data.inspect import main

if __name__ == "__main__":
    sys.exit(main())
