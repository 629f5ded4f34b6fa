#!/usr/bin/env python
"""Tokenize JSONL (or .jsonl.gz) into megatron-core indexed datasets (PREFIX.bin + PREFIX.idx).

A drop-in for Megatron-LM's tools/preprocess_data.py (core_v0.16.1) where the flags overlap:
--input, --output-prefix, --json-keys, --workers, --append-eod, --tokenizer-type,
--tokenizer-model, --vocab-file/--merge-file (GPT2BPETokenizer), --tokenizer-hf-include-special-tokens,
--split-sentences/--keep-newlines/--lang, --partitions, --keep-sequential-samples. For those the
.bin/.idx are byte-identical to Megatron-LM's for the same input (tests/test_preprocess_parity.py),
with one difference by default: a document with no tokens (empty text) is dropped and counted;
Megatron-LM writes it as a document of no sequences, and so does --keep-empty-documents.
Outputs are named like Megatron-LM's: OUTPUT_PREFIX_{key}_document.{bin,idx}, or
OUTPUT_PREFIX_{key}_sentence.{bin,idx} with --split-sentences (one sequence per sentence).

  python tools/preprocess_data.py --input data/*.jsonl.gz --output-prefix out/corpus \\
      --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --append-eod --workers 8
  python tools/preprocess_data.py --input data.jsonl --output-prefix out/gpt2 --append-eod \\
      --tokenizer-type GPT2BPETokenizer --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt

--split-sentences needs nltk and its punkt model for --lang, installed beforehand (nothing is
downloaded here: `python -m nltk.downloader punkt_tab`, NLTK_DATA=DIR to choose where); without
them it stops with one line saying so. Megatron-LM downloads "punkt" itself at start.
--partitions N gives Megatron-LM's document order (its input lines dealt round-robin into N
partitions, written partition after partition; --keep-sequential-samples keeps file order); the
speed comes from --workers alone. Megatron-LM's intermediate files (input_0.jsonl, input_ss.jsonl,
OUTPUT_PREFIX_0_...) are not made, and one run does it all (Megatron-LM with --split-sentences and
one partition only writes the split file, and a second run tokenizes it).

The main process reads large blocks of lines and writes contiguous token chunks; worker
processes parse JSON and tokenize whole blocks at once, returning numpy arrays. Files are written
under temporary names and renamed only when complete.

Memory: about 0.3-0.4 GB per process (main + each worker) plus, per worker, what its largest
document needs while it is tokenized. Measured peak RAM per byte of one long document (10 and
50 MB single-document files, --workers 1): SentencePiece ~10 bytes per byte of document (the
segment cache, the default, tokenizes a long document in 1 MiB pieces: 50 MB took +0.42 GB),
SentencePiece --no-segment-cache ~50, TikTokenizer ~20 (a toy vocabulary of ~1 token per byte),
HuggingFaceTokenizer ~200 (a 50 MB document needs ~10 GB). N workers may hold N such documents at once.
Errors are one line (exit 1; bad flags exit 2); PERILN_DEBUG=1 shows the traceback. An output
that would hold no tokens (empty or blank input, only empty documents, every line skipped) is an
error, as is a text with a lone surrogate ("\\ud800"); nothing is written then (Megatron-LM writes
an empty dataset, which its trainer cannot read).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import warnings

import numpy as np

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from periln_megatron.data.indexed import PrefixWriter  # noqa: E402
from periln_megatron.data.tokenizers import LOADABLE_TYPES, SENTENCEPIECE_TYPES, load_tokenizer  # noqa: E402

HF_TYPES = ("HuggingFaceTokenizer", "GPT2BPETokenizer")  # take --tokenizer-hf-include-special-tokens
# Megatron-LM splits a text into sentences this many characters at a time (then joins the lists)
SPLIT_CHARS = 1_000_000

# "lone surrogate": a \uD800-\uDFFF escape, or its UTF-8 bytes (json.loads decodes bytes with
# surrogatepass), gives a str that SentencePiece and HF refuse (a TypeError in the worker) and
# tiktoken silently replaces: refused for all, as bad input
REASONS = ("malformed JSON", "not a JSON object", "missing key", "not a string", "lone surrogate")
MAX_CHUNK_BYTES = 1 << 30
# SentencePiece with the segment cache encodes each space-separated word on its own, so a document
# cut at spaces into pieces of about this many characters gives exactly the ids of the whole: a
# worker's tokenizer memory stays bounded however long the document.
PIECE_CHARS = 1 << 20


class InputError(Exception):
    """Bad input under --on-error fail, or an unreadable file: the message starts with file:line."""


def _int_flag(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high]; argparse names the flag in the error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text!r}")
        return value

    return parse


def _seconds_flag(text: str) -> float:
    """An argparse type: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive, finite number of seconds, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input data")
    g.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="JSONL files (.jsonl, .json, optionally .gz), directories of them, or glob patterns")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize; one output per key (default: text)")
    g.add_argument("--split-sentences", action="store_true",
                   help="split each text into sentences with nltk's punkt (one sequence per sentence; outputs "
                        "..._{key}_sentence); needs nltk and the punkt model for --lang installed")
    g.add_argument("--keep-newlines", action="store_true",
                   help="--split-sentences: keep the whitespace (newlines) after each sentence in it")
    g.add_argument("--lang", default="english", help="--split-sentences: punkt model language (default: english)")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=LOADABLE_TYPES)
    g.add_argument("--tokenizer-model",
                   help="SentencePiece .model, Hugging Face tokenizer directory or Hub id (org/name), or "
                        ".tiktoken BPE file; not for GPT2BPETokenizer")
    g.add_argument("--vocab-file", help="GPT2BPETokenizer: GPT-2 vocab.json")
    g.add_argument("--merge-file", help="GPT2BPETokenizer: GPT-2 merges.txt")
    g.add_argument("--tokenizer-hf-include-special-tokens", action="store_true",
                   help="HuggingFaceTokenizer: encode as tokenizer(text).input_ids, with the template's special "
                        "tokens (a BOS); default: the text's own tokens only (as Megatron-LM)")
    g.add_argument("--append-eod", action="store_true",
                   help="append the end-of-document token to every document (to its last sentence)")
    g.add_argument("--no-segment-cache", action="store_true",
                   help="SentencePiece: encode whole documents instead of caching per-word ids (same ids, slower)")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True,
                   help="output path without suffix; writes OUTPUT_PREFIX_{key}_document.bin/.idx")
    g.add_argument("--keep-separate", action="store_true",
                   help="one prefix per input file (OUTPUT_PREFIX_{file stem}_{key}_document), e.g. for a blend; "
                        "default: all inputs merged into one prefix")
    g.add_argument("--keep-empty-documents", action="store_true",
                   help="write a document with no tokens as a document of no sequences, as Megatron-LM does "
                        "(default: dropped and counted)")
    g.add_argument("--partitions", type=_int_flag(1), default=1, metavar="N",
                   help="Megatron-LM's document order for N partitions: input line i goes to partition i mod N "
                        "and partitions are written in turn (default 1: file order)")
    g.add_argument("--keep-sequential-samples", action="store_true",
                   help="with --partitions: partitions are contiguous runs of lines, so the file order is kept")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=_int_flag(1), default=os.cpu_count() or 1,
                   help="tokenizer processes (default, and at most: the CPU count)")
    g.add_argument("--chunk-bytes", type=_int_flag(1, MAX_CHUNK_BYTES), default=1 << 18,
                   help=f"bytes of JSONL per work item, 1 to {MAX_CHUNK_BYTES} (default: 256 KiB)")
    g.add_argument("--on-error", choices=("skip", "fail"), default="fail",
                   help="malformed JSON, a missing key or a non-string value: fail (default) stops with "
                        "file:line; skip counts the line and goes on")
    g.add_argument("--log-interval", type=_seconds_flag, default=None,
                   help="seconds between progress lines when stderr is not a terminal (default 10)")
    g.add_argument("--quiet", action="store_true", help="no progress bar, only the summary")
    g.add_argument("--summary-json", metavar="PATH", help="also write the summary as JSON to PATH")
    return p


