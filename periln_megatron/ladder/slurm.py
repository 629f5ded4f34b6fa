"""`periln-ladder submit` on Slurm: one job array per size, each task one run through
slurm/ladder_task.sh -> slurm/common.sh (container, requeue on USR1, exit statuses as the templates).

The array's tasks read their run from <ladder dir>/.ladder/<size>.tasks (line N+1: task N); the
index of a run is its place among the size's runs, so a resubmission of some runs keeps their
indices. sbatch and squeue run with this environment (SLURM_CONF included)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import periln_megatron
from periln_megatron.ladder.grid import Grid, Run

TASK_SCRIPT = "slurm/ladder_task.sh"


class SubmitError(RuntimeError):
    pass


def checkout() -> Path:
    """The checkout holding slurm/common.sh (the batch scripts run from it, as the templates do)."""
    repo = Path(periln_megatron.__file__).resolve().parents[1]
    if not (repo / TASK_SCRIPT).is_file() or not (repo / "slurm/common.sh").is_file():
        raise SubmitError(f"{repo} has no {TASK_SCRIPT}: submit from a periln-megatron checkout (pip install -e .)")
    return repo


def _tasks_line(run: Run) -> str:
    sets = [o for o in run.overrides if not o.startswith("checkpoint.dir=")]  # CKPT_DIR sets it
    return "\t".join([run.name, str(Path(run.recipe).resolve()), str(run.dir.resolve()), " ".join(sets)])


def submit_arrays(grid: Grid, names: set[str], max_concurrent: int | None, options: list[str],
                  say=print) -> dict[str, str]:
    """sbatch one array per size holding the runs in `names`; returns run name -> <array id>_<task>."""
    repo = checkout()
    jobs: dict[str, str] = {}
    meta = grid.dir.resolve() / ".ladder"
    (grid.dir.resolve() / "logs").mkdir(parents=True, exist_ok=True)
    meta.mkdir(parents=True, exist_ok=True)
    for size, runs in grid.sizes().items():
        todo = [(i, run) for i, run in enumerate(runs) if run.name in names]
        if not todo:
            continue
        tasks = meta / f"{size}.tasks"
        tasks.write_text("".join(_tasks_line(run) + "\n" for run in runs))
        array = ",".join(str(i) for i, _ in todo) + (f"%{max_concurrent}" if max_concurrent else "")
        first = runs[0]
        cmd = ["sbatch", "--parsable", f"--array={array}", f"--job-name={grid.name}-{size}",
               f"--nodes={first.nodes}", f"--ntasks-per-node={first.gpus_per_node}",
               f"--gpus-per-node={first.gpus_per_node}", f"--output={grid.dir.resolve()}/logs/%x-%A_%a.out",
               *options, str(repo / TASK_SCRIPT)]
        env = {**os.environ, "LADDER_TASKS": str(tasks), "REPO": str(repo)}
        try:
            r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
        except FileNotFoundError:
            raise SubmitError("sbatch not found: no Slurm here (use --local to run on this machine)") from None
        if r.returncode != 0:
            raise SubmitError(f"sbatch for {size} failed (exit {r.returncode}): {' '.join(r.stderr.split())}")
        array_id = r.stdout.strip().split(";")[0]
        for i, run in todo:
            jobs[run.name] = f"{array_id}_{i}"
        say(f"{size}: job array {array_id} ({len(todo)} runs, --array={array})")
    return jobs
