"""`make demo`: Peri-LN against Pre-LN in miniature, on CPU, end to end with the project's own tools.

1. a corpus from text already on this machine (the Python standard library's docstrings), or --input;
   every 50th document is held back: the sample prompt is the start of one of them;
2. a SentencePiece tokenizer and a megatron indexed dataset (tools/train_tokenizer.py, preprocess_data.py);
3. a deep, narrow Peri-LN model and the same Pre-LN model, same data, same seed, one process each,
   --jobs of them at a time (default: one per core); --seeds and --sweep add runs;
4. real megatron-core parallelism: Peri-LN's final checkpoint, resharded to PP=2 over 2 processes,
   must evaluate to the validation loss the single process measured;
5. validation losses, per-layer diagnostics from layer 0 (the embedding output) on, plots, and report.md:
   which of the paper's findings this run reproduces and which it does not, computed from the run;
6. the Peri-LN checkpoint exported to Hugging Face, loaded with stock transformers, sampled greedily.

Everything lands in --out. Re-running resumes: finished stages and runs are kept, an unfinished run
continues from its checkpoint. --fresh starts over. The budget: the default preset takes about 15
CPU-minutes, about 8 minutes on 2 idle cores (docs/demo_search.md has the measurements behind it).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import queue
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from periln_megatron.exit_codes import EXIT_NONFINITE

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
CORPUS_BYTES = 3_000_000
HOLD_BACK_EVERY = 50  # every 50th document is held back from the corpus (the sample prompt's source)
PROMPT_WORDS = 4
SAMPLE_TOKENS = 32
PLACEMENTS = (("peri", "Peri-LN"), ("pre", "Pre-LN"))
LABEL = dict(PLACEMENTS)

# What "far more", "equal" and "unstable" mean in the findings (see classify()).
FAR_MORE = 10.0          # Pre-LN's figure at least 10x Peri-LN's
LOSS_TOLERANCE = 0.02    # nats: validation losses closer than this are called equal (one seed)
OVERFIT_RISE = 0.02      # nats: a validation loss this far above its minimum has risen
MAX_EPOCHS = 2.0

PRESETS = {
    # The search behind these: docs/demo_search.md. default: about 8 minutes on 2 idle cores.
    "default": dict(layers=24, hidden=64, ffn=176, heads=4, groups=2, seq_length=128, batch=16, steps=150,
                    lr=1e-2, vocab_size=2000, sweep="0.03", sweep_steps=None, seeds=2),
    # the smallest configuration measured whose Peri-LN export samples a non-degenerate greedy
    # continuation (finding c); Peri-LN also ends lower, with Pre-LN overfitting (8.4 epochs)
    "long": dict(layers=12, hidden=96, ffn=264, heads=4, groups=2, seq_length=128, batch=8, steps=3000,
                 lr=1e-2, vocab_size=2000, sweep=None, sweep_steps=None, seeds=1),
    # the reduced demo of tests/test_demo.py: minutes
    "quick": dict(layers=4, hidden=64, ffn=128, heads=4, groups=2, seq_length=64, batch=8, steps=6,
                  lr=1e-2, vocab_size=500, sweep=None, sweep_steps=None, seeds=1),
}


LONG_PRESET_HINT = ("`make demo DEMO_ARGS=\"--preset long\"` trains long enough for a non-degenerate sample "
                    "(12 x 96, 3000 steps: about 17 minutes on 2 idle cores).")


def log(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def fmt_time(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


# ----------------------------------------------------------------------------- corpus

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
    source = ", ".join(inputs) if inputs else f"docstrings of Python {sys.version.split()[0]}'s standard library"
    log(f"corpus: {len(kept)} documents, {corpus.stat().st_size / 1e6:.1f} MB from {source}; "
        f"{len(held)} more held back for the sample prompt")
    return corpus, heldout


PLAIN_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*[.,;:]?")


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


def run_tool(args: list, what: str) -> None:
    log(what)
    subprocess.run([sys.executable, *map(str, args)], check=True, cwd=REPO)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- training

@dataclass
class Job:
    key: str          # run directory name under out/runs
    placement: str
    lr: float
    seed: int
    steps: int
    role: str         # main | seed | sweep
    run_dir: Path = None
    process: subprocess.Popen = None
    lines: list = field(default_factory=list)
    started: float = 0.0
    step: int = 0
    last_loss: float | None = None
    outcome: dict | None = None
    cpu_s: float = 0.0

    @property
    def title(self) -> str:
        return f"{LABEL[self.placement]} (lr {self.lr:g}, seed {self.seed}, {self.steps} steps)"


def recipe_overrides(args, job: Job, run_dir: Path, prefix: Path, tokenizer: Path) -> list[str]:
    steps = job.steps
    return [
        f"name=demo-{job.key}", f"model.placement={job.placement}", f"model.num_layers={args.layers}",
        f"model.hidden_size={args.hidden}", f"model.num_attention_heads={args.heads}",
        f"model.num_query_groups={args.groups}", f"model.ffn_hidden_size={args.ffn}",
        f"model.seq_length={args.seq_length}", "model.vocab_size=null",
        "parallel.tp=1", "parallel.pp=1", f"train.global_batch_size={args.batch}",
        f"train.micro_batch_size={args.batch}", f"train.steps={steps}", f"train.seed={job.seed}",
        f"train.eval_interval={max(steps // 5, 1)}", f"train.eval_iters={args.eval_iters}",
        f"optim.lr={job.lr}", f"optim.min_lr={job.lr / 10}", f"optim.warmup_steps={max(steps // 10, 1)}",
        "data.synthetic=false", f"data.prefixes=[{prefix}]", f"data.split={args.split}",
        "tokenizer.type=SentencePieceTokenizer", f"tokenizer.model={tokenizer}",
        f"checkpoint.dir={run_dir}", f"checkpoint.interval={max(steps // 2, 1)}", "checkpoint.keep=1",
        f"diagnostics.interval={max(steps // 10, 1)}", f"logging.interval={max(steps // 20, 1)}",
        "logging.tensorboard=false",
    ]


def finished(run_dir: Path) -> dict | None:
    path = run_dir / "demo_outcome.json"
    return json.loads(path.read_text()) if path.is_file() else None


class Trainer:
    """Runs the jobs, `jobs` single-process trainings at a time, and prints progress with an ETA."""

    def __init__(self, args, out: Path, prefix: Path, tokenizer: Path):
        self.args, self.out, self.prefix, self.tokenizer = args, out, prefix, tokenizer
        self.events: queue.Queue = queue.Queue()

    def launch(self, job: Job) -> None:
        job.run_dir = self.out / "runs" / job.key
        job.run_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "periln_megatron.train", "--recipe", str(REPO / "recipes/tiny/peri_ln.yaml"),
               "--set", *recipe_overrides(self.args, job, job.run_dir, self.prefix, self.tokenizer)]
        threads = max(1, (os.cpu_count() or 1) // self.args.jobs)
        env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                                 "LOCAL_RANK")}
        env.update(OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
        job.started = time.monotonic()
        job.process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True)
        threading.Thread(target=self._read, args=(job,), daemon=True).start()

    def _read(self, job: Job) -> None:
        for line in job.process.stdout:
            self.events.put((job, line.rstrip("\n")))
        _, status, usage = os.wait4(job.process.pid, 0)  # the run's own CPU time, not only the total
        job.process.returncode = os.waitstatus_to_exitcode(status)
        job.cpu_s = usage.ru_utime + usage.ru_stime
        self.events.put((job, None))

    def run(self, jobs: list[Job]) -> None:
        pending = []
        for job in jobs:
            job.run_dir = self.out / "runs" / job.key
            done = finished(job.run_dir)
            if done is not None and done.get("steps") == job.steps:
                job.outcome = done
                log(f"{job.title}: finished earlier ({done['status']}), kept")
            else:
                pending.append(job)
        running: list[Job] = []
        total = len(pending)
        while pending or running:
            while pending and len(running) < self.args.jobs:
                job = pending.pop(0)
                log(f"training {job.title}: {self.args.layers} layers, hidden {self.args.hidden}, one process "
                    f"({total - len(pending)}/{total})")
                self.launch(job)
                running.append(job)
            job, line = self.events.get()
            if line is None:
                running.remove(job)
                self._finish(job)
                continue
            job.lines = (job.lines + [line])[-60:]
            m = re.match(r"step (\d+)/(\d+) \| loss ([0-9.eE+-]+|nan|inf)", line)
            if m:
                job.step, job.last_loss = int(m.group(1)), float(m.group(3))
                print(f"  {job.title}: step {job.step}/{job.steps}, loss {job.last_loss:.4f}"
                      + (", valid " + line.split("valid_loss ")[1].split(" ")[0] if "valid_loss" in line else "")
                      + (" SPIKE" if "SPIKE" in line else "") + f" | ETA {self.eta(job, running, pending)}",
                      flush=True)
            elif line.startswith(("resumed", "stopping")) or "final valid_loss" in line:
                print(f"  {job.title}: {line}", flush=True)

    def eta(self, job: Job, running: list[Job], pending: list[Job]) -> str:
        """This run's remaining time, and all training's (the queue spread over the parallel slots)."""
        now = time.monotonic()
        rates = [(now - j.started) / j.step for j in running if j.step > 0]
        rate = statistics.mean(rates) if rates else 0.0
        mine = (job.steps - job.step) * (now - job.started) / max(job.step, 1)
        rest = sum((j.steps - j.step) * ((now - j.started) / j.step if j.step else rate) for j in running)
        rest += sum(j.steps * rate for j in pending)
        return f"this run {fmt_time(mine)}, all training {fmt_time(max(mine, rest / self.args.jobs))}"

    def _finish(self, job: Job) -> None:
        code = job.process.returncode
        tail = "\n".join(job.lines[-40:])
        if code == 0:
            status, message = "finished", ""
        elif code == EXIT_NONFINITE:
            status = "diverged"
            message = next((l.split("error: ", 1)[1] for l in reversed(job.lines) if "periln-train: error:" in l), tail)
            log(f"{job.title}: DIVERGED: {message}")
        else:
            raise SystemExit(f"demo: training {job.title} failed (exit {code}):\n{tail}")
        job.outcome = {"status": status, "message": message, "steps": job.steps,
                       "wall_s": round(time.monotonic() - job.started, 1), "cpu_s": round(job.cpu_s, 1)}
        (job.run_dir / "demo_outcome.json").write_text(json.dumps(job.outcome))
        log(f"{job.title}: {status} in {fmt_time(job.outcome['wall_s'])} (CPU {fmt_time(job.cpu_s)})")


def parallel_check(args, out: Path, source: Path, steps: int) -> dict:
    """Evaluate `source`'s final checkpoint under PP=2 (TP=2 for an odd depth) in 2 processes."""
    layout = ["parallel.pp=2"] if args.layers % 2 == 0 else ["parallel.tp=2"]
    name = "PP=2" if args.layers % 2 == 0 else "TP=2"
    target = out / "runs" / "peri_parallel_check"
    done = target / "check.json"
    if done.is_file():
        return json.loads(done.read_text())
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    latest = (source / "latest_checkpointed_iteration.txt").read_text().strip()
    it_dir = f"iter_{int(latest):07d}"
    shutil.copytree(source / it_dir, target / it_dir)
    (target / "latest_checkpointed_iteration.txt").write_text(latest + "\n")
    recipe = source / "recipe.yaml"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "periln_megatron.train", "--recipe", str(recipe), "--set",
           *layout, f"checkpoint.dir={target}", "checkpoint.save_at_end=false", "diagnostics.interval=0",
           f"name=demo-peri-{name.lower().replace('=', '')}"]
    log(f"parallelism check: Peri-LN's step-{latest} checkpoint resharded to {name}, evaluated by 2 processes")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
    started = time.monotonic()
    result = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        raise SystemExit(f"demo: the {name} check failed (exit {result.returncode}):\n{result.stdout[-3000:]}")
    record = [json.loads(l) for l in (target / "metrics.jsonl").read_text().splitlines() if "final_valid_loss" in l][-1]
    check = {"layout": name, "step": int(latest), "valid_loss": record["final_valid_loss"],
             "wall_s": round(time.monotonic() - started, 1)}
    done.write_text(json.dumps(check))
    shutil.rmtree(target / it_dir, ignore_errors=True)  # the copy served its purpose
    return check


