"""The demo's text: a corpus (the standard library's docstrings, or --input), every HOLD_BACK_EVERY-th
document held back for the sample prompt, a SentencePiece tokenizer and a megatron indexed dataset
(made by the package's tokenizer and preprocessing modules), and the corpus's statistics."""

from __future__ import annotations

import ast
import json
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from periln_megatron.demo.console import log
from periln_megatron.demo.runner import run_module

CORPUS_BYTES = 3_000_000
HOLD_BACK_EVERY = 50  # every 50th document is held back from the corpus (the sample prompt's source)
PROMPT_WORDS = 4


def stdlib_docstrings(limit: int = CORPUS_BYTES):
    """Module, class and function docstrings of the installed standard library, in path order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(stdlib.rglob("*.py")):
        parts = set(path.relative_to(stdlib).parts)
        if parts & {"test", "tests", "site-packages", "idle_test", "lib2to3"}:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200:
                    yield doc
                    total += len(doc.encode())
                    if total >= limit:
                        return


def user_documents(paths: list[str]):
    """JSONL (a "text" field) or plain text, split into documents at blank lines."""
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise SystemExit(f"demo: --input {path}: file not found")
        if path.suffix in (".jsonl", ".json"):
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        yield json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise SystemExit(f"demo: {path}:{n}: expected a JSON object with a text field ({e})")
        else:
            for block in path.read_text(encoding="utf-8").split("\n\n"):
                if block.strip():
                    yield block.strip()


def build_corpus(out: Path, inputs: list[str] | None) -> tuple[Path, Path]:
    """corpus.jsonl (the training and validation text) and heldout.jsonl (every HOLD_BACK_EVERY-th document)."""
    corpus, heldout = out / "corpus.jsonl", out / "heldout.jsonl"
    if corpus.exists() and heldout.exists():
        log(f"corpus: {corpus} exists, kept")
        return corpus, heldout
    docs = list(user_documents(inputs) if inputs else stdlib_docstrings())
    if len(docs) < 50:
        raise SystemExit(f"demo: only {len(docs)} documents found; give more text with --input")
    held = [d for i, d in enumerate(docs) if i % HOLD_BACK_EVERY == HOLD_BACK_EVERY - 1]
    kept = [d for i, d in enumerate(docs) if i % HOLD_BACK_EVERY != HOLD_BACK_EVERY - 1]
    for path, part in ((heldout, held), (corpus, kept)):  # corpus last: its presence means both are complete
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in part:
                f.write(json.dumps({"text": doc}) + "\n")
        tmp.rename(path)
    log(f"corpus: {len(kept)} documents, {corpus.stat().st_size / 1e6:.1f} MB from {corpus_note(inputs)}; "
        f"{len(held)} more held back for the sample prompt")
    return corpus, heldout


PLAIN_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*[.,;:]?")


def heldout_document(heldout: Path, number: int) -> str:
    return json.loads(heldout.read_text(encoding="utf-8").splitlines()[number])["text"]


def sample_prompt(heldout: Path, words: int = PROMPT_WORDS) -> tuple[str, str, int]:
    """(prompt, what the document says next, document number): the first `words` words of the first
    held-back document that begins with that many plain words (letters, no code), else of the first
    document longer than that."""
    docs = [json.loads(line)["text"].split() for line in heldout.read_text(encoding="utf-8").splitlines()]
    long_enough = [n for n, text in enumerate(docs) if len(text) > words]
    if not long_enough:
        raise SystemExit(f"demo: no held-back document in {heldout} has more than {words} words")
    plain = [n for n in long_enough if all(PLAIN_WORD.fullmatch(w) for w in docs[n][:words])]
    n = (plain or long_enough)[0]
    return " ".join(docs[n][:words]), " ".join(docs[n][words:words + 16]), n


NEAR_DUPLICATE_N = 8  # word n-grams shared with a training document


def _ngrams(text: str, n: int) -> set:
    words = text.split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def near_duplicates(doc: str, corpus: Path, n: int = NEAR_DUPLICATE_N) -> dict:
    """How much of `doc` the training text already holds: the share of its word n-grams found in the
    single most similar document of `corpus` (jsonl), that document's number (from 0), and the share
    found anywhere in it. No n-gram (a document under n words): shares None."""
    grams = _ngrams(doc, n)
    best, where, seen = 0, None, set()
    if grams:
        for number, line in enumerate(corpus.read_text(encoding="utf-8").splitlines()):
            shared = grams & _ngrams(json.loads(line)["text"], n)
            seen |= shared
            if len(shared) > best:
                best, where = len(shared), number
    total = len(grams)
    return {"n": n, "ngrams": total, "share": best / total if total else None, "doc": where,
            "anywhere": len(seen) / total if total else None}


@dataclass
class CorpusStats:
    documents: int
    tokens: int
    train_documents: int
    train_tokens: int
    valid_tokens: int
    unigram_valid_loss: float  # cross-entropy of the validation split under the training split's unigram frequencies


def split_bounds(split: list[float], n: int) -> list[int]:
    """The document index bounds of the train / valid / test splits of `n` documents, as megatron-core
    computes them (BlendedMegatronDatasetBuilder: round(cumulative fraction x n))."""
    total, cumulative, bounds = sum(split), 0.0, [0]
    for s in split:
        cumulative += s / total
        bounds.append(int(round(cumulative * float(n))))
    return bounds


def corpus_stats(prefix: Path, split: list[float], vocab: int) -> CorpusStats:
    import numpy as np

    from periln_megatron.data.indexed import read_index_header, verified_sequence_lengths

    docs, lengths = verified_sequence_lengths(prefix)
    dtype, _, _ = read_index_header(prefix.with_suffix(".idx"))
    tokens = np.memmap(prefix.with_suffix(".bin"), dtype=dtype, mode="r")
    bounds = split_bounds(split, docs)
    offsets = np.concatenate(([0], np.cumsum(lengths, dtype=np.int64)))
    train_end, valid_end = int(offsets[bounds[1]]), int(offsets[bounds[2]])
    counts = np.bincount(tokens[:train_end], minlength=vocab).astype(np.float64) + 1.0  # add-one smoothing
    logp = np.log(counts / counts.sum())
    valid = np.asarray(tokens[train_end:valid_end], dtype=np.int64)
    unigram = float(-logp[valid].mean()) if len(valid) else float("nan")
    return CorpusStats(docs, int(offsets[-1]), bounds[1], train_end, valid_end - train_end, unigram)



def corpus_note(inputs: list[str] | None) -> str:
    return ", ".join(inputs) if inputs else f"docstrings of Python {sys.version.split()[0]}'s standard library"


def tokenize(out: Path, corpus: Path, vocab_size: int) -> tuple[Path, Path]:
    """(the SentencePiece model, the indexed dataset's prefix), each made once: kept when it exists."""
    tok = out / "tokenizer" / "spm"
    if not tok.with_suffix(".model").exists():
        run_module("train_tokenizer", ["--input", corpus, "--model-prefix", tok, "--vocab-size", vocab_size,
                                       "--model-type", "bpe", "--normalization", "nmt_nfkc"],
                   "training a SentencePiece BPE tokenizer")  # nmt_nfkc: what HF's fast tokenizer reproduces
    prefix = out / "data" / "corpus_text_document"
    if not prefix.with_suffix(".idx").exists():
        run_module("preprocess_data", ["--input", corpus, "--output-prefix", out / "data" / "corpus",
                                       "--tokenizer-type", "SentencePieceTokenizer",
                                       "--tokenizer-model", tok.with_suffix(".model"), "--append-eod",
                                       "--workers", "2"],
                   "tokenising the corpus into a megatron indexed dataset")
    return tok.with_suffix(".model"), prefix
