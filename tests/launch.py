"""Run real multi-process jobs under torchrun for tests, never leaving processes behind."""

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
    """torchrun on 127.0.0.1 in its own process group; the whole group is killed on timeout."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", *script_and_args,
    ]
    return run(cmd, timeout=timeout, env=env, check=check)


def run(cmd: list[str], timeout: float = 300, env: dict | None = None, check: bool = True,
        cwd: Path | str = REPO) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    full_env.update(env or {})
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
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, "")
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {' '.join(cmd)}\n{out[-6000:]}")
    return result


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
