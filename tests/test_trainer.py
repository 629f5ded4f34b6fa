"""The trainer end to end on CPU: exact resume after SIGKILL, resharding, preemption, crash during save."""

import signal
from pathlib import Path

import pytest

from launch import assert_resumed, kill_all, requeue, run_torchrun, spawn_ranks, wait_all, wait_for_line
from launch import step_losses as losses

TINY = "recipes/tiny/peri_ln.yaml"
TRAIN = ["-m", "periln_megatron.train", "--recipe", TINY]


def marker(ckpt: Path) -> int:
    return int((ckpt / "latest_checkpointed_iteration.txt").read_text())


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """20 uninterrupted steps under TP=2, checkpoints at 10 and 20."""
    ckpt = tmp_path_factory.mktemp("straight")
    run_torchrun(2, [*TRAIN, "--set", "parallel.tp=2", f"checkpoint.dir={ckpt}"], timeout=300)
    result = losses(ckpt)
    assert sorted(result) == list(range(1, 21))
    return ckpt, result


def test_exact_resume_after_sigkill(tmp_path, straight_run):
    _, expected = straight_run
    args = [*TRAIN, "--set", "parallel.tp=2", f"checkpoint.dir={tmp_path}"]
    procs = spawn_ranks(2, args, tmp_path / "logs1")
    wait_for_line(tmp_path / "logs1/rank0.log", "saved checkpoint iteration 10", procs)
    kill_all(procs)  # SIGKILL, no clean stop
    assert marker(tmp_path) == 10

    procs = spawn_ranks(2, args, tmp_path / "logs2")
    assert wait_all(procs) == [0, 0], (tmp_path / "logs2/rank0.log").read_text()[-3000:]
    log = (tmp_path / "logs2/rank0.log").read_text()
    assert_resumed(log, tmp_path, 10, expected, range(11, 21), exact=False, abs_tol=1e-6)


@pytest.mark.parametrize("layout", [["parallel.tp=1"], ["parallel.pp=2"]], ids=["tp1", "pp2"])
def test_resharding_tp2_checkpoint(tmp_path, straight_run, layout):
    ckpt, expected = straight_run
    requeue(ckpt, 10, tmp_path)
    out = run_torchrun(2, [*TRAIN, "--set", *layout, "train.steps=11", f"checkpoint.dir={tmp_path}",
                           "checkpoint.save_at_end=false", "checkpoint.on_schedule_change=checkpoint"]).stdout
    assert_resumed(out, tmp_path, 10, expected, [11], exact=False, abs_tol=1e-5)


SIGNALS_AFTER_THE_LOOP = """
import signal, sys
from periln_megatron.cli import train_main
signal.signal(signal.SIGUSR2, signal.default_int_handler)  # not a stop signal: left alone
code = train_main(sys.argv[1:])
print("after", code, {s.name: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)},
      signal.getsignal(signal.SIGINT) is signal.SIG_IGN)
"""


def test_stop_signals_are_ignored_once_the_loop_is_over(tmp_path):
    """Python resets its handlers to the default action at interpreter shutdown, which takes seconds
    after torch and megatron-core: a repeated preemption notice (Slurm resends USR1) arriving then
    killed a rank that had saved and was exiting 75 (exit 138). After the loop the trainer's stop
    signals are ignored (SIG_IGN survives shutdown); Ctrl-C is not."""
    import sys

    from launch import run

    out = run([sys.executable, "-c", SIGNALS_AFTER_THE_LOOP, "--recipe", TINY, "--set", "train.steps=3",
               "checkpoint.interval=0", f"checkpoint.dir={tmp_path}"], timeout=240).stdout
    line = [x for x in out.splitlines() if x.startswith("after ")]
    assert line == ["after 0 {'SIGTERM': <Handlers.SIG_IGN: 1>, 'SIGUSR1': <Handlers.SIG_IGN: 1>, "
                    "'SIGUSR2': <built-in function default_int_handler>} False"], out[-3000:]


def test_sigterm_saves_and_exits_75(tmp_path):
    args = [*TRAIN, "--set", "train.steps=1000", "checkpoint.interval=0", f"checkpoint.dir={tmp_path}"]
    procs = spawn_ranks(2, args, tmp_path / "logs")
    wait_for_line(tmp_path / "logs/rank0.log", "step 3/1000", procs)
    procs[1].send_signal(signal.SIGTERM)  # one rank is told; all must agree and stop together
    codes = wait_all(procs, timeout=120)
    log = (tmp_path / "logs/rank0.log").read_text()
    assert codes == [75, 75], log[-3000:]
    saved = marker(tmp_path)
    assert 3 <= saved < 1000
    assert f"saved checkpoint iteration {saved}" in log
    assert "exit 75 to requeue" in log


def test_exit_after_minutes(tmp_path):
    procs = spawn_ranks(2, [*TRAIN, "--set", "train.steps=100000", f"checkpoint.dir={tmp_path}",
                            "--exit-after-minutes", "0.01"], tmp_path / "logs")
    assert wait_all(procs, timeout=120) == [75, 75]
    assert marker(tmp_path) >= 1


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, straight_run):
    _, expected = straight_run
    args = ["tests/workers/crash_during_save.py", "--recipe", TINY, "--set", "parallel.tp=2",
            f"checkpoint.dir={tmp_path}"]
    procs = spawn_ranks(2, args, tmp_path / "logs1", env={"CRASH_AT": "20"})
    codes = wait_all(procs)
    assert 137 in codes, (tmp_path / "logs1/rank0.log").read_text()[-3000:]
    assert marker(tmp_path) == 10  # the half-written iteration 20 is not published

    procs = spawn_ranks(2, [*TRAIN, "--set", "parallel.tp=2", f"checkpoint.dir={tmp_path}"], tmp_path / "logs2")
    assert wait_all(procs) == [0, 0], (tmp_path / "logs2/rank0.log").read_text()[-3000:]
    assert "resumed from iteration 10" in (tmp_path / "logs2/rank0.log").read_text()
    assert marker(tmp_path) == 20
    assert losses(tmp_path)[20] == pytest.approx(expected[20], abs=1e-6)


def test_keeps_last_k_checkpoints(straight_run):
    ckpt, _ = straight_run
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000010", "iter_0000020"]
    assert (ckpt / "iter_0000020" / "recipe.yaml").is_file()
