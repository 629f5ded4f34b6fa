"""The Slurm templates, submitted with real sbatch to a one-node Slurm cluster on 127.0.0.1.

Templates run unchanged: overrides are environment variables, plus sbatch command-line options
that stand in for this GPU-less 2-core machine (1 node, 2 tasks, no GPUs, log into tmp).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from slurm_cluster import REPO, TERMINAL, slurm  # noqa: F401  (pytest fixture)


TEMPLATE = "slurm/peri_3b.sbatch"
TINY = "recipes/tiny/peri_ln.yaml"
TEMPLATES = sorted((REPO / "slurm").glob("*.sbatch"))
STEP = re.compile(r"^step (\d+)/(\d+) \|", re.M)


def submit(cluster, tmp: Path, env: dict, name: str, template: str = TEMPLATE, options=()) -> tuple[str, Path]:
    """sbatch the template from the repo root; returns (job id, log path)."""
    log = tmp / f"{name}.out"
    env = {"OMP_NUM_THREADS": "1", "CKPT_DIR": str(tmp / "ckpt"), **env}
    opts = ["-N1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={log}", f"--job-name={name}",
            *options]
    return cluster.sbatch([template], env=env, options=opts), log


def read(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


def steps(text: str) -> list[int]:
    return [int(m.group(1)) for m in STEP.finditer(text)]


def wait_for_log(cluster, job: str, log: Path, pattern: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = read(log)
        if re.search(pattern, text, re.M):
            return text
        info = cluster.job(job)
        if info and info.state in {"FAILED", "CANCELLED", "COMPLETED", "TIMEOUT"}:
            break
        time.sleep(0.3)
    raise AssertionError(f"{pattern!r} not in the log of job {job} ({cluster.job(job)}):\n{read(log)[-5000:]}")


def wait_through_requeue(cluster, job: str, timeout: float):
    """Wait until the job has been requeued and finished again. Slurm holds a requeued job for a
    BeginTime a little in the future (to let the nodes clean up); on this idle test cluster start it
    sooner, but not within the second its old credential was revoked in: slurmd compares whole
    seconds and would refuse the launch ("Job credential revoked")."""
    deadline = time.monotonic() + timeout
    info, pending_since = None, None
    while time.monotonic() < deadline:
        info = cluster.job(job)
        if info and info.restarts >= 1 and info.state in TERMINAL:
            return info
        if info and info.restarts >= 1 and info.state == "PENDING":
            pending_since = pending_since or time.monotonic()
            if time.monotonic() - pending_since >= 2.0:
                cluster.release_begin_time(job)
        time.sleep(0.5)
    raise AssertionError(f"job {job} did not finish after a requeue: {info.fields if info else None}")


def must(info, log: Path, state="COMPLETED", exit_code="0:0"):
    assert (info.state, info.exit_code) == (state, exit_code), f"{info.fields}\n--- job log\n{read(log)[-6000:]}"


# ----------------------------------------------------------------------------- static checks

@pytest.mark.parametrize("path", [*TEMPLATES, REPO / "slurm/common.sh", REPO / "slurm/ladder_task.sh",
                                  REPO / "tools/ensure_slurm.sh"],
                         ids=lambda p: p.name)
def test_shellcheck(path):
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck not installed (tools/ensure_slurm.sh installs it as root)")
    r = subprocess.run(["shellcheck", "-x", "-S", "style", str(path.relative_to(REPO))], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_templates_share_common_body():
    expected = {"peri_3b", "peri_1.5b", "peri_400m", "pre_3b", "pre_1.5b", "pre_400m"}
    assert expected <= {p.stem for p in TEMPLATES}
    for path in TEMPLATES:
        text = path.read_text()
        header = re.findall(r"^#SBATCH (\S+)", text, re.M)
        for opt in ("--exclusive", "--requeue", "--open-mode=append", "--output=logs/%x-%j.out",
                    "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=8"):
            assert opt in header, (path.name, opt)
        assert any(o.startswith("--signal=B:USR1@") for o in header), path.name
        recipe = re.search(r'^: "\$\{RECIPE:=(\S+)\}"$', text, re.M)
        assert recipe, path.name
        assert "periln_main" in text and "slurm/common.sh" in text
        # Nothing but the header, the default recipe and the call into common.sh.
        body = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        assert len(body) <= 4, (path.name, body)
    nodes = {p.stem: int(re.search(r"^#SBATCH --nodes=(\d+)", p.read_text(), re.M).group(1)) for p in TEMPLATES}
    assert nodes["peri_400m"] == 1 and nodes["peri_1.5b"] == 2 and nodes["peri_3b"] == 4
    common = (REPO / "slurm/common.sh").read_text()
    for var in ("CUDA_DEVICE_MAX_CONNECTIONS", "TORCH_NCCL_AVOID_RECORD_STREAMS", "NCCL_IB_TIMEOUT"):
        assert re.search(rf'^\s*#.*\n\s*: "\$\{{{var}:=', common, re.M), f"{var} needs a comment and := default"


def test_the_batch_scripts_recipe_check_does_not_import_torch():
    """periln_preflight (slurm/common.sh) validates the recipe, its layout for the job's ranks and its
    data files on the batch node before srun starts anything, in a fresh interpreter of its own: it
    must not load torch (~3 s a submission) for it. Its own snippet, run as the batch script runs it."""
    import sys

    snippet = re.search(r"<<'PY' 2>&1\n(.*?)\nPY\n", (REPO / "slurm/common.sh").read_text(), re.S).group(1)
    code = snippet + "\nprint('torch loaded' if 'torch' in sys.modules else 'torch not loaded')\n"

    def check(layout: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code, str(REPO / TINY), layout], cwd=REPO, capture_output=True,
                              text=True, timeout=60, env={**os.environ, "SLURM_NTASKS": "2", "PYTHONPATH": str(REPO)})

    r = check("parallel.tp=2")
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "torch not loaded", r.stdout + r.stderr
    bad = check("parallel.tp=3")
    assert bad.returncode == 2 and "parallel.tp" in bad.stdout, bad.stdout + bad.stderr


# ----------------------------------------------------------------------------- the cluster

def test_cluster_runs_two_tasks(slurm, tmp_path):
    script = tmp_path / "hello.sbatch"
    script.write_text("#!/bin/bash\nsrun bash -c 'echo rank $SLURM_PROCID/$SLURM_NTASKS'\n")
    log = tmp_path / "hello.out"
    job = slurm.sbatch([str(script)], options=["-N1", "--ntasks-per-node=2", f"--output={log}"])
    info = slurm.wait_job(job, timeout=60)
    must(info, log)
    assert sorted(read(log).split("\n")[:2]) == ["rank 0/2", "rank 1/2"]


# ----------------------------------------------------------------------------- fail fast

def test_missing_recipe_fails_before_launch(slurm, tmp_path):
    job, log = submit(slurm, tmp_path, {"RECIPE": "recipes/no_such_recipe.yaml"}, "bad-recipe")
    info = slurm.wait_job(job, timeout=60)
    must(info, log, "FAILED", "2:0")
    text = read(log)
    assert "recipe file not found: recipes/no_such_recipe.yaml" in text
    assert "launch:" not in text and not steps(text)


def test_missing_data_prefix_fails_before_launch(slurm, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a_text_document.bin").write_bytes(b"")
    (data / "a_text_document.idx").write_bytes(b"")
    (data / "b_text_document.bin").write_bytes(b"")  # no .idx
    env = {"RECIPE": TINY, "DATA_PREFIXES": f"0.3 {data}/a_text_document 0.7 {data}/b_text_document"}
    job, log = submit(slurm, tmp_path, env, "bad-data")
    info = slurm.wait_job(job, timeout=60)
    must(info, log, "FAILED", "2:0")
    text = read(log)
    assert f"data prefix files not found: {data}/b_text_document.idx" in text
    assert "a_text_document" not in text.split("not found:")[1].split("(DATA_PREFIXES")[0]
    assert "launch:" not in text and not steps(text)


def test_overrides_reach_the_trainer_command(slurm, tmp_path):
    """Environment overrides become the trainer's arguments (launcher stubbed with `echo`)."""
    data = tmp_path / "data"
    data.mkdir()
    for stem in ("a_text_document", "b_text_document"):
        for ext in (".bin", ".idx"):
            (data / (stem + ext)).write_bytes(b"")
    env = {"RECIPE": TINY, "PERILN_TRAIN": "echo ARGS", "TRAIN_STEPS": "7",
           "DATA_PREFIXES": f"0.3,{data}/a_text_document,0.7,{data}/b_text_document",
           "EXTRA_SETS": "optim.lr=1.0e-3 train.seed=7 model.vocab_size=256", "EXTRA_ARGS": "--exit-after-minutes 5",
           "NCCL_DEBUG": "INFO"}
    job, log = submit(slurm, tmp_path, env, "args")
    info = slurm.wait_job(job, timeout=60)
    must(info, log)
    lines = [ln for ln in read(log).splitlines() if ln.startswith("ARGS ")]
    assert len(lines) == 2, read(log)  # one task per "GPU"
    assert lines[0] == (
        f"ARGS --recipe {REPO}/{TINY} --set checkpoint.dir={tmp_path}/ckpt "
        f"--set data.prefixes=[0.3,{data}/a_text_document,0.7,{data}/b_text_document] --set data.synthetic=false "
        "--set train.steps=7 "
        "--set optim.lr=1.0e-3 --set train.seed=7 --set model.vocab_size=256 --exit-after-minutes 5")
    assert "training finished (exit 0)" in read(log)
    # each rank bound to its share of the cores, -c passed on to srun
    assert "launch: srun --kill-on-bad-exit=1 --cpus-per-task=1 --cpu-bind=cores " in read(log)


