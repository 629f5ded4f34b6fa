"""The demo's processes: the training runs (each `periln-train` in a process forked from the demo's
(training/fork.py), --jobs at a time, progress and ETA read from each run's metrics.jsonl, the outcome
from its exit status), the parallelism check (2 ranks through torchrun), and the package's tools,
called in process through their `main`."""

from __future__ import annotations

import json
import os
import queue
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from periln_megatron.config.load import combine_overrides
from periln_megatron.demo.console import fmt_time, log
from periln_megatron.demo.summary import LABEL, OUTCOME, finished, run_metrics
from periln_megatron.exit_codes import EXIT_FINISHED, EXIT_NONFINITE
from periln_megatron.ladder.state import read_exit, write_exit
from periln_megatron.training.fork import fork_training, preload
from periln_megatron.training.metrics import series

# The base recipe of every run (the demo's --set overrides give the rest): package data, no checkout needed.
BASE_RECIPE = Path(__file__).with_name("recipe.yaml")
TOOL_MODULES = {  # the package's command-line tools the demo runs (tools/<name>.py are the same commands)
    "train_tokenizer": "periln_megatron.data.tokenizers.train",
    "preprocess_data": "periln_megatron.data.preprocess.cli",
    "plot_diagnostics": "periln_megatron.commands.plot_diagnostics",
}
POLL_S = 1.0  # how often a running job's metrics.jsonl is read for progress
STDOUT_LOG, STDERR_LOG = "train_stdout.log", "train_stderr.log"  # in the run directory, one launch's output


def run_module(name: str, args: list, what: str) -> None:
    """The package's tool `name` (a key of TOOL_MODULES) with `args`, through its `main` in this process."""
    import importlib

    log(what)
    argv = list(map(str, args))
    try:
        code = importlib.import_module(TOOL_MODULES[name]).main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 2
    if code:
        raise SystemExit(f"demo: {name} {' '.join(argv)} failed (exit {code})")


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Job:
    key: str          # run directory name under out/runs
    placement: str
    lr: float
    seed: int
    steps: int
    role: str         # main | seed | sweep
    run_dir: Path = None
    pid: int = 0
    code: int | None = None
    started: float = 0.0
    start_step: int = 0   # the last step logged before this launch (0: a fresh run)
    step: int = 0         # the last step whose record has been read from metrics.jsonl
    final_shown: bool = False
    outcome: dict | None = None
    cpu_s: float = 0.0

    @property
    def title(self) -> str:
        return f"{LABEL[self.placement]} (lr {self.lr:g}, seed {self.seed}, {self.steps} steps)"


def recipe_overrides(args, job: Job, run_dir: Path, prefix: Path, tokenizer: Path) -> list[str]:
    steps = job.steps
    return combine_overrides(_base_overrides(args, job, run_dir, prefix, tokenizer, steps),
                             stability_overrides(args, steps))


def _base_overrides(args, job: Job, run_dir: Path, prefix: Path, tokenizer: Path, steps: int) -> list[str]:
    return [
        f"name=demo-{job.key}", f"model.placement={job.placement}", f"model.num_layers={args.layers}",
        f"model.hidden_size={args.hidden}", f"model.num_attention_heads={args.heads}",
        f"model.num_query_groups={args.groups}", f"model.ffn_hidden_size={args.ffn}",
        f"model.seq_length={args.seq_length}", "model.vocab_size=null",
        "parallel.tp=1", "parallel.pp=1", f"train.global_batch_size={args.batch}",
        f"train.micro_batch_size={args.batch}", f"train.steps={steps}", f"train.seed={job.seed}",
        f"train.eval_interval={max(steps // 5, 1)}", f"train.eval_iters={args.eval_iters}",
        f"optim.lr={job.lr}", f"optim.min_lr={job.lr / 10}", f"optim.warmup_steps={max(steps // 10, 1)}",
        f"optim.clip_grad={args.clip_grad}",
        "data.synthetic=false", f"data.prefixes=[{prefix}]", f"data.split={args.split}",
        "tokenizer.type=SentencePieceTokenizer", f"tokenizer.model={tokenizer}",
        f"checkpoint.dir={run_dir}", f"checkpoint.interval={max(steps // 2, 1)}", "checkpoint.keep=1",
        f"diagnostics.interval={max(steps // 10, 1)}", "logging.interval=1",
        "logging.tensorboard=false",
    ]  # every step logged: the stability figures count steps (a JSON line per step costs nothing here)