def expand_inputs(patterns: list[str]) -> list[Path]:
    files = []
    for pat in patterns:
        p = Path(pat)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")))
        elif p.exists():
            found = [p]
        else:
            found = sorted(Path(f) for f in glob.glob(pat))
        if not found:
            raise InputError(f"{pat}: no such input file (nor matching files)")
        files.extend(found)
    return files


def input_stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".jsonl", ".json"):
        name = name[: -len(suffix)] if name.endswith(suffix) else name
    return name


def read_chunks(path: Path, chunk_bytes: int):
    """Yield (first line number, block of whole lines, raw bytes read so far) for one input file."""
    try:
        raw = open(path, "rb")
    except OSError as exc:
        raise InputError(f"{path}: cannot open: {exc.strerror or exc}") from None
    try:
        stream = gzip.GzipFile(fileobj=raw) if path.name.endswith(".gz") else raw
        line, rest = 1, []  # rest: the blocks of a line not finished yet (joined once: no quadratic copying)
        while True:
            try:
                block = stream.read(chunk_bytes)
            except (OSError, EOFError, gzip.BadGzipFile) as exc:
                raise InputError(f"{path}:{line}: cannot read: {exc}") from None
            if not block:
                if rest:
                    yield line, b"".join(rest), raw.tell()
                return
            cut = block.rfind(b"\n") + 1
            if cut == 0:
                rest.append(block)
                continue
            data = b"".join([*rest, block[:cut]]) if rest else block[:cut]
            rest = [block[cut:]] if cut < len(block) else []
            yield line, data, raw.tell()
            line += data.count(b"\n")
    finally:
        raw.close()