def test_missing_data_prefix_in_recipe_fails_before_launch(slurm, tmp_path):
    recipe = tmp_path / "no_data.yaml"
    # real data without a tokenizer: the tiny recipe needs a fixed vocabulary
    recipe.write_text(f"base: {REPO / TINY}\nmodel: {{vocab_size: 256}}\n"
                      f"data: {{synthetic: false, prefixes: [{tmp_path}/gone_text_document]}}\n")
    job, log = submit(slurm, tmp_path, {"RECIPE": str(recipe)}, "bad-recipe-data")
    info = slurm.wait_job(job, timeout=60)
    must(info, log, "FAILED", "2:0")
    text = read(log)
    assert f"data prefix files not found: {tmp_path}/gone_text_document.bin {tmp_path}/gone_text_document.idx" in text
    assert "launch:" not in text and not steps(text)


@pytest.mark.parametrize("sets, message", [
    ("train.no_such_key=3", "train.no_such_key"),
    ("parallel.tp=2 parallel.pp=2", "world size 2"),  # TP*PP=4 cannot fit 2 ranks
    ("train.distributed_timeout_minutes=0", "train.distributed_timeout_minutes"),
], ids=["unknown-key", "layout", "timeout"])
def test_bad_set_fails_before_launch(slurm, tmp_path, sets, message):
    job, log = submit(slurm, tmp_path, {"RECIPE": TINY, "EXTRA_SETS": sets}, "bad-set")
    info = slurm.wait_job(job, timeout=60)
    must(info, log, "FAILED", "2:0")
    text = read(log)
    assert re.search(rf"ERROR: .*{re.escape(message)}", text), text[-3000:]
    assert "launch:" not in text and not steps(text)


