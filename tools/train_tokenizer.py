#!/usr/bin/env python
"""Train a SentencePiece tokenizer: periln_megatron/data/tokenizers/train.py (--help; also
`python -m periln_megatron.data.tokenizers.train` and `periln-train-tokenizer`)."""

import sys

from periln_megatron.data.tokenizers.train import main

if __name__ == "__main__":
    sys.exit(main())
