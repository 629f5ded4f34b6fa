"""A fork server for the tests: torch, megatron-core and the trainer are imported once, and every
`python -m ...`, `python script.py ...` and torchrun-style job a test starts is forked from that process.

Why: each fresh process spends ~5 s importing torch and megatron-core and ~2 s tearing the module graph
down again, and torchrun adds ~2 s of its own plus up to 5 s of its monitor interval; a 2-rank tiny run
that trains for 3 s took ~20 s. A forked child runs the same module code (runpy, as `__main__`, with the
test's argv, environment and working directory) in a real process of its own, with real gloo ranks, real
signals and exit statuses; only the already-imported modules are shared. What is NOT imported here is
imported by the child as usual, so environment read at import time (HF_HUB_OFFLINE, ...) still applies.

Launcher behaviour reproduced for `nproc` ranks (what torchrun gives a worker): RANK, LOCAL_RANK,
WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, ROLE_RANK, MASTER_ADDR/PORT, TORCHELASTIC_RUN_ID; when a rank
fails the others get SIGTERM, then SIGKILL after 30 s, and the job's status is 1 (torchrun's). Tests of
the launchers themselves (torchrun, srun, Slurm) start real ones.

Protocol, one job per connection: the client sends one JSON line {argv, env, cwd, nproc, out}; the
server forks a job process (its own session, so the client can kill the whole job with killpg), which
answers with its pid, forks the ranks with stdout/stderr appended to `out`, answers with their pids (a
JSON list, so the client can signal one rank), and finally with {"codes": [...], "status": N}.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
import time
import traceback

from periln_megatron.training.fork import exit_now  # the children end as forked trainings do

PR_SET_PDEATHSIG = 1
NOT_SHARED = ("wandb",)


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _python_path(env: dict) -> None:
    """sys.path as a fresh interpreter with `env` would have it after sys.path[0]: $PYTHONPATH's entries,
    then the installation's (the server's own $PYTHONPATH entries removed)."""
    entries = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[1:] = [*entries, *(p for p in _BASE_PATH if p not in entries)]


_SERVER_ENTRIES = {p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
_BASE_PATH = [p for p in sys.path[1:] if p not in _SERVER_ENTRIES]


def _run_python(argv: list[str]) -> int:
    """What `python ARGV...` does after start-up: sys.argv, sys.path[0], then the module, script or
    code as __main__. Returns the exit status."""
    import runpy

    try:
        if argv[0] == "-m":
            sys.argv = ["-m", *argv[2:]]
            sys.path[0] = os.getcwd()
            runpy._run_module_as_main(argv[1], alter_argv=True)
        elif argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            sys.path[0] = ""
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
        return 0
    except SystemExit as e:
        if e.code is None:
            return 0
        if isinstance(e.code, int):
            return e.code
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        traceback.print_exc()
        return 1


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _malloc_settings(env: dict) -> None:
    """glibc reads MALLOC_MMAP_THRESHOLD_ once, when a process starts: a child given it gets the same
    setting through mallopt (a fixed threshold, as the variable gives)."""
    threshold = env.get("MALLOC_MMAP_THRESHOLD_")
    if threshold:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, int(threshold))


def _fork_python(argv: list[str], env: dict, cwd: str, conn: socket.socket) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        conn.close()  # the job's line to its client: a rank must not hold it open after the job is gone
        _die_with_parent()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(env)
        _malloc_settings(env)
        os.chdir(cwd)
        _python_path(env)
        code = _run_python(argv)
    finally:
        exit_now(code)
    return 0  # not reached


def _wait(pids: list[int], grace: float = 30.0) -> list[int]:
    """Exit statuses in pid order (a signal N gives -N). When one fails, the others get SIGTERM and,
    after `grace` seconds, SIGKILL, as torchrun stops a failed group."""
    codes: dict[int, int] = {}
    deadline = None
    while len(codes) < len(pids):
        pid, status = os.waitpid(-1, os.WNOHANG) if deadline else os.waitpid(-1, 0)
        if pid == 0:
            if time.monotonic() > deadline:
                for p in pids:
                    if p not in codes:
                        os.kill(p, signal.SIGKILL)
                deadline = time.monotonic() + 3600
            time.sleep(0.05)
            continue
        if pid not in pids:
            continue
        codes[pid] = os.waitstatus_to_exitcode(status)
        if codes[pid] != 0 and deadline is None and len(pids) > 1:
            for p in pids:
                if p not in codes:
                    os.kill(p, signal.SIGTERM)
            deadline = time.monotonic() + grace
    return [codes[p] for p in pids]


def _job(request: dict, conn: socket.socket) -> None:
    os.setsid()
    _die_with_parent()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    conn.sendall(f"{os.getpid()}\n".encode())
    out = os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    nproc = request["nproc"]
    env = request["env"]
    if nproc is None:
        envs = [env]
    else:
        port = str(_free_port())
        run_id = f"zygote-{os.getpid()}"
        envs = [{**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc),
                 "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "ROLE_RANK": str(r),
                 "ROLE_WORLD_SIZE": str(nproc), "GROUP_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": port, "TORCHELASTIC_RUN_ID": run_id, "TORCHELASTIC_RESTART_COUNT": "0",
                 "TORCHELASTIC_MAX_RESTARTS": "0", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1")}
                for r in range(nproc)]
    pids = [_fork_python(request["argv"], e, request["cwd"], conn) for e in envs]
    conn.sendall((json.dumps(pids) + "\n").encode())
    codes = _wait(pids)
    status = codes[0] if nproc is None else (0 if all(c == 0 for c in codes) else 1)
    conn.sendall((json.dumps({"codes": codes, "status": status}) + "\n").encode())
    os._exit(0)


def serve(path: str) -> None:
    _die_with_parent()
    import warnings

    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    # Not imported here: modules that take a per-process resource at import. wandb makes a temporary
    # media directory at import and removes it at exit, so the first forked child to exit would delete
    # it under all the others. megatron-core imports it optionally (inference logging only); the
    # children import it themselves when our W&B sink asks for it.
    for name in NOT_SHARED:
        sys.modules[name] = None
    # what nearly every command imports; the children share these pages
    import megatron.core.dist_checkpointing  # noqa: F401
    import periln_megatron.cli  # noqa: F401
    import periln_megatron.training.loop  # noqa: F401

    for name in NOT_SHARED:
        del sys.modules[name]
    warnings.resetwarnings()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # jobs report to their clients; nobody reaps them here
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(64)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        request = json.loads(conn.makefile("r").readline())
        if os.fork() == 0:
            server.close()
            try:
                _job(request, conn)
            finally:
                os._exit(1)
        conn.close()


if __name__ == "__main__":
    serve(sys.argv[1])