# ----------------------------------------------------------------------------- training

def test_trains_to_completion(slurm, tmp_path):
    env = {"RECIPE": TINY, "TRAIN_STEPS": "6", "EXTRA_SETS": "checkpoint.interval=3"}
    job, log = submit(slurm, tmp_path, env, "complete")
    info = slurm.wait_job(job, timeout=150)
    must(info, log)
    text = read(log)
    assert steps(text) == list(range(1, 7)), text[-4000:]
    assert "step 6/6 |" in text
    assert re.search(r"saved checkpoint iteration 6 to ", text), text[-4000:]
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    assert (ckpt / "iter_0000006").is_dir()
    assert "training finished (exit 0)" in text and info.restarts == 0


def skip_where_the_two_node_twin_runs(twin: str) -> None:
    """The single-node version of a check that test_slurm_multinode.py's `twin` makes on two nodes
    (a superset): it runs only where that cluster cannot be built (not root, no network namespaces),
    so that exactly one of the two runs on every machine."""
    from slurm_multinode import netns_unavailable

    if netns_unavailable() is None:
        pytest.skip(f"test_slurm_multinode.py::{twin} checks this on two nodes here")


def test_preemption_saves_requeues_and_resumes(slurm, tmp_path):
    skip_where_the_two_node_twin_runs("test_preemption_of_two_nodes_resumes_exactly")
    total = 60
    env = {"RECIPE": TINY, "TRAIN_STEPS": str(total), "EXTRA_SETS": "checkpoint.interval=1000"}
    job, log = submit(slurm, tmp_path, env, "preempt")
    wait_for_log(slurm, job, log, r"^step 3/", timeout=150)
    # What Slurm does near the time limit (#SBATCH --signal=B:USR1@300): USR1 to the batch shell only.
    slurm._run(["scancel", "--signal=USR1", "--batch", job])
    wait_for_log(slurm, job, log, r"requeueing job", timeout=90)
    info = wait_through_requeue(slurm, job, timeout=180)
    must(info, log)
    text = read(log)
    assert info.restarts == 1, info.fields
    first, _, second = text.partition("requeueing job")
    saved = re.findall(r"saved checkpoint iteration (\d+) to ", first)
    assert len(saved) == 1, first[-4000:]
    stop = int(saved[0])
    assert 3 <= stop < total, first[-4000:]
    assert steps(first) == list(range(1, stop + 1)), first[-4000:]
    assert "SIGUSR1 received" in first
    assert re.search(rf"resumed from iteration {stop} \(", second), second[-4000:]
    assert steps(second) == list(range(stop + 1, total + 1)), second[-4000:]
    assert "restart 1:" in second and "training finished (exit 0)" in second
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == str(total)


