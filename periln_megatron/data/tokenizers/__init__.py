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
"""

from __future__ import annotations

import base64
import os
import re
from itertools import chain, compress
from pathlib import Path

import numpy as np

SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")
# the types a recipe can name (the container build checks their libraries: TOKENIZER_LIBRARIES)
TOKENIZER_TYPES = SENTENCEPIECE_TYPES + ("HuggingFaceTokenizer", "TikTokenizer")
# types only tools/preprocess_data.py takes (GPT-2's two files do not fit a recipe's tokenizer.model);
# their libraries are among TOKENIZER_LIBRARIES' (GPT2BPETokenizer: tokenizers, as HuggingFaceTokenizer)
PREPROCESS_ONLY_TYPES = ("GPT2BPETokenizer",)
LOADABLE_TYPES = TOKENIZER_TYPES + PREPROCESS_ONLY_TYPES
_EOD_PIECES = ("<|endoftext|>", "<eod>", "<EOD>", "</s>", "<eos>")


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


# --------------------------------------------------------------------------- SentencePiece
def _proto_fields(buf: bytes):
    """Yield (field_number, wire_type, value) of one protobuf message (enough for ModelProto)."""
    i, n = 0, len(buf)

    def varint(i):
        shift = result = 0
        while True:
            b = buf[i]
            result |= (b & 0x7F) << shift
            i += 1
            if b < 0x80:
                return result, i
            shift += 7

    while i < n:
        key, i = varint(i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            size, i = varint(i)
            value, i = buf[i:i + size], i + size
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


def _sentencepiece_model_type(model_bytes: bytes) -> int:
    """TrainerSpec.model_type: 1 unigram, 2 BPE, 3 word, 4 char (unigram when unset)."""
    for field, wire, value in _proto_fields(model_bytes):
        if field == 2 and wire == 2:  # ModelProto.trainer_spec
            for f, w, v in _proto_fields(value):
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
            eod = next((self.sp.piece_to_id(p) for p in _EOD_PIECES
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


# --------------------------------------------------------------------------- Hugging Face
class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face tokenizer, as Megatron-LM 0.16's preprocessing uses it: the text's own tokens
    only, no BOS or other template tokens, unless ``include_special_tokens`` (Megatron-LM's
    ``--tokenizer-hf-include-special-tokens``) asks for ``tokenizer(text).input_ids``.
    EOD = ``eos_token_id``, vocab size = ``len(tokenizer)``.

    ``path``: a local directory (or tokenizer.json), or a Hub id (``name`` or ``org/name``) that is
    not a local path: loaded from the local Hub cache if there, else downloaded by transformers
    (``HF_HUB_OFFLINE=1`` forbids that). Failure is a ValueError of one line naming the id."""

    def __init__(self, path: str, include_special_tokens: bool = False):
        import os

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        self.name = str(path)
        p = Path(path)
        if p.is_file() and p.suffix == ".json":
            self.tok = PreTrainedTokenizerFast(tokenizer_file=str(p))
        elif p.exists():
            self.tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        else:
            self.tok = _hub_tokenizer(str(path))
        self.vocab_size = len(self.tok)
        eod = self.tok.eos_token_id
        if eod is None:
            for piece in _EOD_PIECES:
                tid = self.tok.convert_tokens_to_ids(piece)
                if tid is not None and tid != self.tok.unk_token_id:
                    eod = tid
                    break
        if eod is None:
            raise ValueError(f"{path}: the tokenizer has no eos token to use as end-of-document")
        self.eod_id = int(eod)
        self.include_special_tokens = include_special_tokens

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tok(list(texts), add_special_tokens=self.include_special_tokens)["input_ids"]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


