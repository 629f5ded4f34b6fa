"""Train a SentencePiece tokenizer (BPE or unigram) from JSONL or plain-text files.

  python tools/train_tokenizer.py --input data/*.jsonl.gz --json-key text \\
      --model-prefix tokenizers/spm32k --vocab-size 32000 --model-type bpe

The same command: `python -m periln_megatron.data.tokenizers.train ...` or `periln-train-tokenizer ...`
(periln_megatron/data/tokenizers/train.py).

Writes PREFIX.model, PREFIX.vocab and PREFIX.json (the settings and corpus it was trained with).
Byte fallback is on by default (no <unk> for unseen characters). Ids: 0 <unk>, 1 <s>, 2 </s>
(the end-of-document token for preprocess_data.py --append-eod), then --special-tokens
(control symbols, never produced from text) and --user-defined-symbols (always one piece).
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import sys
import time
from pathlib import Path

MODULE_PROG = "python -m periln_megatron.data.tokenizers.train"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="training files: .jsonl/.json (optionally .gz) read through --json-key, anything else "
                        "as plain text, one sentence per line")
    p.add_argument("--json-key", default="text", help="key holding the text in JSONL files (default: text)")
    p.add_argument("--model-prefix", required=True, help="output path without suffix (writes .model/.vocab/.json)")
    p.add_argument("--vocab-size", type=int, required=True, help="number of pieces, special tokens included")
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--no-byte-fallback", dest="byte_fallback", action="store_false",
                   help="turn off byte fallback (unseen characters then become <unk>)")
    p.add_argument("--special-tokens", nargs="*", default=[], metavar="TOK",
                   help="extra control tokens (ids right after </s>), e.g. <|pad|> <|sep|>")
    p.add_argument("--user-defined-symbols", nargs="*", default=[], metavar="SYM",
                   help="strings always kept as a single piece when they occur in text")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--normalization", default="identity",
                   help="SentencePiece normalization rule: identity (default: characters kept as they are), nfkc, "
                        "nmt_nfkc; whitespace is handled by --remove-extra-whitespaces")
    p.add_argument("--remove-extra-whitespaces", action=argparse.BooleanOptionalAction, default=True,
                   help="SentencePiece's remove_extra_whitespaces, stored in the model, so it applies when text is "
                        "encoded too: leading, trailing and repeated spaces are dropped (indentation and runs of "
                        "spaces do not survive encode/decode). Default: on (SentencePiece's default, and the "
                        "tokenizers trained here so far). --no-remove-extra-whitespaces keeps every space (round "
                        "trip exact up to normalization); preprocess_data.py then encodes without its segment "
                        "cache, more slowly")
    p.add_argument("--max-sentence-length", type=int, default=16384, help="longer lines are skipped by the trainer")
    p.add_argument("--input-sentence-size", type=int, default=2_000_000,
                   help="sentences sampled for training (0: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="seed of SentencePiece's sentence sampling")
    return p


def _lines(path: Path, json_key: str):
    """Training sentences of one file; JSONL documents are cut into their lines. ValueError naming
    the file (and line) for anything that is not text to train on."""
    try:
        yield from _read_lines(path, json_key)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason}, byte 0x{exc.object[exc.start]:02x})") from None
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: cannot read: {exc}") from None


def _read_lines(path: Path, json_key: str):
    name = path.name
    is_json = _is_json(path)
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="strict") as f:
        for lineno, line in enumerate(f, start=1):
            if not is_json:
                if line.strip():
                    yield line.rstrip("\n")
                continue
            if not line.strip():
                continue
            try:
                text = json.loads(line)[json_key]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: cannot read key {json_key!r}: {type(exc).__name__}: {exc}") from None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: key {json_key!r} holds {type(text).__name__}, not a string")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:  # a \ud800 escape: SentencePiece cannot take the str
                raise ValueError(f"{path}:{lineno}: key {json_key!r} holds a lone surrogate "
                                 f"(U+{ord(text[exc.start]):04X} at character {exc.start}): not Unicode text") from None
            yield from (s for s in text.split("\n") if s.strip())


def _is_json(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz"))


def _one_line(exc: Exception) -> str:
    """SentencePiece's message without the pybind "At:" frames, on one line."""
    return " ".join(str(exc).split("\n\nAt:")[0].split())


