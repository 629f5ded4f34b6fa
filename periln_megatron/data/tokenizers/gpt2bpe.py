"""GPT-2's byte-level BPE from a vocab.json + merges.txt pair (preprocessing only)."""

from __future__ import annotations

import os
from pathlib import Path

from periln_megatron.data.tokenizers.base import Tokenizer

GPT2_EOD = "<|endoftext|>"


class GPT2BPETokenizer(Tokenizer):
    """GPT-2's byte-level BPE from a ``vocab.json`` + ``merges.txt`` pair, as Megatron-LM's
    ``--tokenizer-type GPT2BPETokenizer --vocab-file --merge-file``.

    The text is cut by GPT-2's pattern (``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|
    \\s+(?!\\S)|\\s+``), each piece's UTF-8 bytes mapped to GPT-2's printable characters and merged by
    rank (the merges file's order). ``merges.txt`` is read as Megatron-LM and Hugging Face read it:
    its first line (the ``#version`` header, required here) and whatever follows the last newline
    are skipped. EOD = the id of ``<|endoftext|>`` (required in the vocabulary); vocab size = the
    number of vocabulary entries. A literal ``<|endoftext|>`` inside a document becomes the EOD id,
    as in Megatron-LM 0.16's default tokenizer (a Hugging Face GPT-2 tokenizer; its
    ``--legacy-tokenizer`` would spell it out in ordinary tokens). No BOS is ever added
    (``include_special_tokens`` is accepted and changes nothing: GPT-2 has no template tokens).
    ``vocab_file`` may also be a directory holding ``vocab.json`` and ``merges.txt``.
    Built on the ``tokenizers`` library (Rust): exactly GPT-2's algorithm, batched.
    """

    def __init__(self, vocab_file: str, merge_file: str | None = None, include_special_tokens: bool = False):
        import json

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as RustTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        vocab_path = Path(vocab_file)
        if vocab_path.is_dir():
            vocab_path, merge_file = vocab_path / "vocab.json", merge_file or vocab_path / "merges.txt"
        if merge_file is None:
            raise ValueError(f"{vocab_file}: GPT2BPETokenizer needs a merges file (--merge-file) beside the vocabulary")
        merge_path = Path(merge_file)
        for what, path in (("vocabulary", vocab_path), ("merges file", merge_path)):
            if not path.is_file():
                raise ValueError(f"GPT2BPETokenizer: {what} not found: {path}")
        self.name = f"{vocab_path},{merge_path}"
        try:
            vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ValueError(f"{vocab_path}: not a JSON vocabulary ({exc})") from None
        if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
            raise ValueError(f"{vocab_path}: expected a JSON object of token -> id")
        if GPT2_EOD not in vocab:
            raise ValueError(f"{vocab_path}: no {GPT2_EOD} token in the vocabulary (GPT-2's end of document)")
        lines = merge_path.read_text(encoding="utf-8").split("\n")
        if not lines[0].startswith("#version"):
            raise ValueError(f"{merge_path}:1: expected a '#version' header line; Megatron-LM and Hugging Face "
                             f"skip the first line unread, so without one the first merge would be lost")
        merges = []
        for lineno, line in enumerate(lines[1:-1], start=2):
            pair = tuple(line.split())
            if len(pair) == 2:
                merges.append(pair)
            elif pair:
                raise ValueError(f"{merge_path}:{lineno}: expected two space-separated tokens, found {line!r}")
        try:
            tok = RustTokenizer(models.BPE(vocab, merges))
        except Exception as exc:  # noqa: BLE001 - e.g. a merge whose tokens are not in the vocabulary
            raise ValueError(f"{merge_path}: does not fit {vocab_path.name}: {exc}") from None
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(GPT2_EOD, special=True)])
        self.tok = tok
        self.vocab_size = len(vocab)
        self.eod_id = int(vocab[GPT2_EOD])
        self.include_special_tokens = include_special_tokens

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)
