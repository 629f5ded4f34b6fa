#!/usr/bin/env python
"""Evaluate an exported Hugging Face model (tools/convert_to_hf.py) with lm-evaluation-harness.

    python tools/evaluate.py HF_DIR --tasks periln_paper                 # the paper's zero-shot benchmarks
    python tools/evaluate.py HF_DIR --text-file heldout.jsonl            # perplexity of local documents
    python tools/evaluate.py HF_DIR --tasks arc_easy,piqa --text-file docs.txt --output results.json

Runs lm-eval's HFLM (transformers) on CPU or GPU (--device; default cuda when available).

--tasks: lm-eval task or group names, comma-separated; `periln_paper` (tools/lm_eval_tasks/) is
ARC-Easy, ARC-Challenge, HellaSwag, PIQA, SIQA and Winogrande, zero-shot. Their datasets are
downloaded from the Hugging Face Hub on first use and cached under HF_HOME (~/.cache/huggingface);
without network access only a cached dataset loads (HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 stops
the retries), else one line names the dataset and the script exits 2.

--text-file: the local perplexity task `periln_local_ppl` on a file read from disk, no download:
JSONL (one {"text": ...} per line; --text-key for another key) or plain text (documents separated
by blank lines). Each document is scored whole (lm-eval's loglikelihood_rolling): windows of the
model's context, every token predicted once, the first token conditioned on one prefix token
(--prefix-token; default the end-of-document token, which precedes every document in training).
Reported beside lm-eval's word/byte perplexity and bits per byte: tokens, and the token-level NLL
(nats per token, the trainer's loss) and its perplexity. With only --text-file nothing is fetched
from the network (HF_HUB_OFFLINE=1 is set).

Exit status: 0 done; 2 bad arguments, a missing model or file, a dataset that cannot be loaded.
PERILN_DEBUG=1 shows tracebacks. Needs `pip install "lm-eval[hf]"` (in the test extra).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
LOCAL_TASK = "periln_local_ppl"
# lm-eval's own task folders that periln_paper uses: indexing only these takes seconds, the full
# catalogue (thousands of YAML files) much longer; any other name falls back to the full one.
PAPER_TASK_DIRS = ("arc", "hellaswag", "piqa", "siqa", "winogrande")


class EvalError(Exception):
    """One line for the user; exit 2."""


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _split_tasks(values: list[str]) -> list[str]:
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    return list(dict.fromkeys(names))


def _check_model_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise EvalError(f"{path}: {what}: give a Hugging Face model directory (tools/convert_to_hf.py writes one)")


def _local_task_config(text_file: Path, text_key: str) -> dict:
    """The shipped periln_local_ppl.yaml with its data file (and the builder for .txt) set."""
    import yaml

    if not text_file.is_file():
        raise EvalError(f"--text-file {text_file}: not found")
    config = yaml.safe_load((TASKS_DIR / f"{LOCAL_TASK}.yaml").read_text())
    if text_file.suffix in (".jsonl", ".json"):
        with open(text_file, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), None)
        if first is None:
            raise EvalError(f"--text-file {text_file}: no documents")
        try:
            record = json.loads(first)
        except json.JSONDecodeError as e:
            raise EvalError(f"--text-file {text_file}: line 1 is not JSON ({e.msg}); JSONL holds one object per line") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
            raise EvalError(f"--text-file {text_file}: line 1 has no string {text_key!r} (use --text-key)")
        config["dataset_kwargs"] = {"data_files": {"test": str(text_file.resolve())}}
        config["doc_to_target"] = text_key
    else:  # plain text: one document per blank-line separated paragraph
        if not text_file.read_text(encoding="utf-8").strip():
            raise EvalError(f"--text-file {text_file}: no documents")
        config["dataset_path"] = "text"
        config["dataset_kwargs"] = {"data_files": {"test": str(text_file.resolve())}, "sample_by": "paragraph"}
        config["doc_to_target"] = "text"
    return config


def _task_manager(names: list[str]):
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm_eval_tasks = Path(lm_eval.__file__).parent / "tasks"
    narrow = TaskManager(include_path=[str(TASKS_DIR), *(str(lm_eval_tasks / d) for d in PAPER_TASK_DIRS)],
                         include_defaults=False)
    if all(n in narrow.all_tasks for n in names):
        return narrow
    manager = TaskManager(include_path=str(TASKS_DIR))
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise EvalError(f"--tasks: unknown task or group {', '.join(unknown)} (lm-eval {lm_eval.__version__}; "
                        f"`lm_eval ls tasks` lists them; shipped here: periln_paper, {LOCAL_TASK} via --text-file)")
    return manager


def _dataset_error(e: BaseException) -> str | None:
    """The message of a dataset that could not be fetched (offline, no cache), else None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        module = type(e).__module__ or ""
        if isinstance(e, ConnectionError) or module.startswith(("huggingface_hub", "datasets", "requests", "urllib3")):
            return _one_line(e)
        e = e.__cause__ or e.__context__
    return None