def main(argv=None, prog: str | None = None) -> int:
    """The command line (tools/train_tokenizer.py, python -m periln_megatron.data.tokenizers.train,
    periln-train-tokenizer): 0 done, 1 bad input (one line), 2 bad flags."""
    args = build_parser(prog).parse_args(argv)
    import sentencepiece as spm

    files = [Path(p) for p in args.input]
    for f in files:
        if not f.is_file():
            print(f"error: {f}: no such file", file=sys.stderr)
            return 1
    overlap = set(args.special_tokens) & set(args.user_defined_symbols)
    if overlap:
        print(f"error: {sorted(overlap)} given both as special tokens and user-defined symbols", file=sys.stderr)
        return 2
    settings = dict(
        model_type=args.model_type, vocab_size=args.vocab_size, byte_fallback=args.byte_fallback,
        character_coverage=args.character_coverage, normalization_rule_name=args.normalization,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, control_symbols=list(args.special_tokens),
        user_defined_symbols=list(args.user_defined_symbols), max_sentence_length=args.max_sentence_length,
        input_sentence_size=args.input_sentence_size, shuffle_input_sentence=True, num_threads=args.threads,
        split_digits=True, allow_whitespace_only_pieces=False, remove_extra_whitespaces=args.remove_extra_whitespaces,
        hard_vocab_limit=True,
    )
    prefix = Path(args.model_prefix)
    counts = {"sentences": 0, "characters": 0}
    failure: list[Exception] = []  # an input error raised inside SentencePiece's iterator

    def sentences():
        try:
            for f in files:
                for s in _lines(f, args.json_key):
                    counts["sentences"] += 1
                    counts["characters"] += len(s)
                    yield s
        except ValueError as exc:
            failure.append(exc)  # SentencePiece re-raises it as "INTERNAL: ... At: <frames>"
            raise

    stream = sentences()
    try:
        first = next(stream, None)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if first is None:
        print(f"error: {', '.join(map(str, files))}: no text to train on (every line blank"
              f"{f', or its {args.json_key!r} empty' if any(_is_json(f) for f in files) else ''})",
              file=sys.stderr)
        return 1
    created = [d for d in (prefix.parent, *prefix.parent.parents) if not d.exists()]
    prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(args.seed)
    start = time.time()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=itertools.chain([first], stream),
                                       model_prefix=str(prefix), minloglevel=2, **settings)
    except (ValueError, RuntimeError, OSError) as exc:
        for d in created:  # deepest first; only what this run made, and only if still empty
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        print(f"error: {failure[0] if failure else _one_line(exc)}", file=sys.stderr)
        return 1
    model = Path(str(prefix) + ".model")
    sp = spm.SentencePieceProcessor(model_file=str(model))
    record = {
        "model": model.name, "trainer": f"sentencepiece {spm.__version__}", "settings": settings,
        "seed": args.seed, "inputs": [str(f) for f in files], "json_key": args.json_key, **counts,
        "vocab_size": sp.get_piece_size(), "eod_id": sp.eos_id(),
        "special_ids": {sp.id_to_piece(i): i for i in range(sp.get_piece_size())
                        if sp.is_control(i) or sp.is_unknown(i)},
        "user_defined_ids": {s: sp.piece_to_id(s) for s in args.user_defined_symbols},
        "seconds": round(time.time() - start, 2),
    }
    Path(str(prefix) + ".json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {model} ({record['vocab_size']} pieces, {args.model_type}, byte fallback "
          f"{'on' if args.byte_fallback else 'off'}) from {counts['sentences']:,} sentences in "
          f"{record['seconds']} s; settings in {prefix}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(prog=MODULE_PROG))
