"""periln-ladder submit on the real one-node Slurm fixture: a miniature grid as a job array through
slurm/ladder_task.sh -> common.sh, one task preempted by USR1 (save, requeue, resume), the states
in `status`, a report equal to the runs' metrics.jsonl, and a resubmission that submits nothing."""

from __future__ import annotations

import csv
import json
import re
import statistics
import subprocess
import sys

import pytest

from slurm_cluster import REPO, slurm  # noqa: F401  (pytest fixture)
from test_slurm import read, wait_for_log, wait_through_requeue


STEPS = 20
GRID = {"name": "slmini", "recipes": ["recipes/tiny/peri_ln.yaml"], "placements": ["peri", "pre"],
        "seeds": [1, 2], "lrs": [1.0e-2],
        "set": [f"train.steps={STEPS}", f"train.eval_interval={STEPS}", "train.eval_iters=1",
                f"diagnostics.interval={STEPS}", "checkpoint.interval=0"], "nodes": 1, "gpus_per_node": 1}
# stand-ins for this GPU-less 2-core machine; they come after the grid's own and win
SBATCH = ["--", "--gpus-per-node=0", "--cpus-per-task=1", "--exclusive=user"]


def ladder(cluster, *args) -> subprocess.CompletedProcess:
    env = {**cluster.env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "VENV": sys.prefix}
    r = subprocess.run([sys.executable, "tools/ladder.py", *args], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def preempt(cluster, job: str) -> subprocess.Popen:
    """A preemption notice (USR1) to one array task's batch shell, as a site's preemption sends it.
    This Slurm (22.05) delivers it but answers "Job can not be altered now" while the task has a
    running srun step, and scancel re-sends it every 5 s: the trainer must survive the repeats that
    arrive after its save, while it exits 75 (it ignores its stop signals once the loop is over).
    The caller stops scancel once the task has requeued."""
    return subprocess.Popen(["scancel", "--signal=USR1", "--batch", job], env=cluster.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def status_rows(text: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split()[1:] for line in text.splitlines()[1:-1]}


def submit_array(slurm, root):
    """Submit the grid, preempt task 0 once it trains, wait for every task, resubmit, report."""
    grid = root / "grid.yaml"
    grid.write_text(json.dumps({**GRID, "dir": str(root / "runs")}))
    first = ladder(slurm, "submit", str(grid), "--max-concurrent", "2", *SBATCH)
    array_id = re.search(r"job array (\d+) \(4 runs, --array=0,1,2,3%2\)", first.stdout).group(1)
    task = f"{array_id}_0"
    log = root / "runs" / "logs" / f"slmini-tiny-{array_id}_0.out"
    wait_for_log(slurm, task, log, r"^step 2/", timeout=150)
    notice = preempt(slurm, task)
    try:
        wait_for_log(slurm, task, log, r"requeueing job", timeout=90)
    finally:
        notice.kill()
        notice.wait()
    requeued = ladder(slurm, "status", str(grid)).stdout
    wait_through_requeue(slurm, task, timeout=180)
    for other in "123":
        slurm.wait_job(f"{array_id}_{other}", timeout=180)
    done = ladder(slurm, "status", str(grid)).stdout
    before = slurm._run(["squeue", "-h", "-r", "-o", "%i"]).stdout
    again = ladder(slurm, "submit", str(grid), *SBATCH).stdout
    after = slurm._run(["squeue", "-h", "-r", "-o", "%i"]).stdout
    ladder(slurm, "report", str(grid))
    return {"root": root, "array": array_id, "log": read(log), "requeued": requeued, "done": done,
            "again": again, "queue": (before, after)}


def check_preempted_task_requeued_and_resumed(array):
    text = array["log"]
    first, _, second = text.partition("requeueing job")
    stop = int(re.findall(r"saved checkpoint iteration (\d+) to ", first)[0])
    assert 2 <= stop < STEPS and "SIGUSR1 received" in first, text[-3000:]
    assert re.search(rf"resumed from iteration {stop} \(", second) and f"step {STEPS}/{STEPS} |" in second


def check_status_shows_states_and_jobs(array):
    rows = status_rows(array["requeued"])
    name = "tiny-peri-lr0.01-s1"
    assert rows[name][:2] in (["pending", f"{array['array']}_0"], ["running", f"{array['array']}_0"]), array["requeued"]
    assert rows[name][2] != "-"  # the steps trained before the preemption
    rows = status_rows(array["done"])
    assert len(rows) == 4 and all(r[0] == "finished" and r[2] == str(STEPS) for r in rows.values()), array["done"]
    assert {r[1] for r in rows.values()} == {f"{array['array']}_{i}" for i in range(4)}


def check_resubmission_submits_nothing(array):
    assert "4 runs (4 finished); submitting 0" in array["again"], array["again"]
    assert array["queue"][0] == array["queue"][1]


def check_report_equals_the_runs_metrics(array):
    rows = list(csv.DictReader((array["root"] / "runs" / "summary.csv").open()))
    assert [(r["placement"], r["lr"], r["n_seeds"], r["n_diverged"]) for r in rows] == [
        (p, "0.01", "2", "0") for p in ("peri", "pre")]
    for row in rows:
        losses = []
        for seed in (1, 2):
            path = array["root"] / "runs" / f"tiny-{row['placement']}-lr{row['lr']}-s{seed}" / "metrics.jsonl"
            losses += [json.loads(ln)["final_valid_loss"] for ln in path.read_text().splitlines()
                       if "final_valid_loss" in ln]
        assert len(losses) == 2
        assert float(row["val_loss_mean"]) == pytest.approx(statistics.fmean(losses), rel=1e-12)
        assert float(row["val_loss_std"]) == pytest.approx(statistics.stdev(losses), rel=1e-12)


def test_grid_as_a_job_array_on_slurm(slurm, tmp_path):
    """One test, one submission: its checks share the array's ~60 s (module-scoped fixtures were set up
    twice when pytest-xdist did not run the tests one after another)."""
    array = submit_array(slurm, tmp_path)
    check_preempted_task_requeued_and_resumed(array)
    check_status_shows_states_and_jobs(array)
    check_resubmission_submits_nothing(array)
    check_report_equals_the_runs_metrics(array)
