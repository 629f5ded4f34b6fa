"""Run real multi-process jobs for tests, forked from the test fork server (tests/zygote.py) as
torchrun or srun would start them, never leaving processes behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(nproc: int, script_and_args: list[str], timeout: float = 300, env: dict | None = None,
                 check: bool = True) -> subprocess.CompletedProcess:
    """`nproc` ranks of `python SCRIPT_AND_ARGS` on 127.0.0.1 with torchrun's environment, forked from
    the test fork server (tests/zygote.py); the whole job is killed on timeout. The launchers themselves
    run for real elsewhere: periln-launch (torchrun) in test_faults.py and the gpu_check rehearsal, srun
    in the Slurm tests."""
    return _forked(script_and_args, nproc, timeout, env, check, REPO)


def _environment(env: dict | None) -> dict:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    full_env.update(env or {})
    return full_env


def forkable(cmd: list[str]) -> bool:
    """`python -m MOD ...`, `python -c CODE ...` or `python SCRIPT.py ...` with this interpreter."""
    return (len(cmd) >= 2 and cmd[0] == sys.executable
            and (cmd[1] in ("-m", "-c") and len(cmd) >= 3 or cmd[1].endswith(".py")))


def run(cmd: list[str], timeout: float = 300, env: dict | None = None, check: bool = True,
        cwd: Path | str = REPO) -> subprocess.CompletedProcess:
    """Run a command to completion, output and errors together; Python commands of this interpreter
    are forked from the test fork server."""
    if forkable(cmd):
        return _forked(cmd[1:], None, timeout, env, check, cwd)
    full_env = _environment(env)
    proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-4000:]}")
    finally:
        try:  # ranks that outlived a failed launcher
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return _result(cmd, proc.returncode, out, check)


def _result(cmd: list[str], code: int, out: str, check: bool) -> subprocess.CompletedProcess:
    if check and code != 0:
        raise AssertionError(f"exit {code}: {' '.join(cmd)}\n{out[-6000:]}")
    return subprocess.CompletedProcess(cmd, code, out, "")


_ZYGOTE: dict = {}


def _zygote_socket() -> str:
    """The session's fork server, started on first use (~6 s of imports, once)."""
    import atexit
    import tempfile

    if _ZYGOTE.get("proc") is not None and _ZYGOTE["proc"].poll() is None:
        return _ZYGOTE["path"]
    path = os.path.join(tempfile.mkdtemp(prefix="zygote-"), "socket")
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "zygote.py"), path], cwd=REPO,
                            env=_environment(None), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"the test fork server did not start (exit {proc.wait()})")
    _ZYGOTE.update(proc=proc, path=path)
    atexit.register(proc.kill)
    return path


