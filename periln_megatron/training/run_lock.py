"""One training run per directory.

Two trainers on one `checkpoint.dir` would each overwrite the other's `iter_N` and interleave
`metrics.jsonl`. So rank 0 locks the run's directories (`checkpoint.dir`, and the run dir when it is
another one: `logging.run_dir` or `runs/<name>`, which holds `metrics.jsonl`) before anything is
written there, and holds the locks until the process ends. A second run exits 2 with one line that
names the directory and the holder (host, pid, Slurm job) written into the lock file.

`PERILN_RUN_LOCK` picks the mechanism (a property of the filesystem, not of the recipe):

flock (default): `flock(2)` on `<dir>/.periln.lock`. The kernel releases it when the holder's
    process ends, however it ends (SIGKILL, OOM killer, a requeue), so a stale lock never blocks:
    the next run, on any node, just takes it. The lock file stays; it names the last holder.
    Across nodes this assumes the shared filesystem arbitrates flock between clients:
    - NFSv4: yes (Linux emulates flock with byte-range locks, held by the server). If the holder's
      node crashed, the server frees its lock when the client's lease expires (90 s by default).
    - Lustre: only when mounted with `-o flock`. With `noflock` flock fails and the lease below is
      used instead. With `localflock` it excludes only processes on the same node and nothing here
      can tell: set PERILN_RUN_LOCK=lease on such mounts (likewise BeeGFS without global file locks).
    A lock still held by an earlier run of the same Slurm job (SLURM_RESTART_COUNT lower than ours)
    belongs to a process Slurm has already ended, whose lock the server has not yet released (a
    crashed node): we wait up to SAME_JOB_WAIT_S for it instead of failing the requeued job.
lease: for filesystems without coherent flock. `<dir>/.periln.lease` is created with O_EXCL and
    holds the holder's record; a thread touches it every HEARTBEAT_S. A lease is stale, and taken
    over, when it has not been touched for STALE_S, when its holder is a dead pid on this host, or
    an earlier run of this Slurm job. Removed on a clean exit. Best effort: two runs that find the
    same stale lease within the same few milliseconds may both take it.
off: no lock.

`held(path)` is the same mechanism for a short critical section that waits for its turn instead of
refusing (the HF converters' final rename, periln_megatron/hf/outdir.py).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

LOCK_NAME = ".periln.lock"
LEASE_NAME = ".periln.lease"
MODES = ("flock", "lease", "off")
SAME_JOB_WAIT_S = 180.0
HEARTBEAT_S = 30.0
STALE_S = 300.0
# flock(2) not supported by this filesystem (Lustre noflock: ENOSYS; some FUSE/NFSv3 setups: ENOLCK)
_FLOCK_UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


class RunLockError(RuntimeError):
    """Another run holds a directory (one-line message), or PERILN_RUN_LOCK is invalid."""


@dataclass(frozen=True)
class Target:
    path: Path
    key: str  # the recipe key that names it, for the message


def targets(recipe) -> list[Target]:
    """The directories a run writes into: checkpoint.dir, then the run dir if it is another one."""
    out = []
    if recipe.checkpoint.dir:
        out.append(Target(Path(recipe.checkpoint.dir), "checkpoint.dir"))
    run_dir = Path(recipe.run_dir)
    if not out or run_dir.resolve() != out[0].path.resolve():
        out.append(Target(run_dir, "logging.run_dir"))
    return out


def _record() -> dict:
    env = os.environ
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": env.get("SLURM_JOB_ID"),
            "slurm_restart_count": int(env.get("SLURM_RESTART_COUNT") or 0),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text() or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder.get("pid"):
        return "holder unknown"
    text = f"pid {holder['pid']} on host {holder.get('host', '?')}"
    if holder.get("slurm_job_id"):
        text += f", Slurm job {holder['slurm_job_id']}"
    if holder.get("started"):
        text += f", since {holder['started']}"
    return text


def _refusal(target: Target, holder: dict, extra: str = "") -> RunLockError:
    return RunLockError(
        f"{target.path} is in use by another training run ({_describe(holder)}{extra}); wait for it to end or "
        f"stop it, or set {target.key} to another directory")


def _earlier_run_of_this_job(holder: dict) -> bool:
    job = os.environ.get("SLURM_JOB_ID")
    return (bool(job) and holder.get("slurm_job_id") == job
            and int(holder.get("slurm_restart_count") or 0) < int(os.environ.get("SLURM_RESTART_COUNT") or 0))


def _pid_dead_here(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname() or not holder.get("pid"):
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


class _Flock:
    def __init__(self, target: Target):
        import fcntl

        self.path = target.path / LOCK_NAME
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = None
        try:
            while True:
                try:
                    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    holder = _read(self.path)
                    if not _earlier_run_of_this_job(holder):
                        raise _refusal(target, holder) from None
                    deadline = deadline or time.monotonic() + SAME_JOB_WAIT_S
                    if time.monotonic() > deadline:
                        raise _refusal(target, holder, f"; still locked after {SAME_JOB_WAIT_S:.0f} s although "
                                                       "that run of this Slurm job has ended") from None
                    time.sleep(2)
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, (json.dumps(_record()) + "\n").encode(), 0)
        except BaseException:
            os.close(self.fd)
            raise

    def release(self) -> None:
        os.close(self.fd)  # closing the last descriptor releases the flock


class _Lease:
    def __init__(self, target: Target):
        self.path = target.path / LEASE_NAME
        self.record = {**_record(), "token": os.urandom(8).hex()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read(self.path)
                try:
                    age = time.time() - self.path.stat().st_mtime
                except FileNotFoundError:
                    continue
                if age > STALE_S or _pid_dead_here(holder) or _earlier_run_of_this_job(holder):
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
                    continue
                raise _refusal(target, holder, f", lease renewed {age:.0f} s ago") from None
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.record) + "\n")
                f.flush()
                os.fsync(f.fileno())
            break
        else:
            raise _refusal(target, _read(self.path))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._heartbeat, name="periln-lease", daemon=True)
        self.thread.start()

    def _heartbeat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self.stop.set()
        if _read(self.path).get("token") == self.record["token"]:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


_HELD: dict[Path, object] = {}


def mode() -> str:
    value = os.environ.get("PERILN_RUN_LOCK", "flock").strip().lower() or "flock"
    if value not in MODES:
        raise RunLockError(f"PERILN_RUN_LOCK={value!r}: expected one of {', '.join(MODES)}")
    return value


def acquire(targets_: list[Target]) -> None:
    """Lock every target directory (created if missing) for this process, or raise RunLockError
    naming the first one another run holds; on failure none stays locked."""
    how = mode()
    if how == "off":
        return
    taken = []
    try:
        for target in targets_:
            key = target.path.resolve()
            if key in _HELD:
                continue
            try:
                target.path.mkdir(parents=True, exist_ok=True)
                if how == "flock":
                    try:
                        lock = _Flock(target)
                    except OSError as e:
                        if e.errno not in _FLOCK_UNSUPPORTED:
                            raise
                        lock = _Lease(target)  # this filesystem has no flock
                else:
                    lock = _Lease(target)
            except OSError as e:
                raise RunLockError(f"{target.path}: cannot lock it for this run ({e.strerror or e}); check that "
                                   f"{target.key} is a writable directory") from None
            _HELD[key] = lock
            taken.append(key)
    except BaseException:
        for key in taken:
            _HELD.pop(key).release()
        raise


def release_all() -> None:
    while _HELD:
        _HELD.popitem()[1].release()


@contextlib.contextmanager
def held(path: Path, wait_s: float = 300.0):
    """An exclusive lock on the file `path` for a short critical section (a conversion's final
    rename), waiting up to wait_s for another holder, then RunLockError naming it. The mechanism of
    PERILN_RUN_LOCK: flock(2) on `path` (the file stays, naming its last holder), or a lease file
    `path`.lease, removed on exit, where the filesystem has no flock; off: no lock."""
    how = mode()
    if how == "off":
        yield
        return
    deadline = time.monotonic() + wait_s
    release = None
    if how == "flock":
        try:
            release = _flock_waiting(Path(path), deadline, wait_s)
        except OSError as e:
            if e.errno not in _FLOCK_UNSUPPORTED:
                raise
    if release is None:
        release = _lease_waiting(Path(f"{path}.lease"), deadline, wait_s)
    try:
        yield
    finally:
        release()


def _still_held(path: Path, holder: dict, wait_s: float) -> RunLockError:
    return RunLockError(f"{path}: still locked after {wait_s:.0f} s ({_describe(holder)}); if that process has "
                        "ended, try again")


def _flock_waiting(path: Path, deadline: float, wait_s: float):
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise _still_held(path, _read(path), wait_s) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_record()) + "\n").encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return lambda: os.close(fd)


def _lease_waiting(path: Path, deadline: float, wait_s: float):
    token = os.urandom(8).hex()
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            holder = _read(path)
            try:
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:
                continue
            if age > STALE_S or _pid_dead_here(holder):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            if time.monotonic() > deadline:
                raise _still_held(path, holder, wait_s) from None
            time.sleep(0.05)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({**_record(), "token": token}) + "\n")

    def release():
        if _read(path).get("token") == token:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return release