# ----------------------------------------------------------------------------- reading a run

RECORD_START = '{"step": '  # how the trainer's json.dumps(record) begins


def read_metrics(run_dir: Path) -> dict[int, dict]:
    """step -> merged record (a resumed run's later lines override). A record cut off by a killed run
    (last line, or mid-file where the resumed run went on) is skipped; a resumed run's record appended
    to a cut line is kept. Other damage is an error naming file:line."""
    out: dict[int, dict] = {}
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return out
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if not line.startswith(RECORD_START):
                raise SystemExit(f"demo: {path}:{n}: invalid JSON")
            start = line.rfind(RECORD_START)
            try:
                record = json.loads(line[start:]) if start > 0 else None
            except json.JSONDecodeError:
                record = None
            if record is None:
                log(f"warning: {path}:{n}: a record cut off by a killed run, skipped")
                continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            out.setdefault(record["step"], {}).update(record)
    return dict(sorted(out.items()))


@dataclass
class RunSummary:
    """What the report and the classifier need from one run directory (metrics.jsonl, recipe.yaml,
    demo_outcome.json)."""
    run_dir: Path
    placement: str
    lr: float
    seed: int
    steps: int
    hidden: int
    status: str                      # finished | diverged
    message: str
    steps_done: int
    train_loss: float | None         # mean of the last logged training losses (up to 5)
    valid_loss: float | None         # the final validation loss
    valid_curve: list                # [(step, valid_loss)]
    train_curve: list                # [(step, loss)]
    spikes: list                     # [(step, message)]
    measured_step: int | None
    layers: dict                     # the last measured step's per-layer lists
    wall_s: float | None = None      # the training process's wall and CPU time (demo_outcome.json)
    cpu_s: float | None = None

    @property
    def label(self) -> str:
        return LABEL.get(self.placement, self.placement)

    @property
    def loss_spikes(self) -> list:
        return [(s, m) for s, m in self.spikes if "loss" in m]

    @property
    def grad_spikes(self) -> list:
        return [(s, m) for s, m in self.spikes if "grad_norm" in m]

    @property
    def unstable(self) -> bool:
        """Clearly unstable: diverged (non-finite loss) or a loss spike (loss > spike_factor x running median)."""
        return self.status == "diverged" or bool(self.loss_spikes)

    def layer(self, key: str) -> list:
        return self.layers.get(key) or []


