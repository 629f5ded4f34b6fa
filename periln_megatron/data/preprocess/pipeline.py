"""One preprocessing run: the main process reads blocks of lines, hands them to the worker pool
(workers.py) a few ahead, and writes the returned token chunks in order (writing.py); then the summary."""

from __future__ import annotations

import collections
import multiprocessing
import signal
import sys
import time
from pathlib import Path

import numpy as np

from periln_megatron.data.preprocess.inputs import REASONS, InputError, expand_inputs, input_stem, read_chunks
from periln_megatron.data.preprocess.sentences import build_splitter
from periln_megatron.data.preprocess.workers import _encode_task, _init_worker, tokenizer_from_args
from periln_megatron.data.preprocess.writing import KeyOutput, check_writable, select_documents


class Progress:
    def __init__(self, total_bytes: int, quiet: bool, interval: float | None):
        self.total, self.quiet = max(total_bytes, 1), quiet
        self.tty = sys.stderr.isatty() and interval is None
        self.interval = 0.2 if self.tty else (interval or 10.0)
        self.start = self.last = time.monotonic()

    def update(self, done_raw: int, docs: int, json_bytes: int, tokens: int, final: bool = False) -> None:
        now = time.monotonic()
        if self.quiet or (not final and now - self.last < self.interval):
            return
        self.last = now
        el = max(now - self.start, 1e-9)
        frac = min(done_raw / self.total, 1.0)
        eta = el * (1 - frac) / frac if frac > 0 else 0
        bar = "#" * int(frac * 30) + "-" * (30 - int(frac * 30))
        msg = (f"[{bar}] {frac * 100:5.1f}% {docs:,} docs {tokens:,} tokens "
               f"{json_bytes / el / 1e6:.2f} MB/s ETA {int(eta) // 60}:{int(eta) % 60:02d}")
        print(("\r" + msg + ("\n" if final else "")) if self.tty else msg, end="" if self.tty else "\n",
              file=sys.stderr, flush=True)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run(args) -> dict:
    """Preprocess per ``args`` (see build_parser); return the summary dict. Raises InputError."""
    check_writable("--output-prefix", args.output_prefix)
    if args.summary_json:
        check_writable("--summary-json", args.summary_json)
    files = expand_inputs(args.input)
    tok = tokenizer_from_args(args)
    if args.split_sentences:
        build_splitter(args.lang, args.keep_newlines)  # fail here, in one line, if nltk or punkt is missing
    level = "sentence" if args.split_sentences else "document"
    interleave = args.partitions if args.partitions > 1 and not args.keep_sequential_samples else 1
    if args.keep_separate:
        stems, groups = collections.Counter(input_stem(f) for f in files), []
        for i, f in enumerate(files):
            name = input_stem(f) if stems[input_stem(f)] == 1 else f"{i}_{input_stem(f)}"
            groups.append((f"{args.output_prefix}_{name}", [f]))
    else:
        groups = [(args.output_prefix, files)]
    stats = {"files": [str(f) for f in files], "documents": 0, "sequences": 0, "tokens": 0, "json_bytes": 0,
             "blank_lines": 0, "empty_documents": 0, "skipped": {r: 0 for r in REASONS}, "outputs": {}}
    progress = Progress(sum(f.stat().st_size for f in files), args.quiet, args.log_interval)
    from megatron.core.datasets.indexed_dataset import DType  # before the fork: workers inherit it

    dtype = np.dtype(DType.optimal_dtype(tok.vocab_size)).name
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    pool = ctx.Pool(args.workers, initializer=_init_worker, initargs=(args, dtype))
    writers, shown, raw_done = [], 0, 0
    out_dir = Path(args.output_prefix).absolute().parent
    created = [d for d in (out_dir, *out_dir.parents) if not d.exists()]  # removed again on failure
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    start = time.perf_counter()
    progress.start = time.monotonic()
    try:
        for out_prefix, group in groups:
            keyed = {}
            for k in args.json_keys:
                keyed[k] = KeyOutput(f"{out_prefix}_{k}_{level}", k, tok.vocab_size, interleave)
                writers.append(keyed[k])
            line_offset = 0  # lines of the group's earlier files: documents are numbered across the group
            before = {n: stats[n] for n in ("documents", "empty_documents", "blank_lines")}
            skipped_before = sum(stats["skipped"].values())
            for f in group:
                pending, raw_before, file_lines = collections.deque(), raw_done, 0
                chunks = read_chunks(f, args.chunk_bytes)
                exhausted = False
                while pending or not exhausted:
                    while not exhausted and len(pending) < 2 * args.workers + 2:
                        item = next(chunks, None)
                        if item is None:
                            exhausted = True
                        else:
                            last = item[0] - 1 + item[1].count(b"\n") + (not item[1].endswith(b"\n"))
                            pending.append((pool.apply_async(_encode_task, ((item[0], item[1]),)), item[2], last))
                    if not pending:
                        break
                    job, raw_pos, file_lines = pending.popleft()
                    res = job.get()
                    for lineno, reason, message in res["errors"]:
                        if args.on_error == "fail":
                            raise InputError(f"{f}:{lineno}: {message}")
                        stats["skipped"][reason] += 1
                        if shown < 20 and not args.quiet:
                            print(f"warning: {f}:{lineno}: {message} (skipped)", file=sys.stderr)
                        shown += 1
                    part = (line_offset + res["lines"] - 1) % interleave  # each document's partition
                    for k, (tokens, lengths, counts, empty) in res["keys"].items():
                        doc_part = part
                        if empty and not args.keep_empty_documents:  # documents of no tokens: not written
                            doc_part, counts = part[counts > 0], counts[counts > 0]
                        if interleave == 1:
                            keyed[k].add(tokens, lengths, counts)
                        else:
                            for p in np.unique(doc_part):
                                keyed[k].add(*select_documents(tokens, lengths, counts, doc_part == p), part=int(p))
                        stats["documents"] += len(counts)
                        stats["sequences"] += len(lengths)
                        stats["tokens"] += len(tokens)
                        stats["empty_documents"] += empty
                    stats["json_bytes"] += res["bytes"]
                    stats["blank_lines"] += res["blank"]
                    raw_done = raw_before + raw_pos
                    progress.update(raw_done, stats["documents"], stats["json_bytes"], stats["tokens"])
                line_offset += file_lines
            for k, w in keyed.items():
                if w.num_tokens == 0:  # an empty dataset, which megatron-core cannot read: not written
                    counts = {n: stats[n] - before[n] for n in before}
                    names = ", ".join(map(str, group[:3])) + (f" (and {len(group) - 3} more)" if len(group) > 3 else "")
                    raise InputError(
                        f"{names}: no tokens for key {k!r} ({counts['documents']} documents, "
                        f"{counts['empty_documents']} empty, {counts['blank_lines']} blank lines, "
                        f"{sum(stats['skipped'].values()) - skipped_before} skipped): nothing written")
                w.finalize()
        for w in writers:  # only once every output has tokens: all or nothing
            docs, toks = w.commit()
            stats["outputs"][w.prefix] = {"key": w.key, "documents": docs, "tokens": toks,
                                          "bytes": toks * w.dtype.itemsize, "dtype": w.dtype.name}
        pool.close()
    except BaseException:
        pool.terminate()
        for w in writers:
            w.abort()
        for d in created:  # deepest first, and only if still empty
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        raise
    finally:
        signal.signal(signal.SIGTERM, old_term)
        pool.join()
    stats["seconds"] = time.perf_counter() - start
    stats["level"], stats["keep_empty_documents"] = level, args.keep_empty_documents
    progress.update(raw_done, stats["documents"], stats["json_bytes"], stats["tokens"], final=True)
    return stats


