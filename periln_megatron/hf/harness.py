"""tools/evaluate.py's lm-evaluation-harness side: the task manager (periln_paper and the local
perplexity task from tools/lm_eval_tasks/), HFLM + simple_evaluate, token-level NLL from the logged
samples of a loglikelihood_rolling task, and which exception means "a dataset could not be fetched".
lm-eval is imported only inside these functions (it is optional)."""

from __future__ import annotations

from pathlib import Path

from periln_megatron.hf import evaluation
from periln_megatron.hf.evaluation import LOCAL_TASK, EvalError

# the shipped task YAMLs stay where docs and `lm_eval --include_path` name them: tools/ of the checkout
TASKS_DIR = Path(__file__).resolve().parents[2] / "tools" / "lm_eval_tasks"
# lm-eval's own task folders that periln_paper uses: indexing only these takes seconds, the full
# catalogue (thousands of YAML files) much longer; any other name falls back to the full one.
PAPER_TASK_DIRS = ("arc", "hellaswag", "piqa", "siqa", "winogrande")




def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def local_task_config(text_file: Path, text_key: str) -> dict:
    """The shipped periln_local_ppl.yaml with its data file (and the builder for .txt) set; the file
    is checked by evaluation.read_documents first."""
    import yaml

    config = yaml.safe_load((TASKS_DIR / f"{LOCAL_TASK}.yaml").read_text())
    if text_file.suffix in (".jsonl", ".json"):
        config["dataset_kwargs"] = {"data_files": {"test": str(text_file.resolve())}}
        config["doc_to_target"] = text_key
    else:  # plain text: one document per blank-line separated paragraph
        config["dataset_path"] = "text"
        config["dataset_kwargs"] = {"data_files": {"test": str(text_file.resolve())}, "sample_by": "paragraph"}
        config["doc_to_target"] = "text"
    return config


def task_manager(names: list[str]):
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


def dataset_error(e: BaseException) -> str | None:
    """The message of a dataset that could not be fetched (offline, no cache), else None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        module = type(e).__module__ or ""
        if isinstance(e, ConnectionError) or module.startswith(("huggingface_hub", "datasets", "requests", "urllib3")):
            return one_line(e)
        e = e.__cause__ or e.__context__
    return None


def rolling_token_stats(lm, samples: list[dict]) -> dict:
    """Token-level NLL of a loglikelihood_rolling task from lm-eval's logged samples: each document's
    loglikelihood (the sum over its tokens, as lm-eval computed it) and its token count (the model's
    tokenizer as HFLM encodes the document: every one of these tokens was predicted once)."""
    documents = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        text = s["arguments"][0][0] if isinstance(s["arguments"][0], (list, tuple)) else s["arguments"][0]
        ll = s["filtered_resps"][0]
        ll = float(ll[0] if isinstance(ll, (list, tuple)) else ll)
        documents.append({"doc_id": s["doc_id"], "tokens": len(lm.tok_encode(text)), "loglikelihood": ll,
                          "bytes": len(text.encode("utf-8"))})
    return evaluation.token_stats(documents)


def run_lm_eval(args, names: list[str], device: str, prefix: int | None, batch_size, out: dict) -> None:
    """--tasks (and --text-engine lm-eval): lm-eval's HFLM and simple_evaluate; results into `out`."""
    import logging

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import make_table

    if not args.verbose:
        for name in ("lm_eval", "lm-eval", "lm_eval.evaluator"):
            logging.getLogger(name).setLevel(logging.WARNING)
    tasks: list = list(names)
    if args.text_file is not None and args.text_engine == "lm-eval":
        tasks.append(local_task_config(args.text_file, args.text_key))
    manager = task_manager(names)
    lm = HFLM(pretrained=str(args.model_dir), device=device, dtype=args.dtype, batch_size=batch_size or 8,
              prefix_token_id=prefix)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, num_fewshot=args.num_fewshot,
                                      limit=args.limit, bootstrap_iters=args.bootstrap_iters, log_samples=True)
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    for task, samples in results.get("samples", {}).items():
        if results["configs"].get(task, {}).get("output_type") == "loglikelihood_rolling":
            out["token_level"][task] = rolling_token_stats(lm, samples)
    out["results"].update(results["results"])
    out["groups"].update(results.get("groups", {}))
    out.update({"lm_eval_version": lm_eval.__version__, "n-shot": results.get("n-shot"),
                "n-samples": results.get("n-samples"), "versions": results.get("versions")})
    out.setdefault("max_length", lm.max_length)
    if args.text_file is not None and args.text_engine == "lm-eval":
        out["text_engine"] = "lm-eval"
        out["max_length"] = lm.max_length