# --------------------------------------------------------------------------- Hugging Face Hub
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def is_hub_id(name: str) -> bool:
    """Whether `name` can be a Hugging Face Hub repository id (``name`` or ``org/name``) rather than
    a path: no leading ``/``, ``.`` or ``~``, at most one ``/``, no ``..``."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split("\n")[:1]).strip() or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _hub_tokenizer(name: str):
    """AutoTokenizer for a Hub id: the local Hub cache first (no network), then a download unless
    offline. Any failure is a one-line ValueError (transformers' retry warnings are silenced)."""
    import logging
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants
    from transformers import AutoTokenizer

    where = f"{name}: not a local file or directory"
    if not is_hub_id(name):
        raise ValueError(f"{where} (nor a Hugging Face Hub id such as org/name)")
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception:  # noqa: BLE001 - not in the cache (or a broken entry): try the Hub below
        pass
    if constants.HF_HUB_OFFLINE:
        raise ValueError(f"{where}, and Hugging Face Hub tokenizer {name!r} is not in the local cache "
                         f"({constants.HF_HUB_CACHE}) while HF_HUB_OFFLINE is set: download it where there is "
                         f"a network, or give a local directory")
    host = urlparse(constants.ENDPOINT).hostname or constants.ENDPOINT
    if not any(os.environ.get(v) for v in _PROXY_VARS):  # no proxy: a host that does not resolve is offline
        try:
            socket.getaddrinfo(host, 443)
        except OSError as exc:
            raise ValueError(f"{where}, and Hugging Face Hub tokenizer {name!r} is not in the local cache "
                             f"({constants.HF_HUB_CACHE}) and {host} cannot be reached (offline? {exc}): "
                             f"give a local directory") from None
    quiet = [logging.getLogger(n) for n in ("huggingface_hub", "transformers")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # noqa: BLE001 - one line whatever the Hub or transformers raised
        raise ValueError(f"{where}, and Hugging Face Hub tokenizer {name!r} could not be loaded: "
                         f"{_first_line(exc)}") from None
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)


# --------------------------------------------------------------------------- GPT-2 BPE
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


# --------------------------------------------------------------------------- tiktoken
_DEFAULT_TIKTOKEN_PATTERN = "cl100k_base"


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
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
        ranks = _read_tiktoken_ranks(p)
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


# --------------------------------------------------------------------------- installation check
# What each type imports when a tokenizer is loaded (module, or module:attribute), so that an
# installation (the container's build, a fresh venv) can prove every type a recipe may name works.
TOKENIZER_LIBRARIES = {
    **{t: ("sentencepiece:SentencePieceProcessor",) for t in SENTENCEPIECE_TYPES},
    "HuggingFaceTokenizer": ("tokenizers:Tokenizer", "transformers:AutoTokenizer", "transformers:PreTrainedTokenizerFast"),
    "TikTokenizer": ("tiktoken:Encoding", "tiktoken_ext.openai_public:ENCODING_CONSTRUCTORS",
                     "megatron.core.tokenizers.text.libraries.tiktoken_tokenizer:TikTokenTokenizer"),
}
_PACKAGE_OF = {"tiktoken_ext": "tiktoken", "megatron": "megatron-core"}


def check_tokenizer_libraries(types=None) -> dict[str, list[str]]:
    """Import the libraries behind each tokenizer type (default: all of ``TOKENIZER_TYPES``).

    Returns ``{type: ["module version", ...]}``; raises ImportError naming the tokenizer type and
    the package to install when one is missing. The container build runs this for every type."""
    import importlib
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for tokenizer_type in TOKENIZER_TYPES if types is None else types:
        if tokenizer_type not in TOKENIZER_LIBRARIES:
            raise ValueError(f"unknown tokenizer type {tokenizer_type!r}; choose one of {', '.join(TOKENIZER_TYPES)}")
        found = []
        for spec in TOKENIZER_LIBRARIES[tokenizer_type]:
            module, _, attr = spec.partition(":")
            top = module.split(".")[0]
            package = _PACKAGE_OF.get(top, top)
            try:
                mod = importlib.import_module(module)
                if attr:
                    getattr(mod, attr)
            except (ImportError, AttributeError) as exc:
                raise ImportError(f"tokenizer type {tokenizer_type} needs {spec} (pip package {package!r}): "
                                  f"{type(exc).__name__}: {exc}") from exc
            try:
                found.append(f"{module} {version(package)}")
            except PackageNotFoundError:
                found.append(module)
        out[tokenizer_type] = list(dict.fromkeys(found))
    return out


# --------------------------------------------------------------------------- entry point
def load_tokenizer(tokenizer_type: str, model_path: str, **kwargs) -> Tokenizer:
    """Load a tokenizer by Megatron-LM type name from a local file or directory.

    ``SentencePieceTokenizer`` (also ``GPTSentencePieceTokenizer``, ``Llama2Tokenizer``): a .model file;
    ``HuggingFaceTokenizer``: a directory (or tokenizer.json), or a Hub id (see the class);
    ``TikTokenizer``: a .tiktoken file (or Megatron's .json vocabulary); ``GPT2BPETokenizer``: the
    vocab.json with ``merge_file=`` merges.txt (or a directory holding both). Raises ValueError
    naming the path on any problem.
    """
    if tokenizer_type not in LOADABLE_TYPES:
        raise ValueError(f"unknown tokenizer type {tokenizer_type!r}; choose one of {', '.join(LOADABLE_TYPES)}")
    hub = tokenizer_type == "HuggingFaceTokenizer" and model_path is not None and is_hub_id(str(model_path))
    if model_path is None or not (Path(model_path).exists() or hub):
        raise ValueError(f"{tokenizer_type}: tokenizer model not found: {model_path}")
    try:
        if tokenizer_type in SENTENCEPIECE_TYPES:
            return SentencePieceTokenizer(model_path, **kwargs)
        if tokenizer_type == "HuggingFaceTokenizer":
            return HuggingFaceTokenizer(model_path, **kwargs)
        if tokenizer_type == "GPT2BPETokenizer":
            return GPT2BPETokenizer(model_path, **kwargs)
        return TikTokenizer(model_path, **kwargs)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - name the file whatever the library raised
        raise ValueError(f"{model_path}: cannot load as {tokenizer_type}: {type(exc).__name__}: {exc}") from exc