def print_summary(stats: dict, file=sys.stderr) -> None:
    s = max(stats["seconds"], 1e-9)
    out_bytes = sum(o["bytes"] for o in stats["outputs"].values())
    empty = "written" if stats.get("keep_empty_documents") else "not written"
    print(f"documents: {stats['documents']:,} written, {stats['empty_documents']:,} empty ({empty}), "
          f"{stats['blank_lines']:,} blank lines", file=file)
    if stats.get("level") == "sentence":
        print(f"sentences: {stats['sequences']:,} (one sequence each)", file=file)
    print(f"tokens: {stats['tokens']:,}; input: {stats['json_bytes'] / 1e6:.2f} MB of JSONL; "
          f"output: {out_bytes / 1e6:.2f} MB of tokens", file=file)
    print(f"time: {s:.2f} s; throughput: {stats['json_bytes'] / s / 1e6:.2f} MB/s of JSONL, "
          f"{stats['tokens'] / s:,.0f} tokens/s, {stats['documents'] / s:,.0f} docs/s", file=file)
    skipped = sum(stats["skipped"].values())
    reasons = ", ".join(f"{n} {r}" for r, n in stats["skipped"].items() if n)
    print(f"skipped lines: {skipped}" + (f" ({reasons})" if reasons else ""), file=file)
    for prefix, o in stats["outputs"].items():
        print(f"wrote {prefix}.bin/.idx: {o['documents']:,} documents, {o['tokens']:,} tokens ({o['dtype']})",
              file=file)
