"""A real one-node Slurm cluster on 127.0.0.1 for tests: slurmctld + slurmd, no munge, no root needed
beyond what Debian's packages need, everything under one temporary directory.

    with SlurmCluster(tmp_dir) as cluster:
        job = cluster.sbatch(["slurm/peri_3b.sbatch"], env={...}, options=["-N1"])
        info = cluster.wait_job(job, timeout=120)

`slurm` is a module-scoped pytest fixture built on it. Teardown cancels every job, stops both daemons
by PID, then kills any process still carrying this cluster's SLURM_CONF in its environment (the
slurmstepd's and job tasks it spawned), so nothing outlives the tests, even after a failure.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DAEMONS = ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "scancel", "srun")
ENSURE = REPO / "tools" / "ensure_slurm.sh"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for d in ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin")
         if (p := Path(d) / name).is_file() and os.access(p, os.X_OK)), None)


def slurm_available(install: bool = True) -> str | None:
    """None when every Slurm binary is there (installing via tools/ensure_slurm.sh if root);
    otherwise the reason it cannot be."""
    missing = [b for b in DAEMONS if _which(b) is None]
    if missing and install and os.geteuid() == 0 and ENSURE.is_file():
        subprocess.run(["bash", str(ENSURE)], check=False, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        missing = [b for b in DAEMONS if _which(b) is None]
    if not missing:
        return None
    how = "not root, so tools/ensure_slurm.sh cannot apt-get install them" if os.geteuid() else \
        "tools/ensure_slurm.sh could not install them"
    return f"Slurm binaries missing ({', '.join(missing)}) and {how}"


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _node_name() -> str:
    """A node name that resolves to a local address, since the trainer's rendezvous uses it."""
    host = socket.gethostname().split(".")[0]
    try:
        if socket.gethostbyname(host).startswith("127."):
            return host
    except OSError:
        pass
    return "localhost"


@dataclass
class JobInfo:
    job_id: str
    state: str
    exit_code: str
    restarts: int
    fields: dict


