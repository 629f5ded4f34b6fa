"""`periln-ladder submit --local`: the grid's runs on this machine, `jobs` at a time.

A one-GPU (or CPU) run is forked from this process after it has imported the trainer once, so a
CPU miniature does not pay torch's and megatron-core's import per run; a run of several GPUs goes
through periln-launch (torchrun) with --nproc_per_node = the grid's gpus_per_node (nodes must be 1).
Each run writes <run dir>/train.log and, when it ends, its exit status to <run dir>/ladder-exit. The
runs stay in this process group: Ctrl-C reaches each, which saves a checkpoint and exits 75, and a
later submit resumes them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from periln_megatron.exit_codes import EXIT_INTERRUPTED
from periln_megatron.ladder.grid import Run
from periln_megatron.ladder.state import EXIT_FILE, PID_FILE, write_exit
from periln_megatron.training.fork import fork_training, preload

LOG_FILE = "train.log"


def _train_args(run: Run) -> list[str]:
    return ["--recipe", run.recipe, "--set", *run.overrides]


def _fork(run: Run) -> int:
    return fork_training(_train_args(run), run.dir / LOG_FILE, threads=int(os.environ.get("OMP_NUM_THREADS") or 1))


def _launch(run: Run) -> subprocess.Popen:
    log = open(run.dir / LOG_FILE, "ab")
    cmd = [sys.executable, "-m", "periln_megatron.launch", "--standalone", f"--nproc_per_node={run.gpus_per_node}",
           "-m", "periln_megatron.train", *_train_args(run)]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def run_local(runs: list[Run], jobs: int, say=print) -> dict[str, int]:
    """Run `runs` (resuming any with a checkpoint), `jobs` at a time; returns name -> exit status."""
    for run in runs:
        if run.nodes > 1:
            raise ValueError(f"run {run.name}: {run.nodes} nodes; --local runs on one machine (set nodes: 1)")
    if any(run.gpus == 1 for run in runs):
        preload()

    pending, active, codes = list(runs), {}, {}
    try:
        while pending or active:
            while pending and len(active) < jobs:
                run = pending.pop(0)
                run.dir.mkdir(parents=True, exist_ok=True)
                (run.dir / EXIT_FILE).unlink(missing_ok=True)
                pid = _fork(run) if run.gpus == 1 else _launch(run).pid
                (run.dir / PID_FILE).write_text(f"{pid}\n")
                active[pid] = run
                say(f"started {run.name} (pid {pid}, log {run.dir / LOG_FILE})")
            pid, status = os.wait()
            run = active.pop(pid, None)
            if run is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            code = 128 - code if code < 0 else code
            write_exit(run.dir, code)
            (run.dir / PID_FILE).unlink(missing_ok=True)
            codes[run.name] = code
            say(f"{run.name}: exit {code}")
    except KeyboardInterrupt:  # the runs share this terminal's Ctrl-C: each saves a checkpoint and exits 75
        for pid, run in list(active.items()):
            _, status = os.waitpid(pid, 0)
            write_exit(run.dir, os.waitstatus_to_exitcode(status))
            (run.dir / PID_FILE).unlink(missing_ok=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
    return codes


def log_path(run: Run) -> Path:
    return run.dir / LOG_FILE
