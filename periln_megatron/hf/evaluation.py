"""Token-level perplexity of local documents with an exported Hugging Face model, in batched windows
(tools/evaluate.py --text-file; docs/evaluation.md).

The windows are lm-eval's loglikelihood_rolling ones (context_len=1), so the numbers are the
harness's: each document's ids in chunks of the context L, chunk [a, b) predicted from the L (or,
for a document shorter than L, b) tokens ending just before b, [prefix] + ids, so every id is
predicted once and the first from the prefix token. lm-eval runs these windows through its
per-request machinery (a Collator, a progress bar and a log_softmax over the whole vocabulary per
batch of windows, one call per batch); here every window of every document goes into one sorted
list of right-padded batches, and only the target's log-probability is gathered.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from pathlib import Path

LOCAL_TASK = "periln_local_ppl"


class EvalError(Exception):
    """One line for the user; tools/evaluate.py exits 2."""


def read_documents(path: Path, text_key: str = "text") -> list[str]:
    """The documents of a --text-file, as lm-eval's local task loads them: JSONL (.jsonl/.json, one
    object per non-blank line, the string under `text_key`) or plain text split at blank lines
    (universal newlines, split on "\\n\\n", empty pieces dropped: the `datasets` text builder's
    sample_by="paragraph")."""
    flag = f"--text-file {path}"
    if not path.is_file():
        raise EvalError(f"{flag}: not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise EvalError(f"{flag}: not UTF-8: byte {e.start} (line {line}) is {raw[e.start:e.start + 1]!r}; "
                        "save the file as UTF-8") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if path.suffix in (".jsonl", ".json"):
        documents = []
        for number, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{flag}: line {number} is not JSON ({e.msg}); JSONL holds one object per line") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                raise EvalError(f"{flag}: line {number} has no string {text_key!r} (use --text-key)")
            documents.append(record[text_key])
    else:
        documents = [d for d in text.split("\n\n") if d]
    if not any(d.strip() for d in documents):
        raise EvalError(f"{flag}: no documents")
    return documents


def limit_documents(documents: list, limit: float | None) -> list:
    """lm-eval's --limit: the first N documents, or a fraction of them if N < 1."""
    if limit is None:
        return documents
    return documents[:int(math.ceil(len(documents) * limit)) if limit < 1.0 else int(limit)]


def check_prefix_token(value: int, flag_value: str, vocab_size: int) -> int:
    if not 0 <= value < vocab_size:
        raise EvalError(f"--prefix-token {flag_value}: id {value} is outside the model's vocabulary "
                        f"(vocab_size {vocab_size}: ids 0..{vocab_size - 1})")
    return value


def context_length(config, tokenizer, default: int = 2048) -> int:
    """The window length lm-eval's HFLM uses (its resolve_max_length)."""
    cfg = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(cfg, attr, None) is not None:
            return int(getattr(cfg, attr))
    length = getattr(tokenizer, "model_max_length", None)
    return int(length) if length is not None and length < int(1e29) else default


