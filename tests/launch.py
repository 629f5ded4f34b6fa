"""Run real multi-process jobs for tests (forked from tests/zygote.py, or spawned as srun does),
never leaving processes behind."""

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


def _forked(argv: list[str], nproc: int | None, timeout: float, env: dict | None, check: bool,
            cwd: Path | str) -> subprocess.CompletedProcess:
    import json
    import tempfile

    cmd = [sys.executable, *argv] if nproc is None else [f"torchrun --nproc_per_node={nproc}", *argv]
    fd, out_path = tempfile.mkstemp(prefix="zygote-out-")
    os.close(fd)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(_zygote_socket())
        request = {"argv": list(map(str, argv)), "env": _environment(env), "cwd": str(cwd), "nproc": nproc,
                   "out": out_path}
        conn.sendall((json.dumps(request) + "\n").encode())
        reader = conn.makefile("r")
        conn.settimeout(30)
        job = int(reader.readline())
        conn.settimeout(timeout)
        try:
            answer = reader.readline() or '{"status": "no answer"}'
        except (socket.timeout, TimeoutError):
            answer = ""
        finally:
            try:
                os.killpg(job, signal.SIGKILL)  # ranks that outlived their job
            except ProcessLookupError:
                pass
        out = Path(out_path).read_text(errors="replace")
        if not answer:
            raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-4000:]}")
        answer = json.loads(answer)
        status = answer["status"]
        if not isinstance(status, int):
            raise AssertionError(f"the fork server's job ended without an exit status: {' '.join(cmd)}\n{out[-4000:]}")
        result = _result(cmd, status, out, check)
        result.codes = answer["codes"]  # each rank's exit status (-N: signal N)
        return result
    finally:
        conn.close()
        os.unlink(out_path)


def spawn_ranks(nproc: int, args: list[str], log_dir: Path, env: dict | None = None) -> list[subprocess.Popen]:
    """Start `nproc` ranks the way srun does (no torchrun); rank r writes to log_dir/rank{r}.log."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(nproc):
        full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                    "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **(env or {})}
        with open(log_dir / f"rank{rank}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, *args], cwd=REPO, env=full_env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def wait_for_line(path: Path, needle: str, procs: list[subprocess.Popen], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and needle in path.read_text():
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a rank exited before {needle!r} appeared:\n{path.read_text()[-3000:]}")
        time.sleep(0.2)
    kill_all(procs)
    raise AssertionError(f"{needle!r} did not appear in {path} within {timeout}s")


def wait_all(procs: list[subprocess.Popen], timeout: float = 300) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in procs]
    finally:
        kill_all(procs)


def kill_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
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
