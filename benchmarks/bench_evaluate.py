#!/usr/bin/env python
"""Local-document perplexity throughput: the old tools/evaluate.py --text-file path (lm-eval's
loglikelihood_rolling) against the new one (periln_megatron.hf.evaluation's batched windows), side by
side on the same documents and model.

  PYTHONPATH=. python benchmarks/bench_evaluate.py [--tokens 107000] [--model-dir HF_DIR] [--json out.json]

Without --model-dir it builds what tests/test_evaluate.py builds (~1 min): a SentencePiece BPE 1000
tokenizer, 40 steps of recipes/tiny/peri_ln.yaml (276k parameters, context 64) on the training text,
exported with tools/convert_to_hf.py. The documents are the first WikiText-2 test paragraphs
(tests/data) holding about --tokens tokens, scored on CPU with the end-of-document prefix.

Each path runs in a fresh process with the environment the tool gives it (OpenMP reads
OMP_WAIT_POLICY once, when torch loads), timed from the documents in memory to the per-document
log-likelihoods, model loading excluded (lm-eval's time includes building its task and dataset,
part of that path):
  old: lm-eval HFLM + simple_evaluate on periln_local_ppl, batch 8, torch's default threads with
       OpenMP's default (spinning) wait policy: tools/evaluate.py --text-file before issue #22;
  new: evaluation.score_documents with the tool's defaults (batch, forked single-threaded scorers, one
       per core), OMP_WAIT_POLICY=PASSIVE as the tool now sets it.
--busy N keeps N processes spinning meanwhile (cores shared with other work, where the wait policy
matters). The ratio old/new is the headline; --matrix adds the other two combinations (old with PASSIVE, which
is --text-engine lm-eval now, and new with spinning waits) to show what each change contributes.
Every run must agree with the first per document (relative 1e-6) and in token count.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build_model(tmp: Path) -> Path:
    import sentencepiece

    corpus = _load("corpus", REPO / "tests" / "corpus.py")
    py = sys.executable
    spm = tmp / "spm1k.model"
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus.data_file(corpus.TINYSHAKESPEARE)), model_prefix=str(tmp / "spm1k"), vocab_size=1000,
        model_type="bpe", byte_fallback=True, input_sentence_size=20000, shuffle_input_sentence=True,
        minloglevel=2, num_threads=2)
    docs = corpus.wikitext_paragraphs("valid") + corpus.shakespeare_speeches()
    (tmp / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    def step(cmd: list[str]) -> None:
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"bench_evaluate: building the model failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")

    step([py, "tools/preprocess_data.py", "--input", str(tmp / "train.jsonl"), "--output-prefix",
                    str(tmp / "corpus"), "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(spm),
                    "--append-eod", "--workers", "1"])
    step([py, "-m", "periln_megatron.train", "--recipe", "recipes/tiny/peri_ln.yaml", "--set",
                    f"checkpoint.dir={tmp / 'ckpt'}", "data.synthetic=false",
                    f"data.prefixes=[{tmp / 'corpus_text_document'}]", "data.split=98,2,0",
                    "tokenizer.type=SentencePieceTokenizer", f"tokenizer.model={spm}", "model.vocab_size=null",
                    "train.steps=40", "optim.lr=0.01", "checkpoint.interval=0"])
    step([py, "tools/convert_to_hf.py", str(tmp / "ckpt"), str(tmp / "hf"), "--quiet"])
    return tmp / "hf"


def write_documents(model_dir: Path, tokens: int, path: Path) -> None:
    import transformers

    corpus = _load("corpus", REPO / "tests" / "corpus.py")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    docs, total = [], 0
    for d in corpus.wikitext_paragraphs("test"):
        if total >= tokens:
            break
        docs.append(d)
        total += len(tokenizer(d, add_special_tokens=False, verbose=False)["input_ids"])
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))


def worker(path: str, model_dir: Path, docs_file: Path, out: Path) -> None:
    """One path in this (fresh) process; writes its per-document results and seconds to `out`."""
    import torch

    from periln_megatron.hf import evaluation

    docs = evaluation.read_documents(docs_file)
    prefix = json.loads((model_dir / "config.json").read_text())["eos_token_id"]
    if path == "old":
        import logging

        import lm_eval
        from lm_eval.models.huggingface import HFLM

        from periln_megatron.hf import harness

        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        lm = HFLM(pretrained=str(model_dir), device="cpu", batch_size=8, prefix_token_id=prefix)
        start = time.perf_counter()
        results = lm_eval.simple_evaluate(model=lm, tasks=[harness.local_task_config(docs_file, "text")],
                                          task_manager=harness.task_manager([]), log_samples=True)
        stats = harness.rolling_token_stats(lm, results["samples"][evaluation.LOCAL_TASK])
    else:
        model, tokenizer = evaluation.load_model(model_dir, "cpu")
        start = time.perf_counter()
        stats = evaluation.score_documents(model, tokenizer, docs, prefix)
    seconds = time.perf_counter() - start
    out.write_text(json.dumps({"seconds": seconds, "threads": torch.get_num_threads(), "stats": stats}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, help="an exported model with its tokenizer (default: build one)")
    parser.add_argument("--tokens", type=int, default=107_000, help="about this many document tokens (default 107000)")
    parser.add_argument("--matrix", action="store_true", help="also old with PASSIVE waits and new with spinning ones")
    parser.add_argument("--busy", type=int, default=0, metavar="N",
                        help="keep N other processes spinning on the CPU during the runs: cores shared with other "
                             "work, as where issue #22 measured 160 tokens/s (default 0)")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    parser.add_argument("--worker", nargs=4, metavar=("PATH", "MODEL", "DOCS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]), Path(args.worker[2]), Path(args.worker[3]))
        return 0

    runs = [("old", "default"), ("new", "PASSIVE")]
    if args.matrix:
        runs += [("old", "PASSIVE"), ("new", "default")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = args.model_dir or build_model(tmp)
        docs_file = tmp / "docs.jsonl"
        write_documents(model_dir, args.tokens, docs_file)
        load_before = os.getloadavg()[0]
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
        try:
            for path, wait in runs:
                env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
                if wait == "PASSIVE":
                    env["OMP_WAIT_POLICY"] = "PASSIVE"
                out = tmp / f"{path}-{wait}.json"
                subprocess.run([sys.executable, __file__, "--worker", path, str(model_dir), str(docs_file), str(out)],
                               env=env, check=True, stderr=subprocess.DEVNULL)
                rows.append({"path": path, "omp_wait_policy": wait, **json.loads(out.read_text())})
        finally:
            for proc in busy:
                proc.kill()
                proc.wait()

    first = rows[0]["stats"]
    for row in rows:
        s = row.pop("stats")
        assert s["tokens"] == first["tokens"], (row, s["tokens"], first["tokens"])
        for a, b in zip(first["per_document"], s["per_document"], strict=True):
            assert a["tokens"] == b["tokens"] and abs(a["loglikelihood"] - b["loglikelihood"]) <= 1e-6 * abs(a["loglikelihood"]), (row, a, b)
        row.update(tok_s=round(s["tokens"] / row["seconds"]), token_nll=s["token_nll"], seconds=round(row["seconds"], 3))
    print(f"{first['documents']} documents, {first['tokens']} tokens, CPU, {os.cpu_count()} cores, "
          f"{args.busy} spinning processes, 1-minute load average {load_before:.1f} before the runs, {os.getloadavg()[0]:.1f} after")
    names = {"old": "old: lm-eval loglikelihood_rolling, batch 8", "new": "new: evaluation.score_documents, batched"}
    for row in rows:
        print(f"{names[row['path']]:45s} OMP_WAIT_POLICY={row['omp_wait_policy']:8s} threads {row['threads']}  "
              f"{row['seconds']:9.2f} s {row['tok_s']:9d} tok/s  token NLL {row['token_nll']:.6f}")
    ratio = rows[0]["seconds"] / rows[1]["seconds"]
    print(f"ratio new/old (the tool before and after): {ratio:.1f}x")
    if args.matrix:
        print(f"  same wait policy: PASSIVE {rows[2]['seconds'] / rows[1]['seconds']:.1f}x, "
              f"default {rows[0]['seconds'] / rows[3]['seconds']:.1f}x")
    if args.json:
        args.json.write_text(json.dumps({"tokens": first["tokens"], "documents": first["documents"], "busy": args.busy,
                                         "ratio": round(ratio, 1), "runs": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
