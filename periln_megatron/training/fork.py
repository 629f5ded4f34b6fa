"""One-process trainings forked from a process that has imported the trainer once (the demo's runs,
`periln-ladder submit --local`): a CPU miniature does not pay torch's and megatron-core's import
(~5 s) and teardown (~2 s) per run. The child is a real process (its own pid, exit status, signals
and CPU time), running `periln-train ARGV` with its output in log files.

Not for several ranks: those go through periln-launch (torchrun), which owns the rendezvous.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

# A forked run trains alone: a launcher's or Slurm's rank variables in this shell would describe another job.
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                  "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_STEP_NODELIST")


def preload() -> None:
    """Import the trainer here, once, so that every fork inherits it."""
    import periln_megatron.cli  # noqa: F401
    import periln_megatron.training.loop  # noqa: F401


def fork_training(argv: list[str], stdout: Path, stderr: Path | None = None, threads: int = 1,
                  env: dict[str, str] | None = None, ignore_warnings: bool = False) -> int:
    """Start `periln-train ARGV` in a child of this process; returns its pid (reap it with os.wait*).
    Its stdout goes to `stdout` (appended, line-buffered), its stderr to `stderr` (default: the same
    file); torch uses `threads` threads; `env` is added to its environment, the rank variables are
    removed; `ignore_warnings`: what PYTHONWARNINGS=ignore does for a fresh interpreter."""
    out = os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    err = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if stderr else out
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(out)
        if err != out:
            os.close(err)
        return pid
    code = 1
    try:
        os.dup2(out, 1)
        os.dup2(err, 2)
        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(line_buffering=True)
        if ignore_warnings:
            import warnings

            warnings.simplefilter("ignore")
        for var in RANK_VARIABLES:
            os.environ.pop(var, None)
        os.environ.update(env or {})
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)  # the parent's OpenMP pool was sized at its import
        from periln_megatron.cli import train_main

        code = train_main(list(argv))
    except SystemExit as e:
        code = exit_status(e)
    except BaseException:  # noqa: BLE001 - the child must never return into its parent's code
        traceback.print_exc()
    finally:
        exit_now(code)
    return 0  # not reached


def exit_status(e: SystemExit) -> int:
    """The status a Python process ends with on SystemExit: its int code, 0 for None, else 1 after
    printing the message to stderr (what sys.exit("...") does)."""
    if e.code is None or isinstance(e.code, int):
        return e.code or 0
    print(e.code, file=sys.stderr)
    return 1


def exit_now(code: int) -> None:
    """A normal interpreter exit without tearing the module graph down (~2 s): non-daemon threads are
    joined and atexit handlers run (W&B, TensorBoard writers, multiprocessing), then the process ends."""
    import atexit
    import threading

    try:
        threading._shutdown()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code & 0xFF if code >= 0 else 1)