def summarise_run(run_dir: Path) -> RunSummary:
    import yaml

    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    outcome = finished(run_dir) or {"status": "finished", "message": ""}
    records = read_metrics(run_dir)
    train_curve = [(s, r["loss"]) for s, r in records.items() if isinstance(r.get("loss"), (int, float))]
    valid_curve = [(s, r["valid_loss"]) for s, r in records.items() if "valid_loss" in r]
    finals = [r["final_valid_loss"] for r in records.values() if "final_valid_loss" in r]
    measured = [s for s, r in records.items() if r.get("layer_variance")]
    tail = [l for _, l in train_curve[-5:]]
    return RunSummary(
        run_dir=run_dir, placement=recipe["model"]["placement"], lr=float(recipe["optim"]["lr"]),
        seed=int(recipe["train"]["seed"]), steps=int(recipe["train"]["steps"]),
        hidden=int(recipe["model"]["hidden_size"]), status=outcome["status"],
        message=outcome.get("message", ""), steps_done=max(records) if records else 0,
        train_loss=statistics.mean(tail) if tail else None,
        valid_loss=finals[-1] if finals and outcome["status"] == "finished" else None,
        valid_curve=valid_curve, train_curve=train_curve,
        spikes=[(s, r["spike"]) for s, r in records.items() if r.get("spike")],
        measured_step=measured[-1] if measured else None,
        layers={k: v for k, v in records[measured[-1]].items() if isinstance(v, list)} if measured else {},
        wall_s=outcome.get("wall_s"), cpu_s=outcome.get("cpu_s"),
    )


# ----------------------------------------------------------------------------- the findings

@dataclass
class Finding:
    name: str
    status: str       # reproduced | not reproduced | partly | not shown
    evidence: str     # a sentence of measured numbers

    def line(self) -> str:
        return f"- **{self.name}: {self.status}.** {self.evidence}"


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf


def _last(values: list):
    return values[-1] if values else None


def peak(run: RunSummary) -> dict | None:
    """Where the largest activation of the residual stream sits (layers 1..L): layer, value, the hidden
    dimension holding it and the top dimensions by energy share; the layer where the residual max first
    reaches half the peak; the largest single sublayer output (layer, attention or MLP, value)."""
    maxes = run.layer("layer_max_abs")
    if len(maxes) < 2 or None in maxes[1:]:
        return None
    layer = max(range(1, len(maxes)), key=lambda i: maxes[i])
    half = next(i for i in range(len(maxes)) if maxes[i] is not None and maxes[i] >= maxes[layer] / 2)
    writes = [(v, i, name) for key, name in (("attn_out_max_abs", "attention"), ("mlp_out_max_abs", "MLP"))
              for i, v in enumerate(run.layer(key)) if v is not None]
    write = max(writes) if writes else None
    top = run.layer("layer_top_dims")
    dims = run.layer("layer_max_abs_dim")
    return {"layer": layer, "value": maxes[layer], "half_layer": half,
            "write": {"value": write[0], "layer": write[1], "sublayer": write[2]} if write else None,
            "dim": dims[layer] if dims else None, "top_dims": top[layer] if top else None}


def _curves(peri: RunSummary | None, pre: RunSummary | None) -> str:
    """How the two validation curves compare over training (first seed): which model was lower when."""
    if peri is None or pre is None:
        return ""
    theirs = dict(pre.valid_curve)
    both = [(s, v, theirs[s]) for s, v in peri.valid_curve if s in theirs]
    if len(both) < 2:
        return ""
    lower = [s for s, vp, vq in both if vp < vq]
    return (f" Along training (seed {peri.seed}), Peri-LN's validation loss was the lower one at {len(lower)} of "
            f"{len(both)} evaluations" + (f" (steps {', '.join(map(str, lower))})." if lower else "."))


def _other_lrs(runs: list[RunSummary], lr: float, what: str) -> str:
    """The same comparison at the other learning rates tried (first seed), for the evidence; the verdict
    is the main learning rate's."""
    parts = []
    for x in sorted({r.lr for r in runs if not math.isclose(r.lr, lr)}):
        pair = {p: min((r for r in runs if r.placement == p and math.isclose(r.lr, x)), key=lambda r: r.seed,
                       default=None) for p, _ in PLACEMENTS}
        if None in pair.values():
            continue
        if what == "variance":
            vp, vq = pair["peri"].layer("layer_variance"), pair["pre"].layer("layer_variance")
            if vp and vq and vp[-1] and vq[-1]:
                parts.append(f"lr {x:g}: {vq[-1]:.3g} against {vp[-1]:.3g} ({_ratio(vq[-1], vp[-1]):.3g}x)")
        else:
            kp, kq = peak(pair["peri"]), peak(pair["pre"])
            if kp and kq:
                parts.append(f"lr {x:g}: Pre-LN {kq['value']:.4g}, Peri-LN {kp['value']:.4g} "
                             f"({_ratio(kq['value'], kp['value']):.3g}x)")
    if not parts:
        return ""
    return f" At the other learning rates (the verdict is lr {lr:g}'s): {'; '.join(parts)}."