def _prefix_token_id(choice: str, config: dict) -> int:
    if choice in ("eos", "bos"):
        value = config.get(f"{choice}_token_id")
        if isinstance(value, list):
            value = value[0] if value else None
        if value is None:
            raise EvalError(f"--prefix-token {choice}: the model's config.json has no {choice}_token_id; give an id")
        return int(value)
    try:
        return int(choice)
    except ValueError:
        raise EvalError(f"--prefix-token: eos, bos or a token id, not {choice!r}") from None


def rolling_token_stats(lm, samples: list[dict]) -> dict:
    """Token-level NLL of a loglikelihood_rolling task from its logged samples: each document's
    loglikelihood (the sum over its tokens, as lm-eval computed it) and its token count (the model's
    tokenizer as HFLM encodes the document: every one of these tokens was predicted once)."""
    documents = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        text = s["arguments"][0][0] if isinstance(s["arguments"][0], (list, tuple)) else s["arguments"][0]
        ll = s["filtered_resps"][0]
        ll = float(ll[0] if isinstance(ll, (list, tuple)) else ll)
        documents.append({"doc_id": s["doc_id"], "tokens": len(lm.tok_encode(text)), "loglikelihood": ll,
                          "bytes": len(text.encode("utf-8"))})
    tokens = sum(d["tokens"] for d in documents)
    nll = -sum(d["loglikelihood"] for d in documents)
    per_token = nll / tokens if tokens else float("nan")
    return {"documents": len(documents), "tokens": tokens, "nll_sum": nll, "token_nll": per_token,
            "token_perplexity": math.exp(per_token) if tokens else float("nan"), "per_document": documents}


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
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="auto", help="weights' dtype for evaluation: auto (config.json's), float32, bfloat16, float16")
    parser.add_argument("--batch-size", default="8", help="batch size, or auto (default 8)")
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
        message = _dataset_error(e)
        if message is None:
            raise
        print(f"evaluate: error: a task's dataset could not be loaded: {message}. The benchmark datasets come from "
              "the Hugging Face Hub on first use (cached under HF_HOME, ~/.cache/huggingface): run once with network "
              "access, then offline with HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 (the --text-file task needs no download)",
              file=sys.stderr, flush=True)
        return 2


def _run(args) -> int:
    names = _split_tasks(args.tasks)
    if LOCAL_TASK in names:
        raise EvalError(f"--tasks {LOCAL_TASK}: give its file with --text-file instead")
    if not names and args.text_file is None:
        raise EvalError("nothing to evaluate: give --tasks (e.g. periln_paper) and/or --text-file")
    _check_model_dir(args.model_dir)
    model_config = json.loads((args.model_dir / "config.json").read_text())
    local = _local_task_config(args.text_file, args.text_key) if args.text_file else None
    if local is not None:
        prefix = _prefix_token_id(args.prefix_token, model_config)
    else:
        prefix = None
    if not names:  # a purely local evaluation never goes to the network
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)

    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise EvalError(f"lm-evaluation-harness is not installed ({e.name or e}): pip install \"lm-eval[hf]\"") from None
    import logging

    import torch

    if not args.verbose:
        for name in ("lm_eval", "lm-eval", "lm_eval.evaluator"):
            logging.getLogger(name).setLevel(logging.WARNING)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    manager = _task_manager(names) if names else _task_manager([])
    lm = HFLM(pretrained=str(args.model_dir), device=device, dtype=args.dtype, batch_size=batch_size,
              prefix_token_id=prefix)
    tasks: list = list(names) + ([local] if local is not None else [])
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, num_fewshot=args.num_fewshot,
                                      limit=args.limit, bootstrap_iters=args.bootstrap_iters, log_samples=True)

    from lm_eval.utils import make_table

    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    token_level = {}
    for task, samples in results.get("samples", {}).items():
        output_type = results["configs"].get(task, {}).get("output_type")
        if output_type == "loglikelihood_rolling":
            token_level[task] = rolling_token_stats(lm, samples)
            s = token_level[task]
            print(f"{task}: {s['documents']} documents, {s['tokens']} tokens, token-level NLL {s['token_nll']:.6f} "
                  f"nats/token (perplexity {s['token_perplexity']:.4f}); first token of each document conditioned "
                  f"on token {lm.prefix_token_id}")
    if args.output:
        out = {"model_dir": str(args.model_dir), "lm_eval_version": lm_eval.__version__, "device": device,
               "prefix_token_id": lm.prefix_token_id, "max_length": lm.max_length,
               "results": results["results"], "groups": results.get("groups", {}),
               "n-shot": results.get("n-shot"), "n-samples": results.get("n-samples"),
               "versions": results.get("versions"), "token_level": token_level}
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(out, indent=2, default=str) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
