"""The tokenizing workers: each process loads the tokenizer once, then parses and encodes whole
blocks of JSONL lines, returning numpy arrays (tokens, tokens per sequence, sequences per document)."""

from __future__ import annotations

import signal

import numpy as np

from periln_megatron.data.preprocess.inputs import parse_block
from periln_megatron.data.preprocess.sentences import build_splitter, split_sentences
from periln_megatron.data.tokenizers import SENTENCEPIECE_TYPES, load_tokenizer

HF_TYPES = ("HuggingFaceTokenizer", "GPT2BPETokenizer")  # take --tokenizer-hf-include-special-tokens
# SentencePiece with the segment cache encodes each space-separated word on its own, so a document
# cut at spaces into pieces of about this many characters gives exactly the ids of the whole: a
# worker's tokenizer memory stays bounded however long the document.
PIECE_CHARS = 1 << 20

_W: dict = {}  # this worker's tokenizer and settings (set by _init_worker)


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


def _init_worker(args, dtype):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles interrupts
    tok = tokenizer_from_args(args)
    splitter = build_splitter(args.lang, args.keep_newlines) if args.split_sentences else None
    _W.update(tok=tok, keys=args.json_keys, eod=tok.eod_id if args.append_eod else None, dtype=np.dtype(dtype),
              splitter=splitter)


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
    texts, good, errors, blank = parse_block(first_line, data, keys)
    out = {"errors": errors, "blank": blank, "bytes": len(data), "keys": {}, "lines": np.array(good, np.int64)}
    tok, eod, dtype = _W["tok"], _W["eod"], _W["dtype"]
    for k in keys:
        flat, lengths, counts = encode_documents(tok, texts[k], eod, _W.get("splitter"))
        empty = int(np.count_nonzero(counts == 0))
        out["keys"][k] = (flat.astype(dtype), lengths.astype(np.int32), counts.astype(np.int32), empty)
    return out


def _encode_task(task):
    return encode_block(*task)