# ------------------------------------------------------------------ worker side
_W: dict = {}


def tokenizer_from_args(args):
    """The tokenizer the flags name (raises ValueError naming the file or Hub id)."""
    model, kwargs = args.tokenizer_model, {}
    if args.tokenizer_type in SENTENCEPIECE_TYPES:
        kwargs["segment_cache"] = not args.no_segment_cache
    if args.tokenizer_type in HF_TYPES:
        kwargs["include_special_tokens"] = args.tokenizer_hf_include_special_tokens
    if args.tokenizer_type == "GPT2BPETokenizer":
        model, kwargs["merge_file"] = args.vocab_file, args.merge_file
    return load_tokenizer(args.tokenizer_type, model, **kwargs)


class _CustomLanguageVars:
    """Megatron-LM's --keep-newlines punkt variables (built lazily: nltk is optional): the period
    context also takes the word before and the whitespace after a sentence end, so the whitespace
    (newlines) stays at the end of the sentence instead of being dropped between sentences."""

    _cls = None

    @classmethod
    def make(cls):
        if cls._cls is None:
            from nltk.tokenize.punkt import PunktLanguageVars

            class CustomLanguageVars(PunktLanguageVars):
                _period_context_fmt = r"""
        \S*                          # some word material
        %(SentEndChars)s             # a potential sentence ending
        \s*                          # the whitespace after it, kept with the sentence
        (?=(?P<after_tok>
            %(NonWord)s              # either other punctuation
            |
            (?P<next_tok>\S+)        # or the next token (right after that whitespace)
        ))"""

            cls._cls = CustomLanguageVars
        return cls._cls()


def build_splitter(lang: str, keep_newlines: bool):
    """nltk's punkt sentence splitter for `lang` as Megatron-LM builds it (``nltk.load`` of
    ``tokenizers/punkt/{lang}.pickle``, which nltk >= 3.9 serves from its ``punkt_tab`` data); with
    `keep_newlines` a PunktSentenceTokenizer of the same parameters with `_CustomLanguageVars`.
    Nothing is downloaded: InputError (one line) when nltk or the model is missing."""
    try:
        import nltk
        from nltk.tokenize.punkt import PunktSentenceTokenizer
    except ImportError:
        raise InputError("--split-sentences needs nltk (pip install nltk) and its punkt model for "
                         f"--lang {lang} (python -m nltk.downloader punkt_tab)") from None
    try:
        splitter = nltk.load(f"nltk:tokenizers/punkt/{lang}.pickle")
    except LookupError:
        raise InputError(f"--split-sentences: nltk's punkt model for --lang {lang} is not installed (searched "
                         f"{', '.join(nltk.data.path)}); nothing is downloaded here: install it once with "
                         f"`python -m nltk.downloader punkt_tab` (NLTK_DATA=DIR to choose where)") from None
    except (ValueError, OSError) as exc:
        raise InputError(f"--split-sentences: cannot load nltk's punkt model for --lang {lang}: "
                         f"{' '.join(str(exc).split())}") from None
    if keep_newlines:
        return PunktSentenceTokenizer(train_text=splitter._params, lang_vars=_CustomLanguageVars.make())
    return splitter