class SlurmCluster:
    def __init__(self, root: Path, cpus: int | None = None):
        self.root = Path(root)
        self.node = _node_name()
        # Claim at least 4 CPUs (config_overrides lets slurmd accept more than the machine has) so a
        # 2-task job plus its batch step fit on a 1- or 2-core runner; tasks then simply share cores.
        self.cpus = cpus or max(4, os.cpu_count() or 1)
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        for var in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if var != "SLURM_CONF":
                del self.env[var]

    # ------------------------------------------------------------------ lifecycle
    def write_conf(self) -> None:
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        ctld_port, slurmd_port = _free_ports(2)
        user = pwd.getpwuid(os.geteuid()).pw_name
        (self.root / "plugstack.conf").write_text("")
        lines = [
            "ClusterName=periln-test",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            "AuthType=auth/none",
            "CredType=cred/none",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SwitchType=switch/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "KillWait=10",
            "MinJobAge=600",
            "InactiveLimit=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            f"PlugStackConfig={self.root / 'plugstack.conf'}",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log' / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"NodeName={self.node} NodeAddr=127.0.0.1 NodeHostname={self.node} CPUs={self.cpus} "
            "RealMemory=1000 State=UNKNOWN",
            f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 60) -> None:
        self.write_conf()
        for name, args in (
            ("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)]),
            ("slurmd", [_which("slurmd"), "-D", "-N", self.node, "-f", str(self.conf)]),
        ):
            out = open(self.root / "log" / f"{name}.stdout", "w")
            self.procs[name] = subprocess.Popen(args, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)
            out.close()
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}\n{self.daemon_logs()}")
            r = self._run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
            state = r.stdout.strip()
            if r.returncode == 0 and state.rstrip("*") == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"node not idle after {timeout}s (sinfo: {state!r})\n{self.daemon_logs()}")

    def stop(self) -> None:
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            self._run(["scancel", "--full", "--signal=KILL", "--user", pwd.getpwuid(os.geteuid()).pw_name],
                      check=False)
            self._run(["scancel", "--user", pwd.getpwuid(os.geteuid()).pw_name], check=False)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                r = self._run(["squeue", "-h", "-o", "%i"], check=False)
                if r.returncode != 0 or not r.stdout.strip():
                    break
                time.sleep(0.5)
        # Every slurmd first (a subclass may run several), then slurmctld.
        for name in sorted(self.procs, key=lambda n: n == "slurmctld"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.kill_leftovers()

    def kill_leftovers(self) -> list[int]:
        """SIGKILL every process whose environment names this cluster's slurm.conf (by PID)."""
        marker = f"SLURM_CONF={self.conf}".encode()
        killed = []
        for _ in range(3):
            found = []
            for pid_dir in Path("/proc").iterdir():
                if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
                    continue
                try:
                    environ = (pid_dir / "environ").read_bytes()
                except OSError:
                    continue
                if marker in environ.split(b"\0"):
                    found.append(int(pid_dir.name))
            for pid in found:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except (ProcessLookupError, PermissionError):
                    pass
            if not found:
                break
            time.sleep(0.3)
        return killed

    def step_processes(self, job_id: str, rank: int) -> list[tuple[int, str, list[str]]]:
        """(pid, comm, argv) of every process whose environment names this cluster, job `job_id` and
        SLURM_PROCID=`rank`. Besides the task's own processes that is, for rank 0, the batch shell
        and srun too; callers pick by comm and argv."""
        want = {f"SLURM_CONF={self.conf}".encode(), f"SLURM_JOB_ID={job_id}".encode(),
                f"SLURM_PROCID={rank}".encode()}
        found = []
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit():
                continue
            try:
                environ = set((pid_dir / "environ").read_bytes().split(b"\0"))
                argv = (pid_dir / "cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
                comm = (pid_dir / "comm").read_text().strip()
            except OSError:
                continue
            if want <= environ:
                found.append((int(pid_dir.name), comm, argv))
        return found

    def __enter__(self) -> "SlurmCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ client helpers
    def _run(self, cmd: list[str], check: bool = True, env: dict | None = None, cwd: Path | str = REPO,
             timeout: float = 30) -> subprocess.CompletedProcess:
        full = dict(self.env)
        full.update(env or {})
        r = subprocess.run(cmd, env=full, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def sbatch(self, args: list[str], env: dict | None = None, options: list[str] | None = None,
               cwd: Path | str = REPO) -> str:
        """Submit like a user would, from `cwd` (the repo root): `sbatch OPTIONS ARGS`, environment
        overrides in `env`. Returns the job id."""
        r = self._run(["sbatch", "--parsable", *(options or []), *args], env=env, cwd=cwd)
        return r.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> JobInfo | None:
        r = self._run(["scontrol", "show", "job", "-o", job_id], check=False)
        if r.returncode != 0 or "JobId=" not in r.stdout:
            return None
        fields = dict(re.findall(r"(\w+)=(\S*)", r.stdout))
        return JobInfo(job_id, fields.get("JobState", "?"), fields.get("ExitCode", "?"),
                       int(fields.get("Restarts", 0) or 0), fields)

    def wait_job(self, job_id: str, timeout: float = 120, until=None) -> JobInfo:
        """Poll until the job reaches a terminal state (or `until(info)` is true)."""
        deadline = time.monotonic() + timeout
        info = None
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info is not None and (until(info) if until else info.state in TERMINAL):
                return info
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} still {info.state if info else '?'} after {timeout}s: "
                             f"{info.fields if info else ''}\n{self.daemon_logs()}")

    def release_begin_time(self, job_id: str) -> None:
        """A requeued job waits for a BeginTime Slurm sets a little in the future; start it now."""
        self._run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False)

    def daemon_logs(self, tail: int = 40) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(out)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = slurm_available()
    if reason:
        pytest.skip(reason)
    # Short path: Slurm limits some socket/spool path lengths.
    root = Path(tmp_path_factory.mktemp("slurm"))
    with SlurmCluster(root) as cluster:
        yield cluster