def test_scancel_stops_without_requeue(slurm, tmp_path):
    """SIGTERM (scancel, or a preemption Slurm requeues by itself) reaches the ranks from Slurm; they
    save and exit 75, and the batch script must then not requeue the job. The batch script's logic
    is under test here, so the trainer is a stub that exits 75 on SIGTERM the way periln-train does
    (periln-train's own signal handling is exercised by the preemption tests)."""
    stub = tmp_path / "stub-train"
    stub.write_text("#!/bin/bash\ntrap 'echo stub saved; exit 75' TERM USR1\necho stub running\n"
                    "while :; do sleep 0.2; done\n")
    stub.chmod(0o755)
    env = {"RECIPE": TINY, "PERILN_TRAIN": str(stub)}
    job, log = submit(slurm, tmp_path, env, "cancel")
    wait_for_log(slurm, job, log, r"^stub running", timeout=60)
    slurm._run(["scancel", job])
    info = slurm.wait_job(job, timeout=60)
    time.sleep(1)  # let the batch shell finish writing
    text = read(log)
    assert info.state == "CANCELLED" and info.restarts == 0, f"{info.fields}\n{text[-3000:]}"
    assert "SIGTERM received" in text and "stub saved" in text, text[-3000:]
    assert "requeueing job" not in text
    time.sleep(2)
    assert slurm.job(job).restarts == 0 and slurm.job(job).state == "CANCELLED"