def _loss_verdict(peri: float, pre: float, tol: float) -> tuple[str, str]:
    """(status, sentence end) for "Peri-LN's loss is equal or lower", within `tol` nats."""
    if peri < pre - tol:
        return "reproduced", f", lower by more than the tolerance {tol:.3f}."
    if peri <= pre + tol:
        return "reproduced", f", equal within the tolerance {tol:.3f} (not lower)."
    return "not reproduced", f", higher by more than the tolerance {tol:.3f}."


def loss_tolerance(peri: list[RunSummary], pre: list[RunSummary]) -> float:
    """LOSS_TOLERANCE, or with several seeds twice the larger seed-to-seed standard deviation if that is more."""
    spreads = [statistics.stdev(x) for x in ([r.valid_loss for r in peri if r.valid_loss is not None],
                                             [r.valid_loss for r in pre if r.valid_loss is not None]) if len(x) >= 2]
    return max([LOSS_TOLERANCE] + [2 * s for s in spreads])


def classify(runs: list[RunSummary], lr: float) -> list[Finding]:
    """Which of the paper's findings the runs reproduce. `runs`: every run (main, seeds, sweep); the
    comparison at `lr` uses the runs at that learning rate (all their seeds)."""
    at = {p: [r for r in runs if r.placement == p and math.isclose(r.lr, lr)] for p, _ in PLACEMENTS}
    main = {p: min(at[p], key=lambda r: r.seed) if at[p] else None for p, _ in PLACEMENTS}
    peri, pre = main["peri"], main["pre"]
    findings = []

    # 1. variance growth with depth
    name = "Pre-LN's hidden-state variance grows far more with depth than Peri-LN's"
    vp, vq = (peri.layer("layer_variance") if peri else []), (pre.layer("layer_variance") if pre else [])
    if len(vp) < 2 or len(vq) < 2 or None in (vp[0], vp[-1], vq[0], vq[-1]):
        findings.append(Finding(name, "not shown", "no per-layer measurement of both models (a run diverged?)"))
    else:
        last = _ratio(vq[-1], vp[-1])
        growth_pre, growth_peri = _ratio(vq[-1], vq[0]), _ratio(vp[-1], vp[0])
        growth = _ratio(growth_pre, growth_peri)
        evidence = (f"At layer {len(vq) - 1} Pre-LN's variance is {vq[-1]:.3g} against Peri-LN's {vp[-1]:.3g} "
                    f"({last:.3g}x); from layer 0 (the embedding output) it grows {growth_pre:.3g}x against "
                    f"{growth_peri:.3g}x ({growth:.3g}x).")
        if last >= FAR_MORE and growth >= FAR_MORE:
            status = "reproduced"
        elif last <= 1 or growth <= 1:
            status = "not reproduced"
        else:
            status = "partly"
            evidence += f" Same direction, but not {FAR_MORE:g}x in both."
        findings.append(Finding(name, status, evidence + _other_lrs(runs, lr, "variance")))

    # 2. massive activations
    name = "Pre-LN develops massive activations, Peri-LN keeps them bounded"
    kp, kq = (peak(peri) if peri else None), (peak(pre) if pre else None)
    if kp is None or kq is None:
        findings.append(Finding(name, "not shown", "no per-layer measurement of both models (a run diverged?)"))
    else:
        ratio = _ratio(kq["value"], kp["value"])
        evidence = (f"Largest |activation|: Pre-LN {kq['value']:.4g} (layer {kq['layer']}), Peri-LN {kp['value']:.4g} "
                    f"(layer {kp['layer']}), {ratio:.3g}x.")
        if ratio >= FAR_MORE:
            status = "reproduced"
        elif ratio <= 1:
            status = "not reproduced"
        else:
            status = "partly"
            evidence += f" Same direction, but less than {FAR_MORE:g}x."
        findings.append(Finding(name, status, evidence + _other_lrs(runs, lr, "max_abs")))

    # 3. loss at the same learning rate
    name = f"Peri-LN reaches an equal or lower validation loss (lr {lr:g})"
    lp = [r.valid_loss for r in at["peri"] if r.valid_loss is not None]
    lq = [r.valid_loss for r in at["pre"] if r.valid_loss is not None]
    if not lp or not lq:
        diverged = [LABEL[p] for p, _ in PLACEMENTS if any(r.status == "diverged" for r in at[p])]
        findings.append(Finding(name, "not shown", f"no final validation loss from {' and '.join(diverged) or 'a run'} "
                                                   "(diverged)"))
    else:
        tol = loss_tolerance(at["peri"], at["pre"])
        mp, mq = statistics.mean(lp), statistics.mean(lq)
        seeds = f" (mean of {len(lp)} / {len(lq)} seeds)" if max(len(lp), len(lq)) > 1 else ""
        evidence = f"Peri-LN {mp:.4f}, Pre-LN {mq:.4f}{seeds}: Peri-LN is {mp - mq:+.4f} nats"
        status, verdict = _loss_verdict(mp, mq, tol)
        findings.append(Finding(name, status, evidence + verdict + _curves(peri, pre)))

    # 4. stability over the learning rates tried
    name = "Pre-LN is less stable (divergence, loss spikes) where Peri-LN trains fine"
    lrs = sorted({r.lr for r in runs})
    worse, better = [], []  # learning rates where only Pre-LN / only Peri-LN was unstable
    for x in lrs:
        p = [r for r in runs if r.placement == "peri" and math.isclose(r.lr, x)]
        q = [r for r in runs if r.placement == "pre" and math.isclose(r.lr, x)]
        if not p or not q:
            continue
        if any(r.unstable for r in q) and not any(r.unstable for r in p):
            worse.append(x)
        if any(r.unstable for r in p) and not any(r.unstable for r in q):
            better.append(x)

    def events(p):
        rs = [r for r in runs if r.placement == p]
        return (f"{LABEL[p]}: {sum(r.status == 'diverged' for r in rs)} diverged, "
                f"{sum(len(r.loss_spikes) for r in rs)} loss spikes, {sum(len(r.grad_spikes) for r in rs)} "
                f"grad-norm spikes")

    evidence = f"Over {len(runs)} runs at lr {', '.join(f'{x:g}' for x in lrs)}: {events('peri')}; {events('pre')}."
    if worse and not better:
        status = "reproduced"
        evidence += f" Only Pre-LN was unstable at lr {', '.join(f'{x:g}' for x in worse)}."
    elif better and not worse:
        status = "not reproduced"
        evidence += f" Only Peri-LN was unstable at lr {', '.join(f'{x:g}' for x in better)}."
    elif worse and better:
        status = "not reproduced"
        evidence += (f" Mixed: only Pre-LN unstable at lr {', '.join(f'{x:g}' for x in worse)}, only Peri-LN at "
                     f"{', '.join(f'{x:g}' for x in better)}.")
    else:
        status = "not shown"
        evidence += " Neither model diverged or spiked where the other did not" + (
            "; try a learning-rate sweep (--sweep)." if len(lrs) == 1 else ".")
    findings.append(Finding(name, status, evidence))
    findings += sweep_findings(runs, lr) + seed_findings(at)
    return findings


