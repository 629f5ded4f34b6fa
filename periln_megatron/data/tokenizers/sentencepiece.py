"""SentencePiece ``.model`` files (also GPTSentencePieceTokenizer, Llama2Tokenizer), with a per-word
id cache that gives SentencePiece's own ids faster (see :class:`SentencePieceTokenizer`)."""

from __future__ import annotations

from itertools import chain, compress
from pathlib import Path

import numpy as np

from periln_megatron.data.tokenizers import protobuf
from periln_megatron.data.tokenizers.base import EOD_PIECES, Tokenizer


def _sentencepiece_model_type(model_bytes: bytes) -> int:
    """TrainerSpec.model_type: 1 unigram, 2 BPE, 3 word, 4 char (unigram when unset)."""
    for field, wire, value in protobuf.fields(model_bytes):
        if field == 2 and wire == 2:  # ModelProto.trainer_spec
            for f, w, v in protobuf.fields(value):
                if f == 3 and w == 0:
                    return v
    return 1


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model``. EOD is the model's ``</s>`` (eos) piece.

    Fast path (BPE models only, checked at load time): the text is split at each ASCII space and
    each distinct word is encoded once and cached. This gives exactly SentencePiece's own ids when
    no piece can span a space (no piece holds "\u2581" after its first character) and the
    normalizer collapses runs of spaces and adds the dummy prefix: then ``encode(" " * k + w) ==
    encode(w)``, BPE merges never cross a word boundary, and merges inside a word happen in the
    same order as in the whole text. Texts holding a literal "\u2581" are encoded whole. Load-time probes compare both ways on tricky strings; any
    difference turns the cache off (``segment_cache`` tells which path is in use).
    """

    _CACHE_MAX_ENTRIES = 1 << 20
    _CACHE_MAX_WORD = 64  # characters; longer words are encoded each time they are seen
    _PROBES = ("a b", "  a  b  ", " a", "a ", "x\u00a0 y", "\u3000a b", "a\tb c\n d", "hello world .",
               "don't  stop", "\u00e9t\u00e9 \u00e0", "\u4e2d\u6587 \u6d4b\u8bd5", "\U0001f600 \U0001f600\U0001f601",
               "  ", "", "a\u00a0\u00a0 \u00a0b", "\u0301 x", "x \u0301", "\n \n", "1 2  3   4", "\x01 \x02a b\x7f",
               "<unk> <s> </s> <pad>", "\u2581 \u2581\u2581 a\u2581b")

    def __init__(self, model_path: str, segment_cache: bool = True):
        import sentencepiece

        self.name = str(model_path)
        model_bytes = Path(model_path).read_bytes()
        self.sp = sentencepiece.SentencePieceProcessor(model_proto=model_bytes)
        self.vocab_size = self.sp.get_piece_size()
        eod = self.sp.eos_id()
        if eod < 0:
            eod = next((self.sp.piece_to_id(p) for p in EOD_PIECES
                        if self.sp.piece_to_id(p) != self.sp.unk_id()), -1)
        if eod < 0:
            raise ValueError(f"{model_path}: the SentencePiece model has no eos piece (nor <|endoftext|> / "
                             f"<eod>) to use as end-of-document; retrain it with an eos id")
        self.eod_id = eod
        self.model_type = _sentencepiece_model_type(model_bytes)
        # word cache: word -> slot; slot -> ids in one flat store (no per-token Python objects)
        self._slots: dict[str, int] = {"": 0}
        self._store = np.zeros(1 << 16, np.int32)
        self._starts = np.zeros(1 << 12, np.int64)
        self._lens = np.zeros(1 << 12, np.int64)
        self._nslots, self._ntok = 1, 0
        self._ws_start = np.array([self.sp.id_to_piece(i).startswith("\u2581") for i in range(self.vocab_size)])
        self.segment_cache = segment_cache
        self.segment_cache = segment_cache and self._segment_cache_is_exact()

    def _segment_cache_is_exact(self) -> bool:
        sp = self.sp
        if self.model_type != 2 or sp.piece_to_id("\u2581") == sp.unk_id():
            return False
        for i in range(self.vocab_size):
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i):
                continue
            piece = sp.id_to_piece(i)
            if "\u2581" in piece[1:] or any(c.isspace() for c in piece):
                return False
        for probe in self._PROBES:
            if sp.encode(probe) != self.encode_flat([probe])[0].tolist():
                return False
        return True

    def _encode_joined(self, words: list[str]):
        """Encode many space-free printable ASCII words with few calls: join ~100 words per string
        (SentencePiece is fastest on ~1 KB inputs), then cut the ids at "\u2581"-initial pieces, of
        which each such word yields exactly one, its first. None if the count disagrees."""
        group = 100
        ids = self.sp.encode([" ".join(words[i:i + group]) for i in range(0, len(words), group)])
        flat = np.fromiter(chain.from_iterable(ids), np.int32)
        cuts = np.flatnonzero(self._ws_start[flat])
        if len(cuts) != len(words) or (len(cuts) and cuts[0] != 0):
            return None
        return flat, np.diff(np.append(cuts, len(flat)))

    def _add_words(self, words: list[str]) -> None:
        """Encode words not yet cached and give each a slot in the flat store."""
        simple = [w.isascii() and w.isprintable() for w in words]
        joined = list(compress(words, simple))
        result = self._encode_joined(joined) if joined else None
        if result is None:
            joined, flat, lens = [], np.zeros(0, np.int32), np.zeros(0, np.int64)
            rest = words
        else:
            flat, lens = result
            rest = list(compress(words, [not s for s in simple]))
        if rest:
            ids = self.sp.encode(rest)
            lens = np.concatenate((lens, np.fromiter(map(len, ids), np.int64, len(ids))))
            flat = np.concatenate((flat, np.fromiter(chain.from_iterable(ids), np.int32)))
        if self._nslots + len(words) > self._CACHE_MAX_ENTRIES or self._ntok + len(flat) > 64 * self._CACHE_MAX_ENTRIES:
            self._slots, self._nslots, self._ntok = {"": 0}, 1, 0
        if self._ntok + len(flat) > len(self._store):
            self._store = np.resize(self._store, max(self._ntok + len(flat), 2 * len(self._store)))
        if self._nslots + len(words) > len(self._starts):
            size = max(self._nslots + len(words), 2 * len(self._starts))
            self._starts, self._lens = np.resize(self._starts, size), np.resize(self._lens, size)
        n0, t0 = self._nslots, self._ntok
        self._store[t0:t0 + len(flat)] = flat
        self._lens[n0:n0 + len(lens)] = lens
        self._starts[n0:n0 + len(lens)] = t0 + np.cumsum(lens) - lens
        self._slots.update(zip(joined + rest, range(n0, n0 + len(lens))))
        self._nslots, self._ntok = n0 + len(lens), t0 + len(flat)

    def encode_flat(self, texts: list[str]):
        """(all ids concatenated as an int32 array, ids per text): no per-token Python objects."""
        if not self.segment_cache:
            out = self.sp.encode(list(texts))
            lengths = np.fromiter(map(len, out), np.int64, len(out))
            return np.fromiter(chain.from_iterable(out), np.int32, int(lengths.sum())), lengths
        special = [i for i, t in enumerate(texts) if "\u2581" in t]
        if special:  # SentencePiece treats a literal "\u2581" like a space but keeps it: encode such texts whole
            flat, lengths = self.encode_flat(["" if "\u2581" in t else t for t in texts])
            parts = np.split(flat, np.cumsum(lengths)[:-1])
            for i, ids in zip(special, self.sp.encode([texts[i] for i in special])):
                parts[i], lengths[i] = np.asarray(ids, np.int32), len(ids)
            return np.concatenate(parts).astype(np.int32, copy=False), lengths
        # " ".join(texts).split(" ") is each text's words in turn; a text has count(" ") + 1 words
        words = " ".join(texts).split(" ")
        slots = list(map(self._slots.get, words))
        if None in slots:
            self._add_words(list(set(words).difference(self._slots)))
            slots = list(map(self._slots.get, words))
        slots = np.fromiter(slots, np.int64, len(slots))
        lens, starts = self._lens[slots], self._starts[slots]
        ends = np.cumsum(lens)
        total = int(ends[-1]) if len(ends) else 0
        flat = self._store[np.arange(total, dtype=np.int64) + np.repeat(starts - (ends - lens), lens)]
        word_ends = np.cumsum(np.fromiter((t.count(" ") + 1 for t in texts), np.int64, len(texts)))
        tok_ends = np.concatenate(([0], ends))[word_ends]
        return flat, np.diff(np.concatenate(([0], tok_ends)))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not self.segment_cache:
            return self.sp.encode(list(texts))
        flat, lengths = self.encode_flat(texts)
        return [a.tolist() for a in np.split(flat, np.cumsum(lengths)[:-1])] if len(texts) else []

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])
