"""Where each run of a ladder stands, from its own directory (metrics.jsonl through read_metrics, the
exit status the runner left there) and, for Slurm runs, the queue.

    unsubmitted  nothing ran and no job holds it
    pending      queued (Slurm), or requeued after a preemption and waiting to resume
    running      a job or local process is training it
    finished     the last training step is train.steps and the trainer exited 0
    diverged     the trainer exited 3 (loss or grad norm NaN/Inf), or a logged loss is not finite
    failed       any other end: another exit status, or stopped before train.steps with no job left

Files in the run directory: EXIT_FILE (the trainer's exit status: written by the local runner and
by slurm/ladder_task.sh), PID_FILE (a local run's process). <ladder dir>/JOBS_FILE maps run name ->
Slurm job id (<array id>_<task>).
"""

from __future__ import annotations

import json
import math
import os
import pwd
import subprocess
from dataclasses import dataclass
from pathlib import Path

from periln_megatron.exit_codes import EXIT_FINISHED, EXIT_NONFINITE
from periln_megatron.training.metrics import MetricsError, read_metrics

EXIT_FILE = "ladder-exit"
PID_FILE = "ladder-pid"
JOBS_FILE = ".ladder-jobs.json"
STATES = ("unsubmitted", "pending", "running", "finished", "diverged", "failed")
QUEUED = {"PENDING": "pending", "REQUEUED": "pending", "REQUEUE_HOLD": "pending", "REQUEUE_FED": "pending",
          "CONFIGURING": "running", "RUNNING": "running", "COMPLETING": "running", "SUSPENDED": "running",
          "RESIZING": "running", "STAGE_OUT": "running", "SIGNALING": "running"}


@dataclass
class RunState:
    state: str
    job: str = "-"
    step: int | None = None
    loss: float | None = None
    exit: int | None = None
    note: str = ""


def read_exit(run_dir: Path) -> int | None:
    try:
        return int((Path(run_dir) / EXIT_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def write_exit(run_dir: Path, code: int) -> None:
    (Path(run_dir) / EXIT_FILE).write_text(f"{code}\n")


def last_training(records: dict[int, dict]) -> tuple[int | None, float | None]:
    steps = [s for s, r in records.items() if "loss" in r]
    return (steps[-1], records[steps[-1]]["loss"]) if steps else (None, None)


def nonfinite(records: dict[int, dict]) -> bool:
    return any(isinstance(r.get(k), float) and not math.isfinite(r[k])
               for r in records.values() for k in ("loss", "grad_norm", "valid_loss", "final_valid_loss"))


def load_jobs(ladder_dir: Path) -> dict[str, str]:
    path = Path(ladder_dir) / JOBS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def save_jobs(ladder_dir: Path, jobs: dict[str, str]) -> None:
    Path(ladder_dir).mkdir(parents=True, exist_ok=True)
    (Path(ladder_dir) / JOBS_FILE).write_text(json.dumps(jobs, indent=1, sort_keys=True) + "\n")


def queue_states(job_ids: list[str]) -> dict[str, str] | None:
    """Slurm job id (<array>_<task>) -> our state, for those of `job_ids` that squeue lists (this
    user's jobs: an id Slurm has already forgotten is simply absent). None when squeue cannot be
    asked (not installed, or it failed): then a queued run cannot be told from a stopped one."""
    if not job_ids:
        return {}
    try:
        r = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T", "-u", pwd.getpwuid(os.getuid()).pw_name],
                           capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    wanted = set(job_ids)
    out = {}
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in wanted and parts[1] in QUEUED:
            out[parts[0]] = QUEUED[parts[1]]
    return out


def _alive(run_dir: Path) -> bool:
    try:
        pid = int((run_dir / PID_FILE).read_text())
        os.kill(pid, 0)
        return True
    except (OSError, ValueError):
        return False


def run_state(run_dir: Path, steps: int, job: str = "-", queued: str | None = None) -> RunState:
    """The state of one run; `queued`: its state in the Slurm queue (None: not listed there)."""
    run_dir = Path(run_dir)
    records: dict[int, dict] = {}
    note = ""
    if (run_dir / "metrics.jsonl").is_file():
        try:
            records = read_metrics(run_dir)
        except MetricsError as e:
            note = str(e)
    step, loss = last_training(records)
    code = read_exit(run_dir)
    out = RunState("failed", job, step, loss, code, note)
    if queued:
        out.state = queued
    elif _alive(run_dir):
        out.state = "running"
    elif code == EXIT_NONFINITE or nonfinite(records):
        out.state = "diverged"
    elif code == EXIT_FINISHED and step == steps:
        out.state = "finished"
    elif code is None and not records and job == "-":
        out.state = "unsubmitted"
    elif code is None and not records:
        out.state = "failed"
        out.note = out.note or "the job left the queue without starting training (see its log)"
    elif code not in (None, EXIT_FINISHED):
        out.note = out.note or f"exit {code}"
    else:
        out.note = out.note or f"stopped at step {step} of {steps}"
    return out
