#!/usr/bin/env python
"""Tokenize JSONL into megatron-core indexed datasets: periln_megatron/data/preprocess/ (--help;
also `python -m periln_megatron.data.preprocess` and `periln-preprocess`)."""

import sys

from periln_megatron.data.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
