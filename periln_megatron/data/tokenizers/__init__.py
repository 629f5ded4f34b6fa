"""One thin tokenizer adapter over SentencePiece, Hugging Face tokenizers and tiktoken.

``load_tokenizer(type, path)`` returns a :class:`Tokenizer` with ``vocab_size``, ``eod_id``,
``encode``, ``encode_batch`` and ``decode``. Type names are Megatron-LM's ``--tokenizer-type``
values. Every tokenizer is read from a local file or directory; the one exception is a
``HuggingFaceTokenizer`` named by its Hugging Face Hub id (``org/name``), which comes from the local
Hub cache or, failing that, is downloaded by transformers (an offline machine gets a one-line error).

megatron.core.tokenizers (0.16.1) wraps the same libraries one text at a time (no batched
encode) and needs a metadata JSON beside each model, so it is used only where it adds something:
Megatron's own TikTokenizer vocabulary format (a ``.json`` list of ranks), whose id layout
(1000 special tokens first) only its class reproduces.

One module per family: base.py (the Tokenizer interface, type names), sentencepiece.py,
huggingface.py (and Hub ids), gpt2bpe.py, tiktoken.py; registry.py (load_tokenizer, the libraries
each type needs); protobuf.py (the protobuf reader SentencePiece models need, shared with
periln_megatron/hf/tokenizer.py); train.py (``python -m periln_megatron.data.tokenizers.train``,
tools/train_tokenizer.py: train a SentencePiece model).
"""

from periln_megatron.data.tokenizers.base import (EOD_PIECES, LOADABLE_TYPES, PREPROCESS_ONLY_TYPES,
                                                  SENTENCEPIECE_TYPES, TOKENIZER_TYPES, Tokenizer)
from periln_megatron.data.tokenizers.gpt2bpe import GPT2_EOD, GPT2BPETokenizer
from periln_megatron.data.tokenizers.huggingface import HuggingFaceTokenizer, is_hub_id
from periln_megatron.data.tokenizers.registry import TOKENIZER_LIBRARIES, check_tokenizer_libraries, load_tokenizer
from periln_megatron.data.tokenizers.sentencepiece import SentencePieceTokenizer
from periln_megatron.data.tokenizers.tiktoken import TikTokenizer, read_tiktoken_ranks

__all__ = ["EOD_PIECES", "GPT2_EOD", "LOADABLE_TYPES", "PREPROCESS_ONLY_TYPES", "SENTENCEPIECE_TYPES",
           "TOKENIZER_LIBRARIES", "TOKENIZER_TYPES", "GPT2BPETokenizer", "HuggingFaceTokenizer",
           "SentencePieceTokenizer", "TikTokenizer", "Tokenizer", "check_tokenizer_libraries", "is_hub_id",
           "load_tokenizer", "read_tiktoken_ranks"]