def passive_omp_wait() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless set, before torch (and its OpenMP) loads. Idle OpenMP threads
    otherwise spin at each barrier; on CPU cores other processes also use, a spinning thread keeps
    a descheduled peer from running, and each of the forward pass's small ops waits a time slice:
    measured here (2 busy cores, tiny model) 20x slower than one thread: most of the 160 tokens/s
    of issue #22 (benchmarks/RESULTS_evaluate.md). On quiet cores sleeping waiters cost nothing
    measurable."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def load_model(model_dir: Path, device: str, dtype: str = "auto"):
    """(model, tokenizer) from an exported directory, in eval mode on `device`."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()  # its "Loading weights" bar: ours is the one bar
    if dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise EvalError(f"--dtype {dtype}: auto, float32, bfloat16 or float16")
        dtype = getattr(torch, dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    return model, tokenizer


def windows(length: int, seq: int):
    """(end, n_inputs, n_scored) of each window over a document of `length` ids: targets ids[a:end],
    inputs ext[end - n_inputs:end] with ext = [prefix] + ids, scored the last n_scored positions."""
    for a in range(0, length, seq):
        end = min(a + seq, length)
        yield end, min(seq, end), end - a


TOKENS_PER_BATCH = 16384
CPU_TOKENS_PER_BATCH = 4096  # one CPU worker's activations and logits stay in cache (measured fastest of 1k-16k)
LOGITS_PER_BATCH = 1 << 28  # float32 logits of a batch: 1 GiB (and as much again for their log-softmax)


def default_batch_size(seq: int, vocab_size: int, device: str = "cpu") -> int:
    """Windows per forward pass: TOKENS_PER_BATCH tokens (CPU_TOKENS_PER_BATCH on a CPU), fewer where the
    vocabulary is large."""
    tokens = CPU_TOKENS_PER_BATCH if device == "cpu" else TOKENS_PER_BATCH
    return max(1, min(tokens, LOGITS_PER_BATCH // max(vocab_size, 1)) // seq)


def can_fork_scorers(device: str) -> bool:
    """Forked scorers only on a Linux CPU: fork after torch has loaded is safe there; a GPU scores in
    this process."""
    return device == "cpu" and sys.platform == "linux"


def default_workers(device: str) -> int:
    """Forked single-threaded scorers on a CPU, one per core (at most 4): a small model's forward pass is
    mostly short elementwise ops that torch's intra-op threads barely speed up (measured: 2 threads 3.5 s,
    1 thread 4.1 s, and half the windows on 1 thread 2.1 s)."""
    return max(1, min(4, len(os.sched_getaffinity(0)))) if can_fork_scorers(device) else 1


def _score_windows(model, ext: list, plan: list, batch_size: int, n_documents: int, progress) -> "torch.Tensor":
    """Summed log-likelihood per document (float64) of the windows in `plan`, longest first;
    progress(n) after each batch with the tokens it scored."""
    import numpy as np
    import torch

    device = next(model.parameters()).device
    loglikelihood = torch.zeros(n_documents, dtype=torch.float64)
    with torch.inference_mode():
        for start in range(0, len(plan), batch_size):
            batch = plan[start:start + batch_size]
            width = batch[0][0]
            inputs = np.zeros((len(batch), width), dtype=np.int64)
            targets = np.zeros((len(batch), width), dtype=np.int64)
            scored = np.zeros((len(batch), width), dtype=bool)
            for row, (n, doc, end, k) in enumerate(batch):
                inputs[row, :n] = ext[doc][end - n:end]
                targets[row, :n] = ext[doc][end - n + 1:end + 1]
                scored[row, n - k:n] = True
            # right padding needs no attention mask in a causal model: position i sees only 0..i
            logits = model(torch.from_numpy(inputs).to(device)).logits.float()
            # log_softmax then gather, as lm-eval does: on CPU twice as fast as logit - logsumexp
            logprobs = torch.log_softmax(logits, -1)
            del logits
            targets_t, scored_t = torch.from_numpy(targets).to(device), torch.from_numpy(scored).to(device)
            picked = logprobs.gather(-1, targets_t.unsqueeze(-1)).squeeze(-1)
            del logprobs
            per_window = (picked.double() * scored_t).sum(-1).cpu()
            loglikelihood.index_add_(0, torch.tensor([w[1] for w in batch]), per_window)
            progress(int(scored.sum()))
    return loglikelihood


def _forked_scores(model, ext: list, plan: list, batch_size: int, n_documents: int, workers: int, progress):
    """_score_windows over `workers` forked processes of one thread each, window i to worker i % workers
    (each share stays sorted by length). Progress and results come back through one queue; a worker
    that dies without a result is an error, not a hang."""
    import multiprocessing
    import queue as queue_module
    import traceback

    import torch

    context = multiprocessing.get_context("fork")
    results = context.Queue()

    def work(index: int) -> None:
        try:
            torch.set_num_threads(1)
            share = plan[index::workers]
            scores = _score_windows(model, ext, share, batch_size, n_documents, lambda n: results.put(("tokens", n)))
            results.put(("done", index, scores.numpy()))
        except KeyboardInterrupt:
            os._exit(130)
        except BaseException:
            results.put(("error", index, traceback.format_exc()))
        finally:
            results.close()
            results.join_thread()

    processes = [context.Process(target=work, args=(i,), daemon=True) for i in range(workers)]
    for process in processes:
        process.start()
    total, finished = torch.zeros(n_documents, dtype=torch.float64), set()
    try:
        while len(finished) < workers:
            try:
                message = results.get(timeout=1.0)
            except queue_module.Empty:
                # a worker that delivered its result may well have exited; one that did not is lost
                dead = [p for i, p in enumerate(processes) if i not in finished and p.exitcode is not None]
                if dead and results.empty():
                    raise EvalError(f"a scoring worker ended with exit code {dead[0].exitcode} before its result "
                                    "(out of memory?); --workers 1 scores in this process")
                continue
            if message[0] == "tokens":
                progress(message[1])
            elif message[0] == "done":
                total += torch.from_numpy(message[2])
                finished.add(message[1])
            else:
                raise EvalError(f"scoring worker {message[1]} failed:\n{message[2]}")
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join()
    return total


def score_documents(model, tokenizer, documents: list[str], prefix_token_id: int, batch_size: int | None = None,
                    seq: int | None = None, progress: bool = True, workers: int | None = None) -> dict:
    """Each document's summed log-likelihood and token count (token_stats of them). batch_size:
    windows per forward pass (default_batch_size: on a CPU 64 windows of 64 tokens; on a GPU 256, 8
    of 2048 with a vocabulary of 16k ids, 4 with 32k, 2 with 128k). workers: forked single-threaded
    scorers (default_workers: one per core on a CPU, at most 4; 1 scores in this process)."""
    import numpy as np
    from tqdm import tqdm

    device = next(model.parameters()).device.type
    seq = seq or context_length(model.config, tokenizer)
    batch_size = batch_size or default_batch_size(seq, model.config.vocab_size, device)
    workers = workers or default_workers(device)
    # verbose=False: no "longer than the model's maximum length" warning; windows handle any length
    encoded = tokenizer(documents, add_special_tokens=False, verbose=False)["input_ids"]
    ext = [np.asarray([prefix_token_id, *ids], dtype=np.int64) for ids in encoded]
    plan = [(n, doc, end, scored) for doc, ids in enumerate(encoded) for end, n, scored in windows(len(ids), seq)]
    plan.sort(key=lambda w: -w[0])  # longest first: batches of equal length, no padding but the last few
    workers = max(1, min(workers, len(plan) // batch_size)) if can_fork_scorers(device) else 1
    bar = tqdm(total=sum(len(ids) for ids in encoded), unit="tok", desc="scoring documents", file=sys.stderr,
               disable=not progress, mininterval=1.0)
    try:
        if workers > 1:
            loglikelihood = _forked_scores(model, ext, plan, batch_size, len(documents), workers, bar.update)
        else:
            loglikelihood = _score_windows(model, ext, plan, batch_size, len(documents), bar.update)
    finally:
        bar.close()
    stats = token_stats([{"doc_id": i, "tokens": len(ids), "loglikelihood": float(ll), "bytes": len(d.encode("utf-8"))}
                         for i, (ids, ll, d) in enumerate(zip(encoded, loglikelihood.tolist(), documents))])
    return {**stats, "workers": workers}


def token_stats(per_document: list[dict]) -> dict:
    """Token-level NLL (nats per token, the trainer's loss) of per-document log-likelihoods."""
    tokens = sum(d["tokens"] for d in per_document)
    nll = -sum(d["loglikelihood"] for d in per_document)
    per_token = nll / tokens if tokens else float("nan")
    return {"documents": len(per_document), "tokens": tokens, "nll_sum": nll, "token_nll": per_token,
            "token_perplexity": math.exp(per_token) if tokens else float("nan"), "per_document": per_document}


def harness_metrics(documents: list[str], stats: dict) -> dict:
    """lm-eval's metrics of its loglikelihood_rolling tasks from the same log-likelihoods, under its
    result keys: word_perplexity (words: re.split(r"\\s+")), byte_perplexity, bits_per_byte."""
    ll = sum(d["loglikelihood"] for d in stats["per_document"])
    words = sum(len(re.split(r"\s+", d)) for d in documents)
    nbytes = sum(len(d.encode("utf-8")) for d in documents)
    return {"word_perplexity,none": math.exp(-ll / words), "byte_perplexity,none": math.exp(-ll / nbytes),
            "bits_per_byte,none": -ll / nbytes / math.log(2)}


def evaluate_documents(model_dir: Path, documents: list[str], prefix_token_id: int, device: str, dtype: str = "auto",
                       batch_size: int | None = None, workers: int | None = None) -> dict:
    """tools/evaluate.py --text-file: load, score, and the harness's metrics beside the token-level NLL."""
    model, tokenizer = load_model(model_dir, device, dtype)
    seq = context_length(model.config, tokenizer)
    start = time.perf_counter()
    stats = score_documents(model, tokenizer, documents, prefix_token_id, batch_size, seq, workers=workers)
    seconds = time.perf_counter() - start
    return {"results": {LOCAL_TASK: {"alias": LOCAL_TASK, **harness_metrics(documents, stats)}},
            "token_level": {LOCAL_TASK: stats}, "max_length": seq, "seconds": seconds}
