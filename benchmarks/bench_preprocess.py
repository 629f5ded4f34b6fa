#!/usr/bin/env python
"""Preprocessing throughput: tools/preprocess_data.py vs a re-creation of Megatron-LM's.

  python benchmarks/bench_preprocess.py [--workers 1 2] [--repeats 3] [--json results.json]

Builds a JSONL from the text carried in tests/data, read through tests/corpus.py (tinyshakespeare
speeches, WikiText-2 valid+test paragraphs), trains a SentencePiece BPE 8k tokenizer on those three
files with tools/train_tokenizer.py (periln_megatron.data.tokenizers.train), then, for each worker
count, alternates runs of
  * reference: Megatron-LM tools/preprocess_data.py (core_v0.16.1) as it works: text-mode file
    iterated line by line into multiprocessing.Pool.imap(encode, lines, chunksize=25); each worker
    json.loads one line and calls megatron-core's SentencePieceTokenizer.text_to_ids on it, appends
    EOD, returns Python lists (pickled back); the main process calls builder.add_document per doc.
  * ours: periln_megatron.data.preprocess.run, what tools/preprocess_data.py runs (blocks of lines,
    batched + word-cached encoding, numpy results, contiguous writes).
Both run in this process with imports already done, timed from pool start to the finalized
files. Best of --repeats is reported. The two outputs must be byte-identical (same ids, same
index), which also checks the round trip against the tokenizer's own encoding.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import multiprocessing
import resource
import importlib.util
import sys
import tempfile
import time
import warnings
from pathlib import Path

from periln_megatron.data import preprocess as preprocess_data
from periln_megatron.data.tokenizers import train as train_tokenizer

REPO = Path(__file__).resolve().parents[1]
warnings.filterwarnings("ignore")


def _load_corpus_reader():
    """tests/corpus.py (the reader of the text carried in tests/data), loaded by its path."""
    spec = importlib.util.spec_from_file_location("periln_test_corpus", REPO / "tests" / "corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


corpus = _load_corpus_reader()

REFERENCE_MB_S = 3.0  # Megatron-LM tools/preprocess_data.py, 2 workers, these 2-core machines
TOKENIZER_FILES = (corpus.TINYSHAKESPEARE, corpus.WIKITEXT2_VALID, corpus.WIKITEXT2_TEST)


def build_corpus(path: Path) -> int:
    docs = corpus.shakespeare_speeches() + corpus.wikitext_paragraphs("valid") + corpus.wikitext_paragraphs("test")
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return len(docs)


# ---------------------------------------------------------------- Megatron-LM re-creation
class RefEncoder:
    def __init__(self, model, append_eod=True):
        self.model, self.append_eod = model, append_eod

    def initializer(self):
        from megatron.core.tokenizers.text.libraries.sentencepiece_tokenizer import SentencePieceTokenizer

        RefEncoder.tokenizer = SentencePieceTokenizer(self.model)

    def encode(self, json_line):
        data = json.loads(json_line)
        ids, lens = {}, {}
        for key in ("text",):
            text = data[key]
            sentences = text if isinstance(text, list) else [text]
            doc_ids, sentence_lens = [], []
            for sentence in sentences:
                sentence_ids = RefEncoder.tokenizer.text_to_ids(sentence)
                if len(sentence_ids) > 0:
                    doc_ids.extend(sentence_ids)
                    sentence_lens.append(len(sentence_ids))
            if len(doc_ids) > 0 and self.append_eod:
                doc_ids.append(RefEncoder.tokenizer.eos_id)
                sentence_lens[-1] += 1
            ids[key], lens[key] = doc_ids, sentence_lens
        return ids, lens, len(json_line)


def run_reference(jsonl: Path, model: str, prefix: str, workers: int) -> dict:
    from megatron.core.datasets import indexed_dataset
    from megatron.core.tokenizers.text.libraries.sentencepiece_tokenizer import SentencePieceTokenizer

    start = time.perf_counter()
    vocab = SentencePieceTokenizer(model).vocab_size
    encoder = RefEncoder(model)
    with open(jsonl, "r", encoding="utf-8") as fin:
        pool = multiprocessing.get_context("fork").Pool(workers, initializer=encoder.initializer)
        encoded = pool.imap(encoder.encode, fin, 25)
        builder = indexed_dataset.IndexedDatasetBuilder(
            prefix + ".bin", dtype=indexed_dataset.DType.optimal_dtype(vocab))
        total_bytes = docs = tokens = 0
        for doc, sentence_lens, nbytes in encoded:
            total_bytes += nbytes
            for key in doc:
                builder.add_document(doc[key], sentence_lens[key])
                docs += 1
                tokens += len(doc[key])
        builder.finalize(prefix + ".idx")
        pool.close()
        pool.join()
    return {"seconds": time.perf_counter() - start, "documents": docs, "tokens": tokens}


# ---------------------------------------------------------------- ours
def run_ours(jsonl: Path, model: str, out_prefix: str, workers: int) -> dict:
    args = preprocess_data.build_parser().parse_args([
        "--input", str(jsonl), "--output-prefix", out_prefix, "--tokenizer-type", "SentencePieceTokenizer",
        "--tokenizer-model", model, "--workers", str(workers), "--append-eod", "--quiet"])
    start = time.perf_counter()
    stats = preprocess_data.run(args)
    return {"seconds": time.perf_counter() - start, "documents": stats["documents"], "tokens": stats["tokens"]}


def cpu_seconds() -> float:
    """CPU time of this process plus its waited-for children (the pool workers): robust to a busy machine."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", help="keep corpus, tokenizer and outputs here (default: a temporary directory)")
    p.add_argument("--json", help="write the results as JSON here")
    args = p.parse_args(argv)
    import megatron.core.datasets.indexed_dataset  # noqa: F401  import cost outside the timings
    import megatron.core.tokenizers.text.libraries.sentencepiece_tokenizer  # noqa: F401

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        jsonl = work / "corpus.jsonl"
        ndocs = build_corpus(jsonl)
        mb = jsonl.stat().st_size / 1e6
        rc = train_tokenizer.main(["--input", *(str(corpus.data_file(n)) for n in TOKENIZER_FILES),
                                   "--model-prefix", str(work / "bpe8k"), "--vocab-size", "8000", "--model-type", "bpe"])
        if rc:
            return rc
        model = str(work / "bpe8k.model")
        print(f"corpus: {jsonl.stat().st_size:,} bytes of JSONL, {ndocs:,} documents "
              f"(mean {mb * 1e6 / ndocs:.0f} bytes); tokenizer: SentencePiece BPE 8000, byte fallback")
        results = []
        for workers in args.workers:
            best = {"reference": None, "ours": None}
            for rep in range(args.repeats):
                for name, fn in (("reference", run_reference), ("ours", run_ours)):
                    cpu = cpu_seconds()
                    r = fn(jsonl, model, str(work / f"{name}_w{workers}_text_document" if name == "reference"
                                           else work / f"{name}_w{workers}"), workers)
                    r["cpu_s"] = cpu_seconds() - cpu
                    if best[name] is None or r["seconds"] < best[name]["seconds"]:
                        best[name] = r
            ref_prefix, our_prefix = work / f"reference_w{workers}_text_document", work / f"ours_w{workers}_text_document"
            identical = all(filecmp.cmp(f"{ref_prefix}{s}", f"{our_prefix}{s}", shallow=False) for s in (".bin", ".idx"))
            ref, ours = best["reference"], best["ours"]
            row = {"workers": workers, "json_mb": round(mb, 3), "documents": ours["documents"], "tokens": ours["tokens"],
                   "reference_s": round(ref["seconds"], 3), "ours_s": round(ours["seconds"], 3),
                   "reference_mb_s": round(mb / ref["seconds"], 2), "ours_mb_s": round(mb / ours["seconds"], 2),
                   "reference_tokens_s": round(ref["tokens"] / ref["seconds"]),
                   "ours_tokens_s": round(ours["tokens"] / ours["seconds"]),
                   "speedup_vs_reference_run": round(ref["seconds"] / ours["seconds"], 2),
                   "ratio_vs_stated_3.0_mb_s": round(mb / ours["seconds"] / REFERENCE_MB_S, 2),
                   "reference_cpu_s": round(ref["cpu_s"], 2), "ours_cpu_s": round(ours["cpu_s"], 2),
                   "outputs_identical": identical}
            results.append(row)
            print(f"workers={workers}: reference {row['reference_mb_s']:.2f} MB/s ({row['reference_tokens_s']:,} tok/s) | "
                  f"ours {row['ours_mb_s']:.2f} MB/s ({row['ours_tokens_s']:,} tok/s) | "
                  f"x{row['speedup_vs_reference_run']:.2f} vs reference run, x{row['ratio_vs_stated_3.0_mb_s']:.2f} "
                  f"vs stated {REFERENCE_MB_S} MB/s | CPU s: reference {row['reference_cpu_s']}, ours {row['ours_cpu_s']} | "
                  f"outputs byte-identical: {identical}", flush=True)
            if not identical:
                print("ERROR: outputs differ from the reference", file=sys.stderr)
                return 1
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
