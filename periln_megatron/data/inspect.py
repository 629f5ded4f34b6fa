"""Inspect a megatron-core indexed dataset prefix (PREFIX.bin + PREFIX.idx).

  python tools/inspect_data.py out/corpus_text_document
  python tools/inspect_data.py out/corpus_text_document --tokenizer-type SentencePieceTokenizer \\
      --tokenizer-model tok.model --show 3

The same command: `python -m periln_megatron.data.inspect ...` or `periln-inspect-data ...`
(periln_megatron/data/inspect.py).

Checks that .idx and .bin agree (exit 1 naming the file, expected vs actual bytes, if not) and
hold tokens (exit 1 for an empty dataset, which the trainer refuses),
prints document/token counts and the length distribution, and with a tokenizer decodes the
first --show documents back to text.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from periln_megatron.data.indexed import DataPrefixError, read_index_header, strip_data_suffix, verify_prefix
from periln_megatron.data.tokenizers import TOKENIZER_TYPES, load_tokenizer

MODULE_PROG = "python -m periln_megatron.data.inspect"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prefix", help="dataset prefix, or its .bin or .idx file (the suffix is dropped, as in a "
                                  "recipe's data.prefixes)")
    p.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, help="decode documents with this tokenizer")
    p.add_argument("--tokenizer-model", help="SentencePiece .model, HF tokenizer directory or .tiktoken file")
    p.add_argument("--show", type=int, default=2, metavar="N", help="documents to print (default 2; 0: none)")
    p.add_argument("--max-chars", type=int, default=500, help="characters shown per document (default 500)")
    return p


def read_documents(prefix: str, count: int):
    """First `count` documents as token arrays, read straight from the files (after verify_prefix)."""
    dtype, seq_count, doc_count = read_index_header(prefix + ".idx")
    idx = np.memmap(prefix + ".idx", mode="r", dtype=np.uint8)
    off = 34
    lengths = np.frombuffer(idx, np.int32, seq_count, off)
    pointers = np.frombuffer(idx, np.int64, seq_count, off + 4 * seq_count)
    docs = np.frombuffer(idx, np.int64, doc_count, off + 12 * seq_count)
    data = np.memmap(prefix + ".bin", mode="r", dtype=np.uint8) if pointers.size and lengths.sum() else None
    out = []
    for d in range(min(count, doc_count - 1)):
        parts = [np.frombuffer(data, dtype, int(lengths[s]), int(pointers[s])) if lengths[s] else
                 np.zeros(0, dtype) for s in range(int(docs[d]), int(docs[d + 1]))]
        out.append(np.concatenate(parts) if parts else np.zeros(0, dtype))
    return out, lengths, docs


def main(argv=None, prog: str | None = None) -> int:
    """The command line (tools/inspect_data.py, python -m periln_megatron.data.inspect,
    periln-inspect-data): 0 ok, 1 damaged or empty, 2 bad flags."""
    args = build_parser(prog).parse_args(argv)
    prefix = strip_data_suffix(args.prefix)
    if (args.tokenizer_type is None) != (args.tokenizer_model is None):
        print("error: give both --tokenizer-type and --tokenizer-model, or neither", file=sys.stderr)
        return 2
    try:
        num_docs, num_tokens = verify_prefix(prefix)
    except DataPrefixError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if num_tokens == 0:  # what the trainer refuses: not "ok"
        print(f"error: {prefix}: an empty dataset ({num_docs} documents, 0 tokens): nothing to train on",
              file=sys.stderr)
        return 1
    dtype, seq_count, _ = read_index_header(prefix + ".idx")
    docs, lengths, doc_index = read_documents(prefix, args.show)
    doc_lengths = np.add.reduceat(lengths.astype(np.int64), doc_index[:-1]) if num_docs and seq_count else \
        np.zeros(0, np.int64)
    if num_docs and seq_count:
        doc_lengths[np.diff(doc_index) == 0] = 0  # reduceat repeats a value for empty documents
    bin_bytes = Path(prefix + ".bin").stat().st_size
    print(f"prefix: {prefix}")
    print(f"ok: .idx and .bin agree ({bin_bytes:,} bytes of {dtype.name} tokens)")
    print(f"documents: {num_docs:,}  sequences: {seq_count:,}  tokens: {num_tokens:,}")
    if num_docs:
        q = np.percentile(doc_lengths, [0, 50, 90, 99, 100]).astype(int)
        print(f"tokens per document: mean {doc_lengths.mean():.1f}, min {q[0]}, median {q[1]}, p90 {q[2]}, "
              f"p99 {q[3]}, max {q[4]}")
    if args.tokenizer_type:
        try:
            tok = load_tokenizer(args.tokenizer_type, args.tokenizer_model)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"tokenizer: {tok}")
        top = max((int(d.max()) for d in docs if len(d)), default=-1)
        if top >= tok.vocab_size:
            print(f"warning: token id {top} >= the tokenizer's vocab size {tok.vocab_size}: wrong tokenizer?",
                  file=sys.stderr)
    for i, d in enumerate(docs):
        print(f"--- document {i}: {len(d)} tokens")
        if args.tokenizer_type:
            eod = len(d) and int(d[-1]) == tok.eod_id
            text = tok.decode(d[:-1] if eod else d)
            more = len(text) > args.max_chars
            print(text[: args.max_chars] + (" [...]" if more else "") + (" <EOD>" if eod else ""))
        else:
            print(" ".join(map(str, d[:64].tolist())) + (" ..." if len(d) > 64 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(prog=MODULE_PROG))