def sweep_findings(runs: list[RunSummary], lr: float) -> list[Finding]:
    """With runs at more than one learning rate (same steps, first seed): the loss at each model's best
    learning rate, and the sensitivity to the learning rate (a diverged run counts as infinitely bad)."""
    others = [r for r in runs if not math.isclose(r.lr, lr)]
    if not others:
        return []
    steps, seed = others[0].steps, min(r.seed for r in runs)
    pool = [r for r in runs if r.steps == steps and r.seed == seed]
    lrs = sorted({r.lr for r in pool})
    loss = {p: {r.lr: (r.valid_loss if r.valid_loss is not None else math.inf) for r in pool if r.placement == p}
            for p, _ in PLACEMENTS}
    lrs = [x for x in lrs if x in loss["peri"] and x in loss["pre"]]
    if len(lrs) < 2:
        return []
    where = f"{steps}-step runs at lr {', '.join(f'{x:g}' for x in lrs)}"
    best = {p: min(lrs, key=lambda x: loss[p][x]) for p, _ in PLACEMENTS}
    bp, bq = loss["peri"][best["peri"]], loss["pre"][best["pre"]]
    name = "Peri-LN reaches an equal or lower validation loss, each model at its best learning rate"
    evidence = (f"Over the {where}: Peri-LN {_loss(bp)} (lr {best['peri']:g}), Pre-LN {_loss(bq)} "
                f"(lr {best['pre']:g}): Peri-LN is {bp - bq:+.4f} nats")
    status, verdict = _loss_verdict(bp, bq, LOSS_TOLERANCE)
    out = [Finding(name, status, evidence + verdict)]

    spread = {p: max(loss[p][x] for x in lrs) - min(loss[p][x] for x in lrs) for p, _ in PLACEMENTS}
    name = "Peri-LN is less sensitive to the learning rate"
    cells = "; ".join(f"{LABEL[p]} " + ", ".join(f"{_loss(loss[p][x])}" for x in lrs) for p, _ in PLACEMENTS)
    evidence = (f"Validation loss over the {where}: {cells}. Range: Peri-LN {_loss(spread['peri'])}, "
                f"Pre-LN {_loss(spread['pre'])} nats.".replace("diverged nats", "unbounded (a run diverged)"))
    if spread["peri"] < spread["pre"] - LOSS_TOLERANCE:
        status = "reproduced"
    elif spread["peri"] > spread["pre"] + LOSS_TOLERANCE:
        status = "not reproduced"
    else:
        status = "not shown"
        evidence += f" The ranges are equal within {LOSS_TOLERANCE:g}."
    out.append(Finding(name, status, evidence))
    return out


def _loss(x: float) -> str:
    return "diverged" if x == math.inf else f"{x:.4f}"


def seed_findings(at: dict) -> list[Finding]:
    """With several seeds at the main learning rate: the seed-to-seed spread of the validation loss."""
    values = {p: [r.valid_loss for r in at[p] if r.valid_loss is not None] for p, _ in PLACEMENTS}
    if min(len(v) for v in values.values()) < 2:
        return []
    sd = {p: statistics.stdev(v) for p, v in values.items()}
    name = "Peri-LN's validation loss varies less from seed to seed"
    evidence = (f"Standard deviation over {len(values['peri'])} / {len(values['pre'])} seeds: Peri-LN "
                f"{sd['peri']:.4f}, Pre-LN {sd['pre']:.4f} nats (so few seeds make this a weak test).")
    status = "reproduced" if sd["peri"] < sd["pre"] else "not reproduced"
    return [Finding(name, status, evidence)]


LOOP_TAIL = 12  # a continuation whose last 12 tokens repeat a pattern of at most 4 tokens ends in a loop


def degeneracy(ids: list[int]) -> str | None:
    """Why a generated continuation is degenerate, or None if it is not: empty, one token making up a
    third of it, a quarter or more of its tokens completing a 3-gram it already generated (it repeats
    itself), or ending in a loop (its last LOOP_TAIL tokens repeat a pattern of at most 4 tokens)."""
    if not ids:
        return "empty continuation"
    top = max(set(ids), key=ids.count)
    if ids.count(top) * 3 >= len(ids) and len(ids) >= 3:
        return f"one token makes up {ids.count(top)} of {len(ids)} generated tokens"
    seen, repeats = set(), 0
    for i in range(2, len(ids)):
        gram = tuple(ids[i - 2:i + 1])
        repeats += gram in seen
        seen.add(gram)
    if len(ids) > 2 and repeats * 4 >= len(ids) - 2:
        return f"{repeats} of its {len(ids) - 2} 3-grams repeat an earlier one (it repeats itself)"
    tail = ids[-LOOP_TAIL:]
    if len(tail) == LOOP_TAIL:
        for period in range(1, 5):
            if all(tail[i] == tail[i - period] for i in range(period, LOOP_TAIL)):
                return f"its last {LOOP_TAIL} tokens repeat a pattern of {period} (it ends in a loop)"
    return None


# ----------------------------------------------------------------------------- sampling