def split_sentences(splitter, text: str) -> list[str]:
    """Megatron-LM's sentence split: punkt on each SPLIT_CHARS characters in turn, lists joined."""
    return [s for i in range(0, len(text), SPLIT_CHARS) for s in splitter.tokenize(text[i:i + SPLIT_CHARS])]


def _init_worker(args, dtype):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles interrupts
    tok = tokenizer_from_args(args)
    splitter = build_splitter(args.lang, args.keep_newlines) if args.split_sentences else None
    _W.update(tok=tok, keys=args.json_keys, eod=tok.eod_id if args.append_eod else None, dtype=np.dtype(dtype),
              splitter=splitter)


def _parse_fast(lines: list[bytes], keys) -> dict | None:
    """All lines in one json.loads call (as one JSON array); None if any line needs a closer look."""
    try:
        objs = json.loads(b"[" + b",".join(lines) + b"]")
        if len(objs) != len(lines):  # a line holding "1, 2" parses as two values
            return None
        texts = {k: [o[k] for o in objs] for k in keys}
    except (ValueError, KeyError, TypeError, IndexError):
        return None
    if all(type(t) is str for k in keys for t in texts[k]):
        return texts
    return None


def _parse_slow(lines: list[tuple[int, bytes]], keys, errors: list, good: list) -> dict:
    """Line by line, recording (line, reason, message) for each bad one and the number of each good one."""
    texts = {k: [] for k in keys}
    for lineno, line in lines:
        try:
            obj = json.loads(line)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            errors.append((lineno, REASONS[0], f"malformed JSON: {exc}"))
            continue
        if not isinstance(obj, dict):
            errors.append((lineno, REASONS[1], f"expected a JSON object, found {type(obj).__name__}"))
            continue
        values = []
        for k in keys:
            v = obj.get(k, _W)
            if v is _W:
                errors.append((lineno, REASONS[2], f"missing key {k!r}"))
                break
            if not isinstance(v, str):
                errors.append((lineno, REASONS[3], f"key {k!r} holds {type(v).__name__}, not a string"))
                break
            values.append(v)
        else:
            good.append(lineno)
            for k, v in zip(keys, values):
                texts[k].append(v)
    return texts


def _drop_surrogates(texts: dict, good: list, errors: list) -> tuple[dict, list]:
    """Documents whose text holds a lone surrogate become errors (line, reason, message). Encoding
    every text costs ~0.5 ms per MB, well under 1% of tokenizing it."""
    bad = {}
    for k, values in texts.items():
        for i, t in enumerate(values):
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as exc:
                bad.setdefault(i, f"key {k!r} holds a lone surrogate (U+{ord(t[exc.start]):04X} at character "
                                  f"{exc.start}): not Unicode text any tokenizer can encode")
    if not bad:
        return texts, good
    errors.extend((good[i], REASONS[4], message) for i, message in bad.items())
    errors.sort()
    keep = [i not in bad for i in range(len(good))]
    return ({k: [t for t, ok in zip(v, keep) if ok] for k, v in texts.items()},
            [n for n, ok in zip(good, keep) if ok])


def _pieces(text: str):
    """`text` cut at spaces (each dropped) into pieces of about PIECE_CHARS characters."""
    start = 0
    while len(text) - start > PIECE_CHARS:
        cut = text.find(" ", start + PIECE_CHARS)
        if cut < 0:
            break
        yield text[start:cut]
        start = cut + 1
    yield text[start:]


