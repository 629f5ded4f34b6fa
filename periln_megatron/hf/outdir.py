"""How the converters put their output in place: written under a hidden partial name, then renamed
into the target under a lock, so that a failure, Ctrl-C or a concurrent conversion never leaves a
half-written target or silently replaces another's.

A partial is `.<target name>.partial-<host>-<pid>` (`.old` appended: a replaced earlier conversion
on its way out). One left by a process killed with SIGKILL is removed by the next conversion of the
same target on the same host once that pid is dead.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import threading
from pathlib import Path

LOCK_NAME = ".periln-convert.lock"  # in the target's parent; run_lock.held() on it guards the final rename
# the host part is absent in partials written before it was added ("partial-<pid>")
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.partial-(?:(?P<host>.+)-)?(?P<pid>\d+)(?:\.old)?$")


def partial_path(parent: Path, name: str, old: bool = False) -> Path:
    return Path(parent) / f".{name}.partial-{socket.gethostname()}-{os.getpid()}{'.old' if old else ''}"


def is_partial(entry: str) -> bool:
    return _PARTIAL.match(entry) is not None


def _dead_here(host: str | None, pid: int) -> bool:
    if (host is not None and host != socket.gethostname()) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError):
        return False
    return False


def remove_stale_partials(parent: Path, name: str, log) -> None:
    """Remove partials of `name` in parent left by dead processes of this host (SIGKILL, a crash)."""
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for entry in entries:
        m = _PARTIAL.match(entry)
        if m and m["name"] == name and _dead_here(m["host"], int(m["pid"])):
            path = Path(parent) / entry
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
            log(f"removed {path} (left by pid {m['pid']}, which has ended)")


@contextlib.contextmanager
def signals_deferred():
    """SIGINT/SIGTERM wait until the block has ended: a swap of renames (or the clean-up of a
    partial) is never cut in half. Nothing is re-raised afterwards: what the block did is done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def remove(path: Path) -> None:
    with signals_deferred():
        shutil.rmtree(path, ignore_errors=True)


def lock(parent: Path):
    from periln_megatron.training import run_lock

    return run_lock.held(Path(parent) / LOCK_NAME)


def swap_in(partial: Path, target: Path, replace: bool) -> Path | None:
    """Rename `partial` to `target` (absent or an empty directory, or with `replace` an earlier
    conversion the caller has checked, moved aside first). Call under lock(); returns the aside
    path to remove after the lock is released. A target that appeared from elsewhere meanwhile makes
    the rename fail (ENOTEMPTY) rather than be replaced."""
    with signals_deferred():
        aside = None
        if replace and target.exists():
            aside = partial_path(target.parent, target.name, old=True)
            os.rename(target, aside)
        try:
            os.rename(partial, target)
        except OSError as e:
            if aside is not None:
                os.rename(aside, target)
            raise FileExistsError(f"{target}: could not be put in place ({e.strerror}); it changed while this "
                                  "conversion ran") from e
    return aside