# ----------------------------------------------------------------------------- failures and exits

def trainer_pid(cluster, job: str, rank: int, timeout: float = 30) -> int:
    """The pid of srun task `rank`'s trainer process (not its exit-status wrapper shell, not srun)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs = [(pid, argv) for pid, comm, argv in cluster.step_processes(job, rank)
                 if "--recipe" in argv and comm not in ("bash", "srun")]
        pids = {pid for pid, _ in procs}
        top = [pid for pid in pids if _ppid(pid) not in pids]
        if len(top) == 1:
            return top[0]
        time.sleep(0.3)
    raise AssertionError(f"no single trainer process for rank {rank} of job {job}: {cluster.step_processes(job, rank)}")


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def wait_ended(cluster, job: str, since: float, limit: float):
    """Wait for a terminal state; returns (info, seconds from `since` until it was seen)."""
    info = cluster.wait_job(job, timeout=limit)
    elapsed = time.monotonic() - since
    print(f"job {job} ended {info.state} {info.exit_code} {elapsed:.1f}s after the fault")
    return info, elapsed


def test_crashed_rank_ends_the_job(slurm, tmp_path):
    """One rank dies mid-training (SIGKILL, as the OOM killer does it) while the other is blocked in a
    way no error reaches: it is stopped (SIGSTOP), as a rank spinning in an NCCL kernel whose peer
    is gone. srun --kill-on-bad-exit ends the step at once (SIGCONT, SIGTERM, SIGKILL after KillWait),
    so the job fails within seconds, and the batch script does not requeue a failure. (With
    --kill-on-bad-exit=0 this job stays RUNNING: nothing ever wakes the stopped rank.)"""
    skip_where_the_two_node_twin_runs("test_rank_killed_on_one_node_ends_the_job")
    env = {"RECIPE": TINY, "TRAIN_STEPS": "500", "EXTRA_SETS": "checkpoint.interval=1000"}
    job, log = submit(slurm, tmp_path, env, "crash")
    wait_for_log(slurm, job, log, r"^step 3/", timeout=150)
    survivor, victim = trainer_pid(slurm, job, 0), trainer_pid(slurm, job, 1)
    os.kill(survivor, signal.SIGSTOP)
    os.kill(victim, signal.SIGKILL)
    info, elapsed = wait_ended(slurm, job, time.monotonic(), limit=90)
    time.sleep(1)  # let the batch shell finish writing
    text = read(log)
    assert info.state == "FAILED" and info.restarts == 0, f"{info.fields}\n{text[-4000:]}"
    assert elapsed < 60, f"the job took {elapsed:.0f}s to fail after a rank died\n{text[-4000:]}"
    assert info.exit_code == "137:0", info.fields  # the dead rank's status (128 + SIGKILL), not 143 from srun
    assert re.search(r"training failed: srun exit status \d+ \(.*exit 137 on rank 1.*\); not requeueing", text), text[-4000:]
    assert "requeueing job" not in text and "checkpoint saved" not in text
    time.sleep(2)
    assert slurm.job(job).restarts == 0 and slurm.job(job).state == "FAILED"
    assert not (tmp_path / "ckpt" / ".periln-exit").exists()


def test_hung_rank_times_out_and_ends_the_job(slurm, tmp_path):
    """A rank that hangs without dying (stopped: a stuck filesystem or device) is caught by the process
    group timeout, train.distributed_timeout_minutes (0.25 min here): the waiting rank's collective
    raises after 15 s and it exits 1, and srun then ends the step, the stopped rank included."""
    env = {"RECIPE": TINY, "TRAIN_STEPS": "500",
           "EXTRA_SETS": "checkpoint.interval=1000 train.distributed_timeout_minutes=0.25"}
    job, log = submit(slurm, tmp_path, env, "hang")
    wait_for_log(slurm, job, log, r"^step 3/", timeout=150)
    stopped_at = time.monotonic()
    os.kill(trainer_pid(slurm, job, 1), signal.SIGSTOP)
    info, elapsed = wait_ended(slurm, job, stopped_at, limit=90)
    time.sleep(1)
    text = read(log)
    assert info.state == "FAILED" and info.restarts == 0, f"{info.fields}\n{text[-4000:]}"
    assert info.exit_code == "1:0", f"{info.fields}\n{text[-4000:]}"
    # Gloo reports the process group's timeout, i.e. the recipe key's 0.25 min, in milliseconds.
    assert re.search(r"[Tt]imed out .*15000 ?ms", text), text[-4000:]
    assert 14 <= elapsed < 60, f"{elapsed:.0f}s from the hang to the end of the job\n{text[-4000:]}"
    assert re.search(r"training failed: .*exit 1 on rank 0", text), text[-4000:]
    assert "requeueing job" not in text


STAGGERED_STUB = """#!/bin/bash
# Stands in for periln-train: on USR1 every rank "saves"; rank 0 then exits 75 at once, rank 1 only
# after a slow shutdown, ending as MODE says. After the requeue both ranks finish (exit 0).
ulimit -c 0
if [ -e "$CKPT_DIR/saved" ]; then echo "stub rank $SLURM_PROCID: resumed and finished"; exit 0; fi
stop() {
    if [ "$SLURM_PROCID" = 0 ]; then touch "$CKPT_DIR/saved"; echo "stub rank 0: saved, exit 75"; exit 75; fi
    sleep 3
    echo "stub rank 1: shutdown done ($MODE)"
    if [ "$MODE" = segfault ]; then kill -s SEGV $$; fi
    exit 75
}
trap stop USR1
echo "stub rank $SLURM_PROCID running"
while :; do sleep 0.2; done
"""


@pytest.mark.parametrize("mode", ["exit75", "segfault"])
def test_staggered_exit_75_still_requeues(slurm, tmp_path, mode):
    """Ranks leave a save one by one: rank 0 exits 75 while rank 1 still shuts down (3 s here). With
    --kill-on-bad-exit a bare 75 would make srun cancel the step: rank 1 SIGTERMed, srun exit 143,
    no requeue. Each rank's wrapper reports 75 as 0 and records it, so rank 1 finishes undisturbed
    and the job requeues; a rank that crashes after the save (segfault at exit) does not undo it.
    The trainer is a stub: the batch script's decision is under test."""
    stub = tmp_path / "stub-train"
    stub.write_text(STAGGERED_STUB)
    stub.chmod(0o755)
    env = {"RECIPE": TINY, "PERILN_TRAIN": str(stub), "MODE": mode}
    job, log = submit(slurm, tmp_path, env, f"stagger-{mode}")
    wait_for_log(slurm, job, log, r"^stub rank 1 running", timeout=60)
    wait_for_log(slurm, job, log, r"^stub rank 0 running", timeout=60)
    slurm._run(["scancel", "--signal=USR1", "--batch", job])
    wait_for_log(slurm, job, log, r"requeueing job", timeout=60)
    info = wait_through_requeue(slurm, job, timeout=120)
    must(info, log)
    text = read(log)
    first, _, second = text.partition("requeueing job")
    assert info.restarts == 1, info.fields
    assert f"stub rank 1: shutdown done ({mode})" in first, first[-3000:]
    assert "Terminated" not in first and "CANCELLED" not in first, first[-3000:]
    if mode == "exit75":
        assert "warning:" not in first, first[-3000:]
    else:
        assert re.search(r"warning: srun exit status 139 \(exit 75 on rank 0, exit 139 on rank 1\)", first), first[-3000:]
    assert "stub rank 0: resumed and finished" in second and "stub rank 1: resumed and finished" in second
    assert "training finished (exit 0)" in second