def encode_texts(tok, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """tok.encode_flat(texts). With SentencePiece's segment cache (which encodes each space-separated
    word on its own, so cutting a text at a space changes no id) long texts are cut into pieces and
    encoded about PIECE_CHARS characters per call: the tokenizer's memory stays bounded. Other
    tokenizers see each text whole (their pre-tokenizers do not make a cut exact)."""
    if not getattr(tok, "segment_cache", False) or sum(map(len, texts)) <= PIECE_CHARS:
        return tok.encode_flat(texts)
    flats, lengths = [], np.zeros(len(texts), np.int64)
    batch, owners, size = [], [], 0

    def flush():
        flat, lens = tok.encode_flat(batch)
        flats.append(np.asarray(flat, np.int32))
        np.add.at(lengths, owners, lens)
        batch.clear()
        owners.clear()

    for i, text in enumerate(texts):
        # a literal "\u2581" makes SentencePiece encode the text whole (see encode_flat): not cut
        for piece in ([text] if "\u2581" in text else _pieces(text)):
            batch.append(piece)
            owners.append(i)
            size += len(piece)
            if size >= PIECE_CHARS:
                flush()
                size = 0
    if batch:
        flush()
    return np.concatenate(flats), lengths


def encode_documents(tok, texts: list[str], eod: int | None, splitter=None):
    """Megatron-LM's encoding of documents: each text (or each of its sentences, with a splitter) is
    one sequence; sequences of no tokens are dropped; `eod` (if not None) ends the last sequence of
    each document that has one. Returns (all tokens as int32, tokens per sequence, sequences per
    document); a document of 0 sequences had no tokens."""
    if splitter is not None:
        sentences = [split_sentences(splitter, t) for t in texts]
        counts = np.fromiter(map(len, sentences), np.int64, len(texts))
        texts = [s for doc in sentences for s in doc]
    else:
        counts = np.ones(len(texts), np.int64)
    flat, lengths = encode_texts(tok, texts) if texts else (np.zeros(0, np.int32), np.zeros(0, np.int64))
    keep = lengths > 0
    owner = np.repeat(np.arange(len(counts)), counts)  # document of each sequence
    counts = np.bincount(owner[keep], minlength=len(counts))
    lengths = lengths[keep]  # dropped sequences had no tokens: `flat` is unchanged
    if eod is not None and len(lengths):
        last = np.cumsum(counts)[counts > 0] - 1  # each document's last sequence
        flat = np.insert(flat, np.cumsum(lengths)[last], eod)
        lengths[last] += 1
    return flat, lengths, counts


def encode_block(first_line: int, data: bytes) -> dict:
    """Parse and tokenize one block of JSONL lines. Returns, per key, (tokens, tokens per sequence,
    sequences per document, documents of no tokens); the line number of each document; the bad lines."""
    keys = _W["keys"]
    numbered = [(n, line) for n, line in enumerate(data.split(b"\n"), start=first_line) if line.strip()]
    blank = data.count(b"\n") + (not data.endswith(b"\n")) - len(numbered)
    errors, good = [], []
    texts = _parse_fast([line for _, line in numbered], keys) if numbered else {k: [] for k in keys}
    if texts is None:
        texts = _parse_slow(numbered, keys, errors, good)
    else:
        good = [n for n, _ in numbered]
    texts, good = _drop_surrogates(texts, good, errors)
    out = {"errors": errors, "blank": blank, "bytes": len(data), "keys": {}, "lines": np.array(good, np.int64)}
    tok, eod, dtype = _W["tok"], _W["eod"], _W["dtype"]
    for k in keys:
        flat, lengths, counts = encode_documents(tok, texts[k], eod, _W.get("splitter"))
        empty = int(np.count_nonzero(counts == 0))
        out["keys"][k] = (flat.astype(dtype), lengths.astype(np.int32), counts.astype(np.int32), empty)
    return out


def _encode_task(task):
    return encode_block(*task)


# ------------------------------------------------------------------ main side
class Progress:
    def __init__(self, total_bytes: int, quiet: bool, interval: float | None):
        self.total, self.quiet = max(total_bytes, 1), quiet
        self.tty = sys.stderr.isatty() and interval is None
        self.interval = 0.2 if self.tty else (interval or 10.0)
        self.start = self.last = time.monotonic()

    def update(self, done_raw: int, docs: int, json_bytes: int, tokens: int, final: bool = False) -> None:
        now = time.monotonic()
        if self.quiet or (not final and now - self.last < self.interval):
            return
        self.last = now
        el = max(now - self.start, 1e-9)
        frac = min(done_raw / self.total, 1.0)
        eta = el * (1 - frac) / frac if frac > 0 else 0
        bar = "#" * int(frac * 30) + "-" * (30 - int(frac * 30))
        msg = (f"[{bar}] {frac * 100:5.1f}% {docs:,} docs {tokens:,} tokens "
               f"{json_bytes / el / 1e6:.2f} MB/s ETA {int(eta) // 60}:{int(eta) % 60:02d}")
        print(("\r" + msg + ("\n" if final else "")) if self.tty else msg, end="" if self.tty else "\n",
              file=sys.stderr, flush=True)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def check_writable(flag: str, path: str) -> None:
    """InputError (one line naming the path) if a file cannot be created at `path`: the nearest
    existing ancestor of its directory must be a writable directory."""
    probe = Path(path).absolute().parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"{flag} {path}: cannot write there: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: cannot write there: directory {probe} is not writable")