def export_and_sample(out: Path, ckpt: Path, prompt: str) -> dict:
    hf_dir = out / "hf_peri_ln"
    if not (hf_dir / "config.json").exists():
        run_tool([TOOLS / "convert_to_hf.py", ckpt, hf_dir, "--overwrite", "--quiet"], f"exporting Peri-LN to {hf_dir}")
    log("loading the export with stock transformers and generating")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    # All SAMPLE_TOKENS tokens: the end-of-document token does not stop generation (the model was trained on
    # documents joined by it, so it goes on with the next one), and a short answer cannot pass for a good one.
    generated = model.generate(ids, attention_mask=ids.new_ones(ids.shape), max_new_tokens=SAMPLE_TOKENS,
                               min_new_tokens=SAMPLE_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=None)
    new = generated[0, ids.shape[1]:].tolist()
    text = tokenizer.decode(generated[0], skip_special_tokens=False)
    verdict = degeneracy(new)
    log(f"{type(model).__name__} greedy sample: {text!r} ({'degenerate: ' + verdict if verdict else 'not degenerate'})")
    return {"model": f"{type(model).__name__} ({model.config.model_type})", "dir": hf_dir.name, "prompt": prompt,
            "text": text, "ids": new, "new_tokens": len(new), "degenerate": verdict}


# ----------------------------------------------------------------------------- report

def _g(x, spec=".3g") -> str:
    return "n/a" if x is None else format(x, spec)


def warnings(runs: list[RunSummary], stats: CorpusStats, tokens_per_step: int) -> list[str]:
    out = []
    for steps in sorted({r.steps for r in runs}):
        epochs = steps * tokens_per_step / max(stats.train_tokens, 1)
        if epochs > MAX_EPOCHS:
            out.append(f"{steps} steps x {tokens_per_step} tokens = {steps * tokens_per_step:,} tokens is {epochs:.1f} "
                       f"epochs over the training split ({stats.train_tokens:,} tokens): the corpus is too small for "
                       f"the steps (more than {MAX_EPOCHS:g} epochs); the models see the same text repeatedly and "
                       "the validation loss measures memorisation as much as learning. Give more text or fewer --steps.")
    for r in runs:
        if len(r.valid_curve) < 2:
            continue
        best_step, best = min(r.valid_curve, key=lambda sv: sv[1])
        last_step, last = r.valid_curve[-1]
        train_then = [l for s, l in r.train_curve if s <= best_step][-1:]
        train_now = [l for s, l in r.train_curve if s <= last_step][-1:]
        if last > best + OVERFIT_RISE and train_then and train_now and train_now[0] < train_then[0]:
            out.append(f"{r.label} (lr {r.lr:g}, seed {r.seed}): validation loss rose from {best:.4f} (step {best_step}) "
                       f"to {last:.4f} (step {last_step}) while training loss fell from {train_then[0]:.4f} to "
                       f"{train_now[0]:.4f}: it is overfitting.")
    return out


def layer_table(peri: RunSummary, pre: RunSummary) -> list[str]:
    lines = ["| layer | variance Peri-LN | variance Pre-LN | max\\|act\\| Peri-LN | max\\|act\\| Pre-LN | "
             "attn / MLP out RMS Peri-LN | attn / MLP out RMS Pre-LN | out-norm gain attn / MLP (Peri-LN) |",
             "|---|---|---|---|---|---|---|---|"]
    n = max(len(peri.layer("layer_variance")), len(pre.layer("layer_variance")))

    def at(run, key, i):
        values = run.layer(key)
        return values[i] if i < len(values) else None

    for i in range(n):
        name = "0 (embedding)" if i == 0 else str(i)
        sub = lambda r: "-" if i == 0 else f"{_g(at(r, 'attn_out_rms', i))} / {_g(at(r, 'mlp_out_rms', i))}"  # noqa: E731
        gain = "-" if i == 0 else f"{_g(at(peri, 'attn_out_gain', i))} / {_g(at(peri, 'mlp_out_gain', i))}"
        lines.append(f"| {name} | {_g(at(peri, 'layer_variance', i))} | {_g(at(pre, 'layer_variance', i))} | "
                     f"{_g(at(peri, 'layer_max_abs', i), '.4g')} | {_g(at(pre, 'layer_max_abs', i), '.4g')} | "
                     f"{sub(peri)} | {sub(pre)} | {gain} |")
    return lines


def activation_lines(run: RunSummary) -> list[str]:
    k = peak(run)
    if k is None:
        return [f"- {run.label}: no per-layer measurement."]
    top = ", ".join(f"{d} ({s:.1%})" for d, s in (k["top_dims"] or []))
    line = (f"- {run.label}: the largest |activation| is {k['value']:.4g} at layer {k['layer']}, hidden dimension "
            f"{k['dim']}. The dimensions with the largest share of that layer's sum of squares: {top}"
            + (f", together {sum(s for _, s in k['top_dims']):.1%} (an even spread over {run.hidden} dimensions "
               f"gives each {1 / run.hidden:.1%})." if k["top_dims"] else "."))
    line += f" The residual stream's max|act| reaches half of that at layer {k['half_layer']}."
    if k["write"]:
        line += (f" The largest single write is layer {k['write']['layer']}'s {k['write']['sublayer']} output, "
                 f"max|act| {k['write']['value']:.4g} before the residual add.")
    sumsq = run.layer("layer_max_token_sumsq")
    maxes = run.layer("layer_max_abs")
    over = [i for i, v in enumerate(sumsq) if v is not None and v > 65504]
    line += (f" fp16 headroom: max|act| is {max(m for m in maxes if m is not None) / 65504:.2%} of 65504; "
             + (f"a token's sum of squares exceeds 65504 (an fp16 norm that sums squares in fp16 overflows) "
                f"from layer {over[0]} on (largest {max(sumsq):.4g})." if over else
                f"no token's sum of squares exceeds it (largest {max(v for v in sumsq if v is not None):.4g})."))
    return [line]


