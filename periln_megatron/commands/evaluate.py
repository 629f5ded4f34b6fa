"""Evaluate an exported Hugging Face model (tools/convert_to_hf.py): lm-evaluation-harness tasks, local perplexity.

    python tools/evaluate.py HF_DIR --tasks periln_paper                 # the paper's zero-shot benchmarks
    python tools/evaluate.py HF_DIR --text-file heldout.jsonl            # perplexity of local documents
    python tools/evaluate.py HF_DIR --tasks arc_easy,piqa --text-file docs.txt --output results.json
    (or `periln-evaluate` instead of `python tools/evaluate.py`: the same command)

Runs the model in transformers (lm-eval's HFLM for --tasks) on CPU or GPU (--device; default cuda when available).

--tasks: lm-eval task or group names, comma-separated; `periln_paper` (tools/lm_eval_tasks/) is
ARC-Easy, ARC-Challenge, HellaSwag, PIQA, SIQA and Winogrande, zero-shot. Their datasets are
downloaded from the Hugging Face Hub on first use and cached under HF_HOME (~/.cache/huggingface);
without network access only a cached dataset loads (HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 stops
the retries), else one line names the dataset and the script exits 2.

--text-file: perplexity of local documents read from disk, no download: JSONL (one {"text": ...}
per line; --text-key for another key) or plain text (documents separated by blank lines). Each
document is scored whole in lm-eval's loglikelihood_rolling windows of the model's context, every
token predicted once, the first token conditioned on one prefix token (--prefix-token; default
the end-of-document token, which precedes every document in training), by batched forward passes
(periln_megatron.hf.evaluation; --text-engine lm-eval runs the harness's own task periln_local_ppl
instead, 3-5x slower, the same numbers: benchmarks/RESULTS_evaluate.md). Reported: tokens, the
token-level NLL (nats per token, the trainer's loss) and its perplexity, and lm-eval's word/byte
perplexity and bits per byte. With only --text-file nothing is fetched from the network
(HF_HUB_OFFLINE=1 is set).

On CPU the tool sets OMP_WAIT_POLICY=PASSIVE unless it is set (docs/evaluation.md: spinning OpenMP
threads made scoring on cores busy with other work ~9x slower).

Exit status: 0 done; 2 bad arguments, a missing model or file, a file that is not UTF-8, a dataset
that cannot be loaded. PERILN_DEBUG=1 shows tracebacks. --tasks and --text-engine lm-eval need
`pip install "lm-eval[hf]"` (in the test extra).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from periln_megatron.cli import positive_int
from periln_megatron.hf import evaluation, harness
from periln_megatron.hf.evaluation import LOCAL_TASK, EvalError


def _split_tasks(values: list[str]) -> list[str]:
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    return list(dict.fromkeys(names))


def _check_model_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise EvalError(f"{path}: {what}: give a Hugging Face model directory (tools/convert_to_hf.py writes one)")


def _prefix_token_id(choice: str, config: dict) -> int:
    if choice in ("eos", "bos"):
        value = config.get(f"{choice}_token_id")
        if isinstance(value, list):
            value = value[0] if value else None
        if value is None:
            raise EvalError(f"--prefix-token {choice}: the model's config.json has no {choice}_token_id; give an id")
        value = int(value)
    else:
        try:
            value = int(choice)
        except ValueError:
            raise EvalError(f"--prefix-token: eos, bos or a token id, not {choice!r}") from None
    if isinstance(config.get("vocab_size"), int):
        evaluation.check_prefix_token(value, choice, config["vocab_size"])
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="Hugging Face model directory (tools/convert_to_hf.py output)")
    parser.add_argument("--tasks", action="append", default=[], metavar="NAMES",
                        help="lm-eval task/group names, comma-separated (repeatable), e.g. periln_paper or arc_easy,piqa")
    parser.add_argument("--text-file", type=Path, help="local documents for the perplexity task: .jsonl or plain text")
    parser.add_argument("--text-key", default="text", help="JSONL key holding each document (default: text)")
    parser.add_argument("--prefix-token", default="eos", metavar="eos|bos|ID",
                        help="token each document's first token is conditioned on in the perplexity task "
                             "(default eos: the end-of-document token that precedes documents in training; "
                             "lm-eval's own default is bos)")
    parser.add_argument("--text-engine", choices=("batched", "lm-eval"), default="batched",
                        help="how --text-file is scored: batched windows (default) or lm-eval's own "
                             "loglikelihood_rolling task, far slower, for cross-checks")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="auto", help="weights' dtype for evaluation: auto (config.json's), float32, bfloat16, float16")
    parser.add_argument("--batch-size", help="lm-eval's batch size, or auto (default 8); for --text-file, windows per "
                        "forward pass (default: 4096 tokens' worth on a CPU, 16384 on a GPU, fewer for a large vocabulary)")
    parser.add_argument("--workers", type=positive_int, help="--text-file on a CPU: forked single-threaded scoring "
                        "processes (default: one per core, at most 4; 1: score in this process)")
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own; 0 for periln_paper)")
    parser.add_argument("--limit", type=float, help="only the first N documents of each task (a fraction if < 1); for smoke tests")
    parser.add_argument("--bootstrap-iters", type=int, default=1000,
                        help="bootstrap resamples for stderr of non-mean metrics such as perplexity (default 1000; 0: none)")
    parser.add_argument("--output", type=Path, help="write results (lm-eval's, plus token-level NLL) as JSON here")
    parser.add_argument("--verbose", action="store_true", help="lm-eval's INFO logging")
    args = parser.parse_args(argv)

    try:
        return _run(args)
    except EvalError as e:
        print(f"evaluate: error: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:  # noqa: BLE001
        if os.environ.get("PERILN_DEBUG"):
            raise
        message = harness.dataset_error(e)
        if message is None:
            raise
        print(f"evaluate: error: a task's dataset could not be loaded: {message}. The benchmark datasets come from "
              "the Hugging Face Hub on first use (cached under HF_HOME, ~/.cache/huggingface): run once with network "
              "access, then offline with HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 (the --text-file task needs no download)",
              file=sys.stderr, flush=True)
        return 2


def _batch_size(value: str | None):
    if value is None or value == "auto":
        return value
    try:
        if int(value) >= 1:
            return int(value)
    except ValueError:
        pass
    raise EvalError(f"--batch-size {value}: a positive integer or auto")


def _run(args) -> int:
    names = _split_tasks(args.tasks)
    if LOCAL_TASK in names:
        raise EvalError(f"--tasks {LOCAL_TASK}: give its file with --text-file instead")
    if not names and args.text_file is None:
        raise EvalError("nothing to evaluate: give --tasks (e.g. periln_paper) and/or --text-file")
    _check_model_dir(args.model_dir)
    model_config = json.loads((args.model_dir / "config.json").read_text())
    documents = prefix = None
    if args.text_file is not None:
        documents = evaluation.limit_documents(evaluation.read_documents(args.text_file, args.text_key), args.limit)
        prefix = _prefix_token_id(args.prefix_token, model_config)
    batch_size = _batch_size(args.batch_size)
    via_lm_eval = bool(names) or (documents is not None and args.text_engine == "lm-eval")
    if via_lm_eval:
        try:
            import lm_eval  # noqa: F401
        except ImportError as e:
            raise EvalError(f"lm-evaluation-harness is not installed ({e.name or e}): "
                            "pip install \"lm-eval[hf]\"") from None
    if not names:  # a purely local evaluation never goes to the network
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    evaluation.passive_omp_wait()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = {"model_dir": str(args.model_dir), "device": device, "prefix_token_id": prefix, "results": {}, "groups": {},
           "token_level": {}}
    if documents is not None and args.text_engine == "batched":
        local = evaluation.evaluate_documents(args.model_dir, documents, prefix, device, args.dtype,
                                              None if batch_size == "auto" else batch_size, args.workers)
        out.update(text_engine="batched", max_length=local["max_length"])
        out["results"].update(local["results"])
        out["token_level"].update(local["token_level"])
        metrics = local["results"][LOCAL_TASK]
        print(f"{LOCAL_TASK}: bits_per_byte {metrics['bits_per_byte,none']:.4f}, byte_perplexity "
              f"{metrics['byte_perplexity,none']:.4f}, word_perplexity {metrics['word_perplexity,none']:.4f}; "
              f"scored in {local['seconds']:.1f} s "
              f"({local['token_level'][LOCAL_TASK]['tokens'] / max(local['seconds'], 1e-9):.0f} tokens/s, "
              f"{local['token_level'][LOCAL_TASK]['workers']} process(es))")
    if via_lm_eval:
        harness.run_lm_eval(args, names, device, prefix, batch_size, out)
    for task, s in out["token_level"].items():
        print(f"{task}: {s['documents']} documents, {s['tokens']} tokens, token-level NLL {s['token_nll']:.6f} "
              f"nats/token (perplexity {s['token_perplexity']:.4f}); first token of each document conditioned "
              f"on token {prefix}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(out, indent=2, default=str) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
