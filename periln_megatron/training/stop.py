"""Stopping on request: signals, Ctrl-C and --exit-after-minutes, agreed by all ranks at a step boundary."""

from __future__ import annotations

import os
import signal
import time

from periln_megatron.distributed.launch import record_status
from periln_megatron.exit_codes import EXIT_INTERRUPTED

SIGINT_REPEAT_S = 0.5


class StopFlag:
    """Set by a signal handler; ranks agree on it at the next step boundary.

    SIGINT (Ctrl-C) is a request to stop too, whatever train.exit_signals says: save, exit 75. A
    second SIGINT exits at once (130) without saving; the last complete checkpoint stays the one
    to resume from. A repeat within SIGINT_REPEAT_S is the same press delivered twice (a launcher
    that forwards the terminal's SIGINT to ranks that got it already) and counts once.
    """

    def __init__(self, signals: list[str], exit_after_minutes: float | None, rank: int = 0):
        self.reason: str | None = None
        self.rank = rank
        self.first_sigint: float | None = None
        self.deadline = time.monotonic() + 60 * exit_after_minutes if exit_after_minutes else None
        self.signals = [getattr(signal, name) for name in signals if name != "SIGINT"]
        for name in {*signals, "SIGINT"}:
            signal.signal(getattr(signal, name), self._handle)

    def settle(self) -> None:
        """The loop is over (saved, finished or failing): the stop signals are ignored from here on.
        Python resets its signal handlers to the default action when the interpreter shuts down, and
        tearing down torch and megatron-core takes seconds; Slurm repeats a preemption notice (scancel
        --signal=USR1 --batch resends it every few seconds), and one arriving then killed a rank that had
        saved and was exiting 75 (exit 138), so the job was not requeued. SIG_IGN survives shutdown.
        Ctrl-C keeps its meaning."""
        for signum in self.signals:
            signal.signal(signum, signal.SIG_IGN)

    def _handle(self, signum, frame):
        # os.write, not print: the handler may interrupt a print to the same stream
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self.first_sigint is None:
                self.first_sigint = now
                if self.rank == 0:
                    os.write(2, b"periln-train: SIGINT: saving a checkpoint at the end of this step, then exit 75; "
                                b"press Ctrl-C again to exit at once without saving\n")
            elif now - self.first_sigint >= SIGINT_REPEAT_S:
                os.write(2, f"periln-train: second SIGINT: rank {self.rank} exits at once without saving "
                            f"(exit {EXIT_INTERRUPTED})\n".encode())
                record_status(EXIT_INTERRUPTED)
                os._exit(EXIT_INTERRUPTED)
        if self.reason is None:
            self.reason = signal.Signals(signum).name

    def local(self) -> bool:
        if self.deadline is not None and time.monotonic() >= self.deadline and self.reason is None:
            self.reason = "--exit-after-minutes"
        return self.reason is not None