def select_documents(tokens: np.ndarray, lengths: np.ndarray, counts: np.ndarray, mask: np.ndarray):
    """The documents where `mask` is true, as (tokens, tokens per sequence, sequences per document)."""
    seq_mask = np.repeat(mask, counts)
    return tokens[np.repeat(seq_mask, lengths)], lengths[seq_mask], counts[mask]


class KeyOutput:
    """One output prefix, written through `partitions` PrefixWriters (partition p: temporary prefix
    ``PREFIX.partP-PID``) merged in partition order with megatron-core's ``add_index`` at commit,
    as Megatron-LM merges its partitions. One partition writes PREFIX directly."""

    def __init__(self, prefix: str, key: str, vocab_size: int, partitions: int):
        self.prefix, self.key, self.vocab_size = prefix, key, vocab_size
        names = [prefix] if partitions == 1 else [f"{prefix}.part{p}-{os.getpid()}" for p in range(partitions)]
        self.parts: list[PrefixWriter] = []
        for name in names:
            self.parts.append(PrefixWriter(name, vocab_size))
        self.dtype = self.parts[0].dtype
        self.merged: PrefixWriter | None = None

    def add(self, tokens, lengths, counts, part: int = 0) -> None:
        self.parts[part].add_sequences(tokens, lengths, counts)

    @property
    def num_tokens(self) -> int:
        return sum(part.num_tokens for part in self.parts)

    def finalize(self) -> None:
        """Finalize (merge the partitions) under temporary names; nothing is renamed into place."""
        if len(self.parts) == 1:
            return self.parts[0].finalize()
        for part in self.parts:
            part.commit()
        self.merged = PrefixWriter(self.prefix, self.vocab_size)
        for part in self.parts:
            self.merged.builder.add_index(part.prefix)
        try:
            self.merged.finalize()
        finally:
            self._remove_parts()

    def commit(self) -> tuple[int, int]:
        """Check, rename into place (after finalize); return (num_documents, num_tokens)."""
        if self.merged is None and len(self.parts) > 1:
            self.finalize()
        return (self.merged or self.parts[0]).commit()

    def _remove_parts(self) -> None:
        for part in self.parts if len(self.parts) > 1 else ():
            for suffix in (".bin", ".idx"):
                if os.path.exists(part.prefix + suffix):
                    os.remove(part.prefix + suffix)

    def abort(self) -> None:
        for w in [*self.parts, *([self.merged] if self.merged else [])]:
            w.abort()
        self._remove_parts()