def write_report(out: Path, args, runs: list[RunSummary], findings: list[Finding], stats: CorpusStats,
                 sample: dict | None, check: dict | None, plots: list[Path], timing: dict) -> Path:
    tokens_per_step = args.batch * args.seq_length
    main = {p: next((r for r in runs if r.placement == p and r.run_dir.name == p), None) for p, _ in PLACEMENTS}
    peri, pre = main["peri"], main["pre"]
    seen = args.steps * tokens_per_step
    lines = ["# Peri-LN vs Pre-LN, in miniature", "",
             f"Corpus: {args.corpus_note}; {stats.documents} documents, {stats.tokens:,} tokens "
             f"(SentencePiece BPE, vocabulary {args.vocab_size}); training split {stats.train_tokens:,} tokens "
             f"in {stats.train_documents} documents, validation split {stats.valid_tokens:,} tokens.",
             f"Models: {args.layers} layers, hidden {args.hidden}, FFN {args.ffn}, {args.heads} heads "
             f"({args.groups} KV groups), sequence length {args.seq_length}; lr {args.lr:g} (cosine to lr/10, "
             f"warm-up {max(args.steps // 10, 1)} steps), same data order and initialisation seed for both.",
             f"Training: {args.steps} steps of {args.batch} x {args.seq_length} = {tokens_per_step:,} tokens: "
             f"{seen:,} tokens seen, {seen / max(stats.train_tokens, 1):.2f} epochs over the training split.",
             f"Reference: a context-free model (the training split's unigram frequencies) scores "
             f"{stats.unigram_valid_loss:.4f} nats on the validation split.",
             f"Wall time {fmt_time(timing['wall_s'])}, CPU time {fmt_time(timing['cpu_s'])} (user + system, all "
             f"processes) on {timing['cores']} cores, {args.jobs} training processes at a time; stages: "
             + ", ".join(f"{k} {fmt_time(v)}" for k, v in timing["stages_s"].items()) + ". "
             + (f"The load average over the last 5 minutes was {timing['load_average']:g}, above the {timing['cores']} "
                "cores: other processes competed for them, so the wall time is longer than on an idle machine."
                if timing["load_average"] > timing["cores"] else
                f"The load average over the last 5 minutes was {timing['load_average']:g}."), ""]
    warn = warnings(runs, stats, tokens_per_step)
    if warn:
        lines += ["## Warnings", ""] + [f"- {w}" for w in warn] + [""]
    lines += ["## What this run reproduces", "",
              f"Computed from the measurements below (classify() in periln_megatron/demo.py; \"far more\" means "
              f"at least {FAR_MORE:g}x):", ""]
    lines += [f.line() for f in findings]
    if sample is not None:
        lines.append(f"- **Peri-LN's export gives a non-degenerate greedy sample: "
                     f"{'no' if sample['degenerate'] else 'yes'}.** "
                     + (f"Degenerate: {sample['degenerate']}. {LONG_PRESET_HINT}" if sample["degenerate"] else
                        f"{sample['new_tokens']} new tokens: no token a third of them, fewer than a quarter of "
                        f"their 3-grams repeated, no loop of up to 4 tokens at the end."))
    lines.append("")
    if peri and pre:
        lines += [f"## Per layer, step {peri.measured_step} (Peri-LN) and {pre.measured_step} (Pre-LN)", "",
                  "Layer 0 is the embedding output; layer n the residual stream after layer n. Sublayer RMS: the "
                  "attention / MLP output as it enters the residual add.", ""]
        lines += layer_table(peri, pre) + [""]
        lines += ["## Where the massive activations sit", ""]
        lines += activation_lines(pre) + activation_lines(peri) + [""]
    lines += ["## Loss and spikes", "",
              "Spikes: the loss or the global grad norm above 3x the median of the previous 50 steps (the trainer's "
              "detector); a loss spike or a non-finite loss counts as instability, grad-norm spikes are listed.", "",
              "| run | lr | seed | steps | status | final train loss | final validation loss | max\\|act\\| | spikes "
              "| wall / CPU time |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        spikes = "; ".join(f"step {s}: {m}" for s, m in r.spikes) or "none"
        status = r.status + (f" ({r.message})" if r.message else "")
        maxes = [m for m in r.layer("layer_max_abs") if m is not None]
        lines.append(f"| {r.label} | {r.lr:g} | {r.seed} | {r.steps} | {status} | {_g(r.train_loss, '.4f')} | "
                     f"{_g(r.valid_loss, '.4f')} | {_g(max(maxes) if maxes else None, '.4g')} | {spikes} | "
                     f"{fmt_time(r.wall_s) if r.wall_s else 'n/a'} / {fmt_time(r.cpu_s) if r.cpu_s else 'n/a'} |")
    lines.append("")
    if check is not None and peri is not None and peri.valid_loss is not None:
        diff = abs(check["valid_loss"] - peri.valid_loss)
        agree = "agree" if diff <= 1e-4 * max(1.0, abs(peri.valid_loss)) else "DISAGREE"
        lines += ["## Parallelism check", "",
                  f"Peri-LN's step-{check['step']} checkpoint, resharded to {check['layout']} and evaluated by 2 "
                  f"processes with megatron-core's pipeline schedule: validation loss {check['valid_loss']:.6f}, against "
                  f"{peri.valid_loss:.6f} from the single training process ({agree}: difference {diff:.2g}).", ""]
    lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    if sample is not None:
        lines += ["## Hugging Face export", "",
                  f"{sample['model']} from `{sample['dir']}/`. Prompt: the first {PROMPT_WORDS} words of document "
                  f"{sample['doc']} (counted from 0) of `heldout.jsonl`, the held-back documents, never trained on "
                  f"(the first to start with {PROMPT_WORDS} plain words, or to be long enough if none does): "
                  f"{sample['prompt']!r}; the "
                  f"document goes on {sample['truth']!r}.", "",
                  f"Greedy, {SAMPLE_TOKENS} new tokens (`</s>` ends a document; generation goes on past it): "
                  f"{sample['text']!r}", ""]
    elif peri is not None:
        lines += ["## Hugging Face export", "", f"Not exported: Peri-LN {peri.status} ({peri.message}).", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    summary = {"findings": [f.__dict__ for f in findings], "sample": sample, "parallel_check": check,
               "timing": timing, "corpus": stats.__dict__,
               "runs": {r.run_dir.name: {k: (str(v) if isinstance(v, Path) else v) for k, v in r.__dict__.items()}
                        for r in runs}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return report


# ----------------------------------------------------------------------------- main

def parse_args(argv):
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="a configuration (default: default); the options below override it. long: 12 x 96 "
                             "for 3000 steps, the smallest measured whose Peri-LN sample is not degenerate "
                             "(docs/demo_search.md); quick: the test suite's minutes-long run")
    parser.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    parser.add_argument("--input", nargs="+", help="your own .jsonl (text field) or .txt files instead")
    d = PRESETS["default"]
    parser.add_argument("--steps", type=int, help=f"training steps per model (default preset: {d['steps']})")
    parser.add_argument("--layers", type=int, help=f"model depth ({d['layers']})")
    parser.add_argument("--hidden", type=int, help=f"hidden size ({d['hidden']}; the FFN keeps the preset's ratio to it)")
    parser.add_argument("--lr", type=float, help=f"peak learning rate of both models ({d['lr']:g})")
    parser.add_argument("--seeds", type=int, help=f"seeds per model at --lr, each a separate run ({d['seeds']})")
    parser.add_argument("--seed", type=int, default=1234, help="the first seed (default 1234)")
    parser.add_argument("--sweep", help="more learning rates, LR,LR,...: both models are trained at each "
                                        "(the default preset sweeps 0.03; --sweep '' for none)")
    parser.add_argument("--sweep-steps", type=int, help="steps of the sweep's runs (default: --steps)")
    parser.add_argument("--vocab-size", type=int, help=f"tokenizer vocabulary ({d['vocab_size']})")
    parser.add_argument("--seq-length", type=int, help=f"tokens per sequence ({d['seq_length']})")
    parser.add_argument("--batch", type=int, help=f"sequences per step ({d['batch']})")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="training processes at a time (default: one per core, at most 2)")
    parser.add_argument("--fresh", action="store_true", help="delete --out first instead of resuming")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.hidden != preset["hidden"] and "ffn" in preset:
        args.ffn = -(-int(args.hidden * preset["ffn"] / preset["hidden"]) // 8) * 8
    args.sweep = [float(x) for x in str(args.sweep).split(",") if x.strip()] if args.sweep else []
    args.sweep_steps = args.sweep_steps or args.steps
    args.split = "95,5,0"
    for name in ("steps", "layers", "hidden", "seeds", "jobs", "batch", "seq_length", "vocab_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.lr <= 0 or any(x <= 0 for x in args.sweep):
        parser.error("learning rates must be > 0")
    if args.hidden % args.heads:
        parser.error(f"--hidden must be a multiple of {args.heads} (the attention heads)")
    return args


CONFIG_KEYS = ("input", "vocab_size", "layers", "hidden", "ffn", "heads", "groups", "seq_length", "batch")


def check_config(out: Path, args) -> None:
    """An --out directory holds one configuration: a run with another shape or data cannot reuse it."""
    path = out / "demo_config.json"
    now = {k: getattr(args, k) for k in CONFIG_KEYS}
    if path.is_file():
        before = json.loads(path.read_text())
        changed = [f"--{k.replace('_', '-')} {before.get(k)} -> {now[k]}" for k in CONFIG_KEYS if before.get(k) != now[k]]
        if changed:
            raise SystemExit(f"demo: {out} was made with other settings ({'; '.join(changed)}): add --fresh to start "
                             "over there, or give another --out")
    else:
        path.write_text(json.dumps(now, indent=1))


def plan(args) -> list[Job]:
    jobs = [Job(p, p, args.lr, args.seed, args.steps, "main") for p, _ in PLACEMENTS]
    for s in range(1, args.seeds):
        jobs += [Job(f"{p}_seed{args.seed + s}", p, args.lr, args.seed + s, args.steps, "seed") for p, _ in PLACEMENTS]
    for x in args.sweep:
        if math.isclose(x, args.lr) and args.sweep_steps == args.steps:
            continue
        jobs += [Job(f"{p}_lr{x:g}", p, x, args.seed, args.sweep_steps, "sweep") for p, _ in PLACEMENTS]
    return jobs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = (REPO / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    check_config(out, args)
    started, cpu_started = time.monotonic(), cpu_seconds()
    stages = {}

    def stage(name: str, since: float) -> float:
        now = time.monotonic()
        stages[name] = round(now - since, 1)
        return now

    args.corpus_note = (", ".join(args.input) if args.input else
                        f"docstrings of Python {sys.version.split()[0]}'s standard library")

    corpus, heldout = build_corpus(out, args.input)
    tok = out / "tokenizer" / "spm"
    if not tok.with_suffix(".model").exists():
        run_tool([TOOLS / "train_tokenizer.py", "--input", corpus, "--model-prefix", tok,
                  "--vocab-size", args.vocab_size, "--model-type", "bpe", "--normalization", "nmt_nfkc"],
                 "training a SentencePiece BPE tokenizer")  # nmt_nfkc: what HF's fast tokenizer reproduces
    prefix = out / "data" / "corpus_text_document"
    if not prefix.with_suffix(".idx").exists():
        run_tool([TOOLS / "preprocess_data.py", "--input", corpus, "--output-prefix", out / "data" / "corpus",
                  "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tok.with_suffix(".model"),
                  "--append-eod", "--workers", "2"], "tokenising the corpus into a megatron indexed dataset")
    t = stage("data", started)
    stats = corpus_stats(prefix, [float(x) for x in args.split.split(",")], args.vocab_size + 16)
    # validation: the same batches at every evaluation, at most the validation split once over
    args.eval_iters = max(1, min(8, stats.valid_tokens // (args.batch * args.seq_length)))
    seen = args.steps * args.batch * args.seq_length
    log(f"training split: {stats.train_tokens:,} tokens; {args.steps} steps see {seen:,} tokens = "
        f"{seen / max(stats.train_tokens, 1):.2f} epochs")

    jobs = plan(args)
    Trainer(args, out, prefix, tok.with_suffix(".model")).run(jobs)
    t = stage("training", t)
    runs = [summarise_run(j.run_dir) for j in jobs]
    main_runs = {r.placement: r for r in runs if r.run_dir.name == r.placement}
    for r in runs:
        log(f"{r.label} (lr {r.lr:g}, seed {r.seed}): {r.status}, validation loss {_g(r.valid_loss, '.4f')}")

    check = None
    if main_runs["peri"].status == "finished":
        check = parallel_check(args, out, main_runs["peri"].run_dir, args.steps)
        log(f"{check['layout']} evaluation: {check['valid_loss']:.6f} (single process: "
            f"{main_runs['peri'].valid_loss:.6f})")

    t = stage("parallelism check", t)
    run_tool([TOOLS / "plot_diagnostics.py", main_runs["peri"].run_dir, main_runs["pre"].run_dir, "--out",
              out / "plots"], "plotting diagnostics")
    t = stage("plots", t)
    plots = sorted((out / "plots").glob("*.png"))
    findings = classify(runs, args.lr)
    sample = None
    if main_runs["peri"].status == "finished":
        prompt, truth, doc = sample_prompt(heldout)
        sample = export_and_sample(out, main_runs["peri"].run_dir, prompt)
        sample.update(truth=truth, doc=doc)
    stage("export and sample", t)
    timing = {"wall_s": round(time.monotonic() - started, 1), "cpu_s": round(cpu_seconds() - cpu_started, 1),
              "stages_s": stages, "load_average": round(os.getloadavg()[1], 1), "cores": os.cpu_count()}
    report = write_report(out, args, runs, findings, stats, sample, check, plots, timing)
    for f in findings:
        log(f"{f.name}: {f.status}")
    log(f"done in {fmt_time(timing['wall_s'])} (CPU {fmt_time(timing['cpu_s'])}): {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
