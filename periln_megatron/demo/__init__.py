"""`make demo`: Peri-LN against Pre-LN in miniature, on CPU, end to end with the project's own tools.

1. a corpus from text already on this machine (the Python standard library's docstrings), or --input;
   every 50th document is held back: the sample prompt is the start of one of them;
2. a SentencePiece tokenizer and a megatron indexed dataset (python -m periln_megatron.data.tokenizers.train
   and python -m periln_megatron.data.preprocess: tools/train_tokenizer.py's and preprocess_data.py's commands);
3. a deep, narrow Peri-LN model and the same Pre-LN model, same data, same seed, one process each
   (python -m periln_megatron.train; progress is read from each run's metrics.jsonl), --jobs of them
   at a time (default: one per core); --seeds and --sweep add runs;
4. real megatron-core parallelism: Peri-LN's final checkpoint, resharded to PP=2 over 2 processes,
   must evaluate to the validation loss the single process measured;
5. validation losses, per-layer diagnostics from layer 0 (the embedding output) on, plots, and report.md:
   a verdict per paper finding (shown, not shown: within the noise, or contradicted) with the statistic
   it follows from, per-run stability figures, and the machine's matmul throughput;
6. an export check: the Peri-LN checkpoint exported to Hugging Face, loaded with stock transformers,
   sampled greedily, and the prompt's document checked for near-copies in the training text.

Everything lands in --out (relative to the current directory). Re-running resumes: finished stages and
runs are kept, an unfinished run continues from its checkpoint. --fresh starts over. The budget: the
default preset takes about 14 CPU-minutes, 7m41s measured on 2 idle cores of the slower machine measured
(docs/demo_search.md has the measurements behind it). No checkout is needed: the base recipe ships in the package (demo/recipe.yaml)
and every tool runs as a package module, so `pip install .` then `python -m periln_megatron.demo` works
from any directory.
"""

# The rooms: corpus.py (text, held-back documents, tokenizer, indexed dataset), runner.py (the training
# processes, --jobs at a time, and the parallelism check), summary.py (one run directory's numbers),
# findings.py (one function per paper finding; the judging is periln_megatron/verdicts/), sample.py (HF
# export, greedy sample), machine.py (the GEMM benchmark), report.py (report.md, summary.json),
# __main__.py (the command line).