def run(args) -> dict:
    """Preprocess per ``args`` (see build_parser); return the summary dict. Raises InputError."""
    check_writable("--output-prefix", args.output_prefix)
    if args.summary_json:
        check_writable("--summary-json", args.summary_json)
    files = expand_inputs(args.input)
    tok = tokenizer_from_args(args)
    if args.split_sentences:
        build_splitter(args.lang, args.keep_newlines)  # fail here, in one line, if nltk or punkt is missing
    level = "sentence" if args.split_sentences else "document"
    interleave = args.partitions if args.partitions > 1 and not args.keep_sequential_samples else 1
    if args.keep_separate:
        stems, groups = collections.Counter(input_stem(f) for f in files), []
        for i, f in enumerate(files):
            name = input_stem(f) if stems[input_stem(f)] == 1 else f"{i}_{input_stem(f)}"
            groups.append((f"{args.output_prefix}_{name}", [f]))
    else:
        groups = [(args.output_prefix, files)]
    stats = {"files": [str(f) for f in files], "documents": 0, "sequences": 0, "tokens": 0, "json_bytes": 0,
             "blank_lines": 0, "empty_documents": 0, "skipped": {r: 0 for r in REASONS}, "outputs": {}}
    progress = Progress(sum(f.stat().st_size for f in files), args.quiet, args.log_interval)
    from megatron.core.datasets.indexed_dataset import DType  # before the fork: workers inherit it

    dtype = np.dtype(DType.optimal_dtype(tok.vocab_size)).name
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    pool = ctx.Pool(args.workers, initializer=_init_worker, initargs=(args, dtype))
    writers, shown, raw_done = [], 0, 0
    out_dir = Path(args.output_prefix).absolute().parent
    created = [d for d in (out_dir, *out_dir.parents) if not d.exists()]  # removed again on failure
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    start = time.perf_counter()
    progress.start = time.monotonic()
    try:
        for out_prefix, group in groups:
            keyed = {}
            for k in args.json_keys:
                keyed[k] = KeyOutput(f"{out_prefix}_{k}_{level}", k, tok.vocab_size, interleave)
                writers.append(keyed[k])
            line_offset = 0  # lines of the group's earlier files: documents are numbered across the group
            before = {n: stats[n] for n in ("documents", "empty_documents", "blank_lines")}
            skipped_before = sum(stats["skipped"].values())
            for f in group:
                pending, raw_before, file_lines = collections.deque(), raw_done, 0
                chunks = read_chunks(f, args.chunk_bytes)
                exhausted = False
                while pending or not exhausted:
                    while not exhausted and len(pending) < 2 * args.workers + 2:
                        item = next(chunks, None)
                        if item is None:
                            exhausted = True
                        else:
                            last = item[0] - 1 + item[1].count(b"\n") + (not item[1].endswith(b"\n"))
                            pending.append((pool.apply_async(_encode_task, ((item[0], item[1]),)), item[2], last))
                    if not pending:
                        break
                    job, raw_pos, file_lines = pending.popleft()
                    res = job.get()
                    for lineno, reason, message in res["errors"]:
                        if args.on_error == "fail":
                            raise InputError(f"{f}:{lineno}: {message}")
                        stats["skipped"][reason] += 1
                        if shown < 20 and not args.quiet:
                            print(f"warning: {f}:{lineno}: {message} (skipped)", file=sys.stderr)
                        shown += 1
                    part = (line_offset + res["lines"] - 1) % interleave  # each document's partition
                    for k, (tokens, lengths, counts, empty) in res["keys"].items():
                        doc_part = part
                        if empty and not args.keep_empty_documents:  # documents of no tokens: not written
                            doc_part, counts = part[counts > 0], counts[counts > 0]
                        if interleave == 1:
                            keyed[k].add(tokens, lengths, counts)
                        else:
                            for p in np.unique(doc_part):
                                keyed[k].add(*select_documents(tokens, lengths, counts, doc_part == p), part=int(p))
                        stats["documents"] += len(counts)
                        stats["sequences"] += len(lengths)
                        stats["tokens"] += len(tokens)
                        stats["empty_documents"] += empty
                    stats["json_bytes"] += res["bytes"]
                    stats["blank_lines"] += res["blank"]
                    raw_done = raw_before + raw_pos
                    progress.update(raw_done, stats["documents"], stats["json_bytes"], stats["tokens"])
                line_offset += file_lines
            for k, w in keyed.items():
                if w.num_tokens == 0:  # an empty dataset, which megatron-core cannot read: not written
                    counts = {n: stats[n] - before[n] for n in before}
                    names = ", ".join(map(str, group[:3])) + (f" (and {len(group) - 3} more)" if len(group) > 3 else "")
                    raise InputError(
                        f"{names}: no tokens for key {k!r} ({counts['documents']} documents, "
                        f"{counts['empty_documents']} empty, {counts['blank_lines']} blank lines, "
                        f"{sum(stats['skipped'].values()) - skipped_before} skipped): nothing written")
                w.finalize()
        for w in writers:  # only once every output has tokens: all or nothing
            docs, toks = w.commit()
            stats["outputs"][w.prefix] = {"key": w.key, "documents": docs, "tokens": toks,
                                          "bytes": toks * w.dtype.itemsize, "dtype": w.dtype.name}
        pool.close()
    except BaseException:
        pool.terminate()
        for w in writers:
            w.abort()
        for d in created:  # deepest first, and only if still empty
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        raise
    finally:
        signal.signal(signal.SIGTERM, old_term)
        pool.join()
    stats["seconds"] = time.perf_counter() - start
    stats["level"], stats["keep_empty_documents"] = level, args.keep_empty_documents
    progress.update(raw_done, stats["documents"], stats["json_bytes"], stats["tokens"], final=True)
    return stats


