"""A small tiktoken BPE file built locally (no download), for tests and CPU runs of the paper recipes.

    from tiktoken_fixture import make_tiktoken_file
    path = make_tiktoken_file(tmp / "cl100k_base.tiktoken", texts, vocab_size=2000)
    tok = periln_megatron.data.tokenizers.load_tokenizer("TikTokenizer", str(path))

API (kept stable; other tests and tools rely on it):

``make_tiktoken_file(path, texts, vocab_size) -> Path``
    Trains a byte-level BPE on ``texts`` (an iterable of str) and writes ``path`` in tiktoken's
    format: one ``<base64 token bytes> <rank>`` line per token, ranks ascending from 0. Ranks 0..255
    are the 256 single bytes (rank == byte value, as Megatron's .json vocabulary also requires);
    rank 256 + k is the k-th merge, so the ranks are BPE-consistent (every token of rank >= 256 is the
    concatenation of two tokens of lower rank). Text is pre-split with the cl100k pattern, as
    tiktoken splits it. ``vocab_size`` counts the mergeable tokens (>= 256); a small corpus may give
    fewer. Deterministic: the same texts and size give the same bytes. Takes well under a second for
    ~1 MB of text and a few thousand tokens. The parent directory is created. Returns ``Path(path)``.

    The file's name decides the special tokens ``periln_megatron.data.tokenizers.TikTokenizer`` gives it:
    named after an OpenAI encoding (``cl100k_base.tiktoken``) it gets that encoding's pattern and
    special tokens at their original ids (``<|endoftext|>`` = 100257, vocabulary 100277, so a recipe's
    ``tokenizer.vocab_size: 100277`` stays right); any other name gets the cl100k pattern and
    ``<|endoftext|>`` right after the last rank.

``megatron_json(tiktoken_path, json_path) -> Path``
    The same ranks as Megatron's TikTokenizer ``.json`` vocabulary (a list of
    ``{"rank", "token_bytes", "token_str"}``).

``CL100K_PATTERN``
    The split pattern used for training (tiktoken's cl100k_base ``pat_str``).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable
from pathlib import Path

CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                  r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: byte-level characters -> byte values."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) \
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def train_ranks(texts: Iterable[str], vocab_size: int) -> dict[bytes, int]:
    """Byte-level BPE ranks (token bytes -> rank) trained with the `tokenizers` library."""
    if vocab_size < 256:
        raise ValueError(f"vocab_size={vocab_size}: a byte-level BPE needs at least the 256 single bytes")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CL100K_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    to_byte = _byte_decoder()
    ranks = {bytes([b]): b for b in range(256)}
    for merge in merges:
        left, right = merge if isinstance(merge, list) else merge.split(" ")
        token = bytes(to_byte[c] for c in left + right)
        if token not in ranks and len(ranks) < vocab_size:
            ranks[token] = len(ranks)
    return ranks


def write_tiktoken(ranks: dict[bytes, int], path: str | Path) -> Path:
    """Write ranks in tiktoken's ``<base64 token> <rank>`` format (ascending rank)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    path.write_text("".join(lines))
    return path


def make_tiktoken_file(path: str | Path, texts: Iterable[str], vocab_size: int) -> Path:
    """Train a byte-level BPE of at most ``vocab_size`` mergeable tokens on ``texts`` and write it
    to ``path`` as a tiktoken file (see the module docstring). Returns the path."""
    return write_tiktoken(train_ranks(texts, vocab_size), path)


def megatron_json(tiktoken_path: str | Path, json_path: str | Path) -> Path:
    """Rewrite a tiktoken file as Megatron's TikTokenizer ``.json`` vocabulary."""
    from periln_megatron.data.tokenizers import read_tiktoken_ranks

    ranks = read_tiktoken_ranks(Path(tiktoken_path))
    vocab = [{"rank": r, "token_bytes": base64.b64encode(t).decode(), "token_str": t.decode("utf-8", "replace")}
             for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(vocab))
    return json_path
