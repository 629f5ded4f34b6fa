"""`periln-launch` (`python -m periln_megatron.launch`): torchrun that keeps the trainer's exit status.

torchrun reports any worker status but 0 as a failure and exits 1, so a preempted run that saved
and exited 75 looked like a crash. Measured with torch 2.13's torchrun (elastic agent):
- SIGTERM, SIGINT, SIGHUP or SIGQUIT to torchrun: it sends the same signal to every worker, waits
  `--shutdown-timeout` (30 s by default) and then SIGKILLs the rest, and exits 1 with a traceback,
  even when every worker saved and exited 75. A save longer than the timeout is cut short.
- SIGUSR1 (not in torchrun's default --signals-to-handle) kills torchrun at once; the workers, each
  in its own session, go on training with no launcher.
- A worker that exits 75 by itself (a signal sent to the workers, --exit-after-minutes) is a
  failure: torchrun stops the others and exits 1 (or restarts them all under --max-restarts).

periln-launch takes torchrun's arguments unchanged and runs torchrun in a session of its own. It
passes SIGTERM, SIGINT, SIGUSR1 and SIGHUP to the workers directly (to torchrun only before they
exist), so torchrun's shutdown timeout never interrupts a save. Each rank writes its exit status to
$PERILN_RANK_STATUS_DIR/<rank> (a temporary directory of this launcher), and periln-launch exits:
    0   torchrun exited 0 (training finished)
    75  a rank saved a checkpoint and exited 75 (a rank exits 75 only after the save's closing
        barrier, so one 75 means every rank saved): requeue me
    N   else the status of the first rank that failed (2 refused, 3 NaN/Inf, 130 second Ctrl-C),
        else torchrun's own status
If periln-launch is killed, torchrun gets SIGTERM (Linux parent-death signal) and the workers save.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from periln_megatron.exit_codes import EXIT_REQUEUE

STATUS_ENV = "PERILN_RANK_STATUS_DIR"
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)

USAGE = """usage: periln-launch [torchrun options] -m periln_megatron.train --recipe RECIPE [...]

torchrun with the trainer's exit status: 0 finished, 75 saved after a signal or --exit-after-minutes
(requeue), else the first failing rank's status (2, 3, 130). SIGTERM, SIGINT (Ctrl-C), SIGUSR1 and
SIGHUP go to the ranks directly. Options: those of torchrun (python -m torch.distributed.run --help).
"""


def record_status(code: int) -> None:
    """The trainer's exit status for periln-launch, when it launched this rank. Only os calls, so a
    signal handler may use it."""
    directory = os.environ.get(STATUS_ENV)
    if not directory:
        return
    with contextlib.suppress(OSError):
        fd = os.open(os.path.join(directory, os.environ.get("RANK", "0")), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, f"{code}\n".encode())
        finally:
            os.close(fd)


def _die_with_parent() -> None:
    """In the torchrun child: SIGTERM when periln-launch dies (Linux; elsewhere nothing)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _workers(pid: int) -> list[int]:
    try:
        import psutil

        return [child.pid for child in psutil.Process(pid).children()]
    except Exception:  # torchrun gone, or no psutil
        return []


def read_statuses(directory: Path) -> list[tuple[int, int]]:
    """(rank, status) in the order the ranks wrote them."""
    out = []
    for path in sorted(directory.iterdir(), key=lambda p: p.stat().st_mtime_ns):
        text = path.read_text().strip()
        if path.name.isdigit() and text.lstrip("-").isdigit():
            out.append((int(path.name), int(text)))
    return out


def decide(torchrun_status: int, statuses: list[tuple[int, int]]) -> tuple[int, str]:
    """periln-launch's exit status and a line saying why."""
    codes = [code for _, code in statuses]
    if torchrun_status == 0:
        return 0, "training finished"

    def ranks(code):
        return ",".join(str(r) for r, c in sorted(statuses) if c == code)

    if EXIT_REQUEUE in codes:
        return EXIT_REQUEUE, (f"rank(s) {ranks(EXIT_REQUEUE)} saved a checkpoint and exited {EXIT_REQUEUE} "
                              f"(torchrun exit {torchrun_status}); exit {EXIT_REQUEUE} to requeue")
    failed = [(r, c) for r, c in statuses if c not in (0, EXIT_REQUEUE)]
    if failed:
        rank, code = failed[0]
        return code, f"rank {rank} exited {code} first (torchrun exit {torchrun_status}); exit {code}"
    return torchrun_status, f"torchrun exit {torchrun_status}, no rank reported a status"


def trainer_environment(argv: list[str]) -> dict[str, str]:
    """What the trainer's ranks need in their environment from the start (dist_env.launch_environment),
    read from the trainer's --recipe/--set in torchrun's argv; {} when there is no trainer or its
    recipe does not load (the trainer then reports the error)."""
    import argparse

    try:
        args = argv[argv.index("periln_megatron.train") + 1:]
    except ValueError:
        return {}
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--recipe")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[])
    known, _ = parser.parse_known_args(args)
    if not known.recipe:
        return {}
    try:
        from periln_megatron.config import load_recipe
        from periln_megatron.distributed.dist_env import launch_environment

        recipe = load_recipe(known.recipe, known.overrides, check_environment=False)
    except Exception:  # noqa: BLE001 - the trainer names what is wrong
        return {}
    return launch_environment(recipe.parallel.tp, recipe.parallel.cp)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    status_dir = Path(tempfile.mkdtemp(prefix="periln-launch-"))
    started: list[subprocess.Popen] = []
    pending: list[int] = []

    def forward(signum, frame):
        if not started:  # before torchrun exists: deliver once it does
            pending.append(signum)
            return
        for pid in _workers(started[0].pid) or [started[0].pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    try:
        for sig in FORWARDED:
            signal.signal(sig, forward)
        started.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *argv],
            env={**os.environ, **trainer_environment(argv), STATUS_ENV: str(status_dir)},
            start_new_session=True, preexec_fn=_die_with_parent if sys.platform == "linux" else None))
        for signum in pending:
            forward(signum, None)
        torchrun_status = started[0].wait()
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
        if torchrun_status < 0:  # killed by a signal, as a shell reports it
            torchrun_status = 128 - torchrun_status
        code, why = decide(torchrun_status, read_statuses(status_dir))
        if torchrun_status != 0:
            print(f"periln-launch: {why}", file=sys.stderr, flush=True)
        return code
    finally:
        shutil.rmtree(status_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