def stability_overrides(args, steps: int) -> list[str]:
    """--on-spike rollback: a checkpoint every tenth of the run (a rollback loses at most that much), a
    short history before the spike score acts, and the same choice for a non-finite loss."""
    if getattr(args, "on_spike", "log") != "rollback":
        return []
    return ["stability.on_spike=rollback", "stability.on_nonfinite=rollback", "stability.skip_margin=1",
            f"stability.min_history={max(min(steps // 10, 10), 2)}", f"checkpoint.interval={max(steps // 10, 1)}",
            "stability.max_lost_fraction=0.2"]


def _tail(path: Path, lines: int) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""


class Trainer:
    """Runs the jobs, `jobs` single-process trainings at a time, and prints progress with an ETA."""

    def __init__(self, args, out: Path, prefix: Path, tokenizer: Path):
        self.args, self.out, self.prefix, self.tokenizer = args, out, prefix, tokenizer
        self.exited: queue.Queue = queue.Queue()

    def launch(self, job: Job) -> None:
        from periln_megatron.checkpoint.layout import latest_iteration

        job.run_dir = self.out / "runs" / job.key
        job.run_dir.mkdir(parents=True, exist_ok=True)
        resumed = latest_iteration(job.run_dir) or 0
        if resumed:
            print(f"  {job.title}: resuming from its step-{resumed} checkpoint", flush=True)
        # a killed run's records past its checkpoint stay in metrics.jsonl until the resumed run gets there
        job.start_step = job.step = max([resumed, *series(run_metrics(job.run_dir), "loss")])
        argv = ["--recipe", str(BASE_RECIPE), "--set",
                *recipe_overrides(self.args, job, job.run_dir, self.prefix, self.tokenizer)]
        threads = max(1, (os.cpu_count() or 1) // self.args.jobs)
        for name in (STDOUT_LOG, STDERR_LOG):  # one launch's output
            (job.run_dir / name).unlink(missing_ok=True)
        job.started = time.monotonic()
        job.pid = fork_training(argv, job.run_dir / STDOUT_LOG, job.run_dir / STDERR_LOG, threads=threads,
                                ignore_warnings=True)
        threading.Thread(target=self._wait, args=(job,), daemon=True).start()

    def _wait(self, job: Job) -> None:
        _, status, usage = os.wait4(job.pid, 0)  # the run's own CPU time, not only the total
        job.code = os.waitstatus_to_exitcode(status)
        job.cpu_s = usage.ru_utime + usage.ru_stime
        self.exited.put(job)

    def run(self, jobs: list[Job]) -> None:
        pending = []
        for job in jobs:
            job.run_dir = self.out / "runs" / job.key
            done = finished(job.run_dir)
            if done is not None and done.get("steps") == job.steps:
                job.outcome = done
                if read_exit(job.run_dir) is None:  # an --out made before the demo recorded exit statuses
                    write_exit(job.run_dir, EXIT_NONFINITE if done["status"] == "diverged" else EXIT_FINISHED)
                log(f"{job.title}: finished earlier ({done['status']}), kept")
            else:
                pending.append(job)
        running: list[Job] = []
        total = len(pending)
        if pending:
            preload()
        while pending or running:
            while pending and len(running) < self.args.jobs:
                job = pending.pop(0)
                log(f"training {job.title}: {self.args.layers} layers, hidden {self.args.hidden}, one process "
                    f"({total - len(pending)}/{total})")
                self.launch(job)
                running.append(job)
            try:
                ended = self.exited.get(timeout=POLL_S)
            except queue.Empty:
                ended = None
            for job in running:
                self.progress(job, running, pending)
            if ended is not None:
                running.remove(ended)
                self._finish(ended)

    def progress(self, job: Job, running: list[Job], pending: list[Job]) -> None:
        """A line for each step logged since the last look at the job's metrics.jsonl that is one of about 20
        a run (every step is logged), an evaluation or a spike."""
        every = max(job.steps // 20, 1)
        for step, record in run_metrics(job.run_dir).items():
            if step > job.step and isinstance(record.get("loss"), (int, float)):
                job.step = step
                shown = step % every == 0 or "valid_loss" in record or record.get("spike")
            else:
                shown = False
            if shown:
                print(f"  {job.title}: step {step}/{job.steps}, loss {record['loss']:.4f}"
                      + (f", valid {record['valid_loss']:.4f}" if "valid_loss" in record else "")
                      + (" SPIKE" if record.get("spike") else "") + f" | ETA {self.eta(job, running, pending)}",
                      flush=True)
            if "final_valid_loss" in record and step >= job.step and not job.final_shown:
                job.final_shown = True
                print(f"  {job.title}: final valid_loss {record['final_valid_loss']:.4f}", flush=True)

    def eta(self, job: Job, running: list[Job], pending: list[Job]) -> str:
        """This run's remaining time, and all training's (the queue spread over the parallel slots)."""
        now = time.monotonic()

        def per_step(j: Job) -> float | None:
            done = j.step - j.start_step
            return (now - j.started) / done if done > 0 else None

        rates = [r for r in map(per_step, running) if r is not None]
        rate = statistics.mean(rates) if rates else 0.0
        mine = (job.steps - job.step) * (per_step(job) or 0.0)
        rest = sum((j.steps - j.step) * (per_step(j) or rate) for j in running)
        rest += sum(j.steps * rate for j in pending)
        return f"this run {fmt_time(mine)}, all training {fmt_time(max(mine, rest / self.args.jobs))}"

    def _finish(self, job: Job) -> None:
        code = job.code
        write_exit(job.run_dir, code)  # what the ladder's run state reads (demo/ladder.py)
        errors = _tail(job.run_dir / STDERR_LOG, 40)
        if code == EXIT_FINISHED:
            status, message = "finished", ""
        elif code == EXIT_NONFINITE:
            status = "diverged"
            last = errors.splitlines()[-1] if errors.strip() else "non-finite loss or grad norm"
            message = last.removeprefix("periln-train: error: ")
            log(f"{job.title}: DIVERGED: {message}")
        else:
            raise SystemExit(f"demo: training {job.title} failed (exit {code}); the end of its output "
                             f"({job.run_dir / STDOUT_LOG}, {STDERR_LOG}):\n{_tail(job.run_dir / STDOUT_LOG, 20)}\n"
                             f"{errors}")
        job.outcome = {"status": status, "message": message, "steps": job.steps,
                       "wall_s": round(time.monotonic() - job.started, 1), "cpu_s": round(job.cpu_s, 1)}
        (job.run_dir / OUTCOME).write_text(json.dumps(job.outcome))
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
    result = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        raise SystemExit(f"demo: the {name} check failed (exit {result.returncode}):\n{result.stdout[-3000:]}")
    finals = series(run_metrics(target), "final_valid_loss")
    if not finals:
        raise SystemExit(f"demo: the {name} check logged no final validation loss in {target / 'metrics.jsonl'}")
    check = {"layout": name, "step": int(latest), "valid_loss": finals[max(finals)],
             "wall_s": round(time.monotonic() - started, 1)}
    done.write_text(json.dumps(check))
    shutil.rmtree(target / it_dir, ignore_errors=True)  # the copy served its purpose
    return check

