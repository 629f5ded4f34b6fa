"""tiktoken encodings: a local ``.tiktoken`` BPE file, or Megatron's TikTokenizer ``.json`` vocabulary."""

from __future__ import annotations

import base64
from pathlib import Path

from periln_megatron.data.tokenizers.base import Tokenizer

_DEFAULT_TIKTOKEN_PATTERN = "cl100k_base"


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except Exception as exc:  # noqa: BLE001 - any parse failure is reported with its line
            raise ValueError(f"{path}:{lineno}: not a '<base64 token> <rank>' line ({exc})") from None
    if not ranks:
        raise ValueError(f"{path}: no tokens in the tiktoken BPE file")
    return ranks


def _openai_encoding_params(name: str, ranks: dict[bytes, int]) -> dict | None:
    """Pattern and special tokens of a known OpenAI encoding, with *our* local ranks (no download)."""
    try:
        import tiktoken_ext.openai_public as public
    except ImportError:
        return None
    ctor = getattr(public, "ENCODING_CONSTRUCTORS", {}).get(name)
    if ctor is None:
        return None
    original = public.load_tiktoken_bpe
    public.load_tiktoken_bpe = lambda *a, **k: ranks
    try:
        return ctor()
    finally:
        public.load_tiktoken_bpe = original


class TikTokenizer(Tokenizer):
    """A local tiktoken encoding: a ``.tiktoken`` BPE file (``<base64 token> <rank>`` lines).

    A file named after an OpenAI encoding (``cl100k_base.tiktoken``, ``o200k_base.tiktoken``, ...)
    gets that encoding's split pattern and special tokens; any other gets the cl100k pattern and
    ``<|endoftext|>`` right after the last rank. EOD is ``<|endoftext|>``. A ``.json`` file is
    Megatron's TikTokenizer vocabulary, loaded through megatron-core (ids shifted by its 1000
    special tokens, EOD = ``</s>``). Documents are encoded as ordinary text: a special-token string
    inside a document is not turned into the special id.
    """

    def __init__(self, path: str):
        import tiktoken

        self.name = str(path)
        p = Path(path)
        if p.suffix == ".json":
            self._init_megatron_json(p)
            return
        ranks = read_tiktoken_ranks(p)
        params = _openai_encoding_params(p.stem, ranks)
        if params is None:
            base = _openai_encoding_params(_DEFAULT_TIKTOKEN_PATTERN, ranks)
            params = {"name": p.stem, "pat_str": base["pat_str"], "mergeable_ranks": ranks,
                      "special_tokens": {"<|endoftext|>": max(ranks.values()) + 1}}
        self.enc = tiktoken.Encoding(**params)
        self.vocab_size = self.enc.n_vocab
        self.eod_id = self.enc.eot_token

    def _init_megatron_json(self, p: Path):
        import json

        from megatron.core.tokenizers.text.libraries.tiktoken_tokenizer import TikTokenTokenizer

        with open(p) as f:
            n = len(json.load(f))
        mt = TikTokenTokenizer(str(p), vocab_size=min(n + 1000, 2**17))
        self.enc = mt.tokenizer
        self.vocab_size = mt.vocab_size
        self.eod_id = mt.eos_id

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(list(texts), num_threads=1)

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids], errors="replace")
