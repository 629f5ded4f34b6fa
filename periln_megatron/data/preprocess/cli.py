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

The same command, flags and outputs: `python -m periln_megatron.data.preprocess ...` or `periln-preprocess ...`.

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
under temporary names and renamed only when complete. Code: periln_megatron/data/preprocess/
(inputs.py, workers.py, sentences.py, writing.py, pipeline.py; this command line: cli.py).

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
import json
import math
import os
import sys
import warnings
from pathlib import Path

from periln_megatron.data.preprocess.inputs import InputError
from periln_megatron.data.preprocess.pipeline import print_summary, run
from periln_megatron.data.preprocess.workers import HF_TYPES
from periln_megatron.data.tokenizers import LOADABLE_TYPES

MAX_CHUNK_BYTES = 1 << 30
MODULE_PROG = "python -m periln_megatron.data.preprocess"


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


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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


def main(argv=None, prog: str | None = None) -> int:
    """The command line (tools/preprocess_data.py, python -m periln_megatron.data.preprocess,
    periln-preprocess): 0 done, 1 bad input (one line), 2 bad flags, 130 interrupted."""
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
    parser = build_parser(prog)
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
