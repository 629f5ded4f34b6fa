"""The tokenizer interface every family implements, and the type names a recipe or
preprocessing can give (Megatron-LM's ``--tokenizer-type`` values)."""

from __future__ import annotations

from itertools import chain

import numpy as np

# the type names (config/choices.py): SentencePiece's; those whose libraries the container build checks
# (TOKENIZER_LIBRARIES); those only preprocessing takes (GPT-2's two files do not fit tokenizer.model)
from periln_megatron.config.choices import (  # noqa: F401 - re-exported with the interface
    LOADABLE_TYPES, PREPROCESS_ONLY_TYPES, SENTENCEPIECE_TYPES, TOKENIZER_TYPES)

# pieces tried, in order, as end-of-document when a tokenizer names no eos token
EOD_PIECES = ("<|endoftext|>", "<eod>", "<EOD>", "</s>", "<eos>")


class Tokenizer:
    """Common interface. ``encode_batch`` is the fast path; results equal ``encode`` per text."""

    name: str
    vocab_size: int
    eod_id: int

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(all ids concatenated as int32, number of ids per text), for writers of indexed datasets."""
        out = self.encode_batch(texts)
        lengths = np.fromiter(map(len, out), np.int64, len(out))
        return np.fromiter(chain.from_iterable(out), np.int32, int(lengths.sum())), lengths

    def decode(self, ids) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size}, eod_id={self.eod_id})"