def print_summary(stats: dict, file=sys.stderr) -> None:
    s = max(stats["seconds"], 1e-9)
    out_bytes = sum(o["bytes"] for o in stats["outputs"].values())
    empty = "written" if stats.get("keep_empty_documents") else "not written"
    print(f"documents: {stats['documents']:,} written, {stats['empty_documents']:,} empty ({empty}), "
          f"{stats['blank_lines']:,} blank lines", file=file)
    if stats.get("level") == "sentence":
        print(f"sentences: {stats['sequences']:,} (one sequence each)", file=file)
    print(f"tokens: {stats['tokens']:,}; input: {stats['json_bytes'] / 1e6:.2f} MB of JSONL; "
          f"output: {out_bytes / 1e6:.2f} MB of tokens", file=file)
    print(f"time: {s:.2f} s; throughput: {stats['json_bytes'] / s / 1e6:.2f} MB/s of JSONL, "
          f"{stats['tokens'] / s:,.0f} tokens/s, {stats['documents'] / s:,.0f} docs/s", file=file)
    skipped = sum(stats["skipped"].values())
    reasons = ", ".join(f"{n} {r}" for r, n in stats["skipped"].items() if n)
    print(f"skipped lines: {skipped}" + (f" ({reasons})" if reasons else ""), file=file)
    for prefix, o in stats["outputs"].items():
        print(f"wrote {prefix}.bin/.idx: {o['documents']:,} documents, {o['tokens']:,} tokens ({o['dtype']})",
              file=file)


def _os_error(exc: OSError) -> str:
    return f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)


def check_flags(parser: argparse.ArgumentParser, args) -> None:
    """Tokenizer flags that must go together (parser.error: exit 2); warnings for flags without effect."""
    if args.tokenizer_type == "GPT2BPETokenizer":
        if not (args.vocab_file and args.merge_file):
            parser.error("--tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file")
        if args.tokenizer_model:
            parser.error("--tokenizer-model is not for GPT2BPETokenizer: give --vocab-file and --merge-file")
    else:
        if not args.tokenizer_model:
            parser.error(f"--tokenizer-type {args.tokenizer_type} needs --tokenizer-model")
        for flag in ("vocab_file", "merge_file"):
            if getattr(args, flag):
                parser.error(f"--{flag.replace('_', '-')} is only for --tokenizer-type GPT2BPETokenizer")
    unused = [(args.tokenizer_hf_include_special_tokens and args.tokenizer_type not in HF_TYPES,
               "--tokenizer-hf-include-special-tokens", f"with {args.tokenizer_type}"),
              (args.keep_newlines and not args.split_sentences, "--keep-newlines", "without --split-sentences"),
              (args.keep_sequential_samples and args.partitions == 1, "--keep-sequential-samples",
               "with one partition (the order is the file order already)")]
    for is_unused, flag, why in unused:
        if is_unused:
            print(f"warning: {flag} has no effect {why}", file=sys.stderr)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_flags(parser, args)
    cpus = os.cpu_count() or 1
    if args.workers > cpus:
        print(f"warning: --workers {args.workers} is more than the {cpus} CPUs; using {cpus}", file=sys.stderr)
        args.workers = cpus
    debug = bool(os.environ.get("PERILN_DEBUG"))  # tracebacks instead of one-line errors
    try:
        stats = run(args)
    except (InputError, ValueError, OSError) as exc:
        if debug:
            raise
        print(f"error: {_os_error(exc) if isinstance(exc, OSError) else exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no output written (temporary files removed)", file=sys.stderr)
        return 130
    print_summary(stats)
    if args.summary_json:
        try:
            Path(args.summary_json).write_text(json.dumps(stats, indent=2))
        except OSError as exc:
            if debug:
                raise
            print(f"error: --summary-json: {_os_error(exc)} (the outputs above are complete)", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
