"""The tokenizer interface every family implements, and the type names a recipe or
preprocessing can give (Megatron-LM's ``--tokenizer-type`` values)."""

from __future__ import annotations

from itertools import chain

import numpy as np

SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")
# the types a recipe can name (the container build checks their libraries: TOKENIZER_LIBRARIES)
TOKENIZER_TYPES = SENTENCEPIECE_TYPES + ("HuggingFaceTokenizer", "TikTokenizer")
# types only preprocessing (periln_megatron.data.preprocess) takes (GPT-2's two files do not fit a
# recipe's tokenizer.model);
# their libraries are among TOKENIZER_LIBRARIES' (GPT2BPETokenizer: tokenizers, as HuggingFaceTokenizer)
PREPROCESS_ONLY_TYPES = ("GPT2BPETokenizer",)
LOADABLE_TYPES = TOKENIZER_TYPES + PREPROCESS_ONLY_TYPES
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