class Forked:
    """A job of the test fork server (tests/zygote.py) seen as a process, with the part of Popen's
    interface the tests use: `pid` is its first (or only) rank's process, which the tests signal;
    `pgid` is the job's process group, which kill_all kills. `codes` holds each rank's exit status
    once it ended (-N: signal N), `answered` whether the job reported them (a killed job cannot)."""

    def __init__(self, argv: list[str], nproc: int | None, env: dict, cwd: Path | str, out: Path | str):
        import json

        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._buf = b""
        self._sock.connect(_zygote_socket())
        request = {"argv": list(map(str, argv)), "env": env, "cwd": str(cwd), "nproc": nproc, "out": str(out)}
        try:
            self._sock.sendall((json.dumps(request) + "\n").encode())
            pgid, pids = self._line(30), self._line(30)
        except (OSError, TimeoutError) as e:
            self._sock.close()
            raise RuntimeError(f"the test fork server did not start {argv}: {e!r}") from None
        if pgid is None or pids is None:
            self._sock.close()
            tail = Path(out).read_text(errors="replace")[-3000:] if Path(out).exists() else ""
            raise RuntimeError(f"the test fork server's job for {argv} ended before it started its ranks\n{tail}")
        self.pgid, self.pids = int(pgid), json.loads(pids)
        self.pid = self.pids[0]
        self.returncode = self.codes = None
        self.answered = False

    def _line(self, timeout: float | None) -> str | None:
        """The next line from the server; None when it closed the connection; TimeoutError."""
        import select

        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buf:
            wait = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if not select.select([self._sock], [], [], wait)[0]:
                raise TimeoutError
            chunk = self._sock.recv(65536)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def _finish(self, timeout: float | None) -> None:
        import json

        answer = self._line(timeout)
        self._sock.close()
        if answer is None:  # the job process was killed before it could report
            self.codes = [-signal.SIGKILL] * len(self.pids)
            self.returncode = -signal.SIGKILL
        else:
            reply = json.loads(answer)
            self.codes, self.returncode, self.answered = reply["codes"], reply["status"], True

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                self._finish(0.0)
            except TimeoutError:
                pass
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            try:
                self._finish(timeout)
            except TimeoutError:
                raise subprocess.TimeoutExpired(f"fork server job {self.pgid}", timeout) from None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """Signal the first rank, as Popen.send_signal does, and not once it has ended (its job has
        reaped it: the pid may be another process's by now)."""
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL every rank of a job that has not ended. The job reaps them (an orphaned zombie
        would still look alive to a run lock that checks its holder's pid) and reports; `finish`
        then waits for that and kills what is left of the job's process group."""
        if self.poll() is None:
            for pid in self.pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def finish(self, timeout: float = 30) -> None:
        """Wait for the job's report (SIGKILL the whole group after `timeout`), then SIGKILL what
        is left of its group: processes the ranks started."""
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill_group(self.pgid)
            self.wait(timeout)
        _kill_group(self.pgid)


def start(args: list[str], log: Path, env: dict | None = None, drop: tuple[str, ...] = ()) -> Forked:
    """`python ARGS` forked from the test fork server, without waiting: output to `log` (truncated
    first), the environment as `run` gives it plus `env`, less the variables in `drop`."""
    Path(log).write_text("")
    full_env = {k: v for k, v in _environment(env).items() if k not in drop or k in (env or {})}
    return Forked(args, None, full_env, REPO, log)


def _forked(argv: list[str], nproc: int | None, timeout: float, env: dict | None, check: bool,
            cwd: Path | str) -> subprocess.CompletedProcess:
    import tempfile

    cmd = [sys.executable, *argv] if nproc is None else [f"torchrun --nproc_per_node={nproc}", *argv]
    fd, out_path = tempfile.mkstemp(prefix="zygote-out-")
    os.close(fd)
    try:
        job = Forked(argv, nproc, _environment(env), cwd, out_path)
        timed_out = False
        try:
            job.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            job.kill()
        finally:
            job.finish()  # and processes its ranks started
        out = Path(out_path).read_text(errors="replace")
        if timed_out:
            raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-4000:]}")
        if not job.answered:
            raise AssertionError(f"the fork server's job ended without an exit status: {' '.join(cmd)}\n{out[-4000:]}")
        result = _result(cmd, job.returncode, out, check)
        result.codes = job.codes  # each rank's exit status (-N: signal N)
        return result
    finally:
        os.unlink(out_path)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def spawn_ranks(nproc: int, args: list[str], log_dir: Path, env: dict | None = None) -> list[Forked]:
    """Start `nproc` ranks the way srun does (each a process of its own with the rank variables, no
    torchrun), forked from the test fork server; rank r writes to log_dir/rank{r}.log."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    return [start(args, log_dir / f"rank{rank}.log",
                  env={"RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **(env or {})})
            for rank in range(nproc)]


def wait_for_line(path: Path, needle: str, procs: list, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and needle in path.read_text():
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a rank exited before {needle!r} appeared:\n{path.read_text()[-3000:]}")
        time.sleep(0.2)
    kill_all(procs)
    raise AssertionError(f"{needle!r} did not appear in {path} within {timeout}s")


def wait_all(procs: list, timeout: float = 300) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in procs]
    finally:
        kill_all(procs)


def kill_all(procs: list) -> None:
    """SIGKILL every process (a Forked job's ranks, or a Popen started in a session of its own, with
    its group) at once, then reap them all."""
    for p in procs:
        if isinstance(p, Forked):
            p.kill()
        else:
            _kill_group(p.pid)
    for p in procs:
        if isinstance(p, Forked):
            p.finish()
        else:
            p.wait()


def step_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss from a run's metrics.jsonl, read by the trainer's own reader (a resumed
    run's records replace the earlier run's from the step it restarts at)."""
    from periln_megatron.training.metrics import read_metrics, series

    return series(read_metrics(Path(run_dir)), "loss")


def requeue(src_ckpt: Path, iteration: int, dst: Path) -> Path:
    """dst as a requeued job finds it: only `iteration` of src_ckpt, and the marker naming it."""
    import shutil

    name = f"iter_{iteration:07d}"
    shutil.copytree(Path(src_ckpt) / name, Path(dst) / name)
    (Path(dst) / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")
    return Path(dst)


def assert_resumed(output: str, run_dir: Path, iteration: int, straight: dict[int, float], steps, exact=True,
                   abs_tol: float = 0.0) -> dict[int, float]:
    """A run said it resumed from `iteration` and logged, for every step in `steps`, the loss the
    straight run logged there (bitwise when exact, else within abs_tol). Returns its losses."""
    import pytest

    assert f"resumed from iteration {iteration}" in output, output[-3000:]
    resumed = step_losses(run_dir)
    for step in steps:
        if exact:
            assert resumed[step] == straight[step], (step, resumed[step], straight[step])
        else:
            assert resumed[step] == pytest.approx(straight[step], abs=abs_tol), step
    return resumed


def load_tool(name: str):
    """Import tools/<name>.py as a module (the tools are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # worker processes pickle its functions by module name
    spec.loader.exec_module(module)
    return module
