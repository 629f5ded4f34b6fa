"""A real multi-node Slurm cluster on one machine: each node is a Linux network namespace.

    with MultiNodeCluster(tmp_dir, nodes=2) as cluster:
        job = cluster.sbatch(["slurm/peri_3b.sbatch"], env={...}, options=["-N2", "--ntasks-per-node=1"])
        info = cluster.wait_job(job, timeout=120)

The layout, all on one bridge in the root namespace:

    root namespace: bridge pln<pid>k<k>b  10.A.B.1/24   slurmctld (SlurmctldHost=<machine hostname>(10.A.B.1))
    node01: netns periln-<pid>-<k>-node01, eth0 10.A.B.11, hostname node01, its own slurmd -N node01
    node02: netns periln-<pid>-<k>-node02, eth0 10.A.B.12, hostname node02, its own slurmd -N node02

Each slurmd runs as `nsenter --net=<netns> unshare --mount --uts`: only the network namespace is
entered (`ip netns exec` would also remount /sys, and slurmd then finds no /sys/fs/cgroup), plus a
private mount and UTS namespace in which the node's hostname is set and a hosts file naming every
node is bind-mounted over /etc/hosts. Everything the slurmd starts (slurmstepd, the batch shell,
srun, the ranks) inherits that node's network, hostname and name resolution, so the job's ranks
rendezvous over the veths as ranks on separate hosts do: with the machine's hostname shared, gloo
would advertise a loopback address and the ranks on the other node could not connect.

Teardown, also after a failure: jobs cancelled, every slurmd then slurmctld stopped by PID, then any
process still carrying this cluster's SLURM_CONF killed by PID, then the processes left in each
namespace (`ip netns pids`), then the veths, namespaces and the bridge deleted. Namespaces and links
of an earlier test process that was killed before its teardown (names carry its PID) are removed at
the next start. `netns_unavailable()` says why a cluster cannot be built here (not root, no `ip`,
namespaces refused), for a skip.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster, _which, slurm_available

NETNS_PREFIX = "periln-"   # periln-<pid>-<k>-<node>
LINK_PREFIX = "pln"        # pln<pid>k<k>b (bridge), pln<pid>k<k>v<i> (host end of node i's veth)
NODE_IFNAME = "eth0"       # the node's end of its veth, inside its namespace
TOOLS = ("ip", "nsenter", "unshare", "mount", "hostname")
_counter = itertools.count()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([_which("ip") or "ip", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} -> {r.returncode}: {r.stderr.strip()}")
    return r


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def netns_list() -> list[str]:
    return [ln.split()[0] for ln in _ip("netns", "list", check=False).stdout.splitlines() if ln.strip()]


def link_list() -> list[str]:
    return re.findall(r"^\d+: ([^:@]+)[:@]", _ip("-o", "link", "show", check=False).stdout, re.M)


def remove_stale(owner_alive=_alive) -> list[str]:
    """Delete the namespaces and links of test processes that no longer exist (killed before their
    teardown); returns what was removed."""
    removed = []
    for ns in netns_list():
        m = re.match(rf"{NETNS_PREFIX}(\d+)-", ns)
        if m and not owner_alive(int(m.group(1))):
            _kill_netns_pids(ns)
            if _ip("netns", "del", ns, check=False).returncode == 0:
                removed.append(ns)
    for link in link_list():
        m = re.match(rf"{LINK_PREFIX}(\d+)k\d+[bv]", link)
        if m and not owner_alive(int(m.group(1))):
            if _ip("link", "del", link, check=False).returncode == 0:
                removed.append(link)
    return removed


def _kill_netns_pids(ns: str) -> list[int]:
    killed = []
    for _ in range(3):
        pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split() if p.isdigit()]
        pids = [p for p in pids if p != os.getpid()]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        if not pids:
            break
        time.sleep(0.3)
    return killed


def netns_unavailable() -> str | None:
    """None when this process can build namespaced nodes; otherwise why not (for pytest.skip)."""
    if os.geteuid() != 0:
        return "not root: network namespaces, veths and a bridge need CAP_NET_ADMIN and CAP_SYS_ADMIN"
    missing = [t for t in TOOLS if _which(t) is None]
    if missing:
        return f"{', '.join(missing)} not found (iproute2 / util-linux)"
    ns, host_end = f"{NETNS_PREFIX}{os.getpid()}-9-probe", f"{LINK_PREFIX}{os.getpid()}k9v0"
    try:
        _ip("netns", "add", ns)
        _ip("link", "add", host_end, "type", "veth", "peer", "name", NODE_IFNAME, "netns", ns)
        r = subprocess.run([_which("nsenter"), f"--net=/var/run/netns/{ns}", "--", _which("unshare"),
                            "--mount", "--uts", "--", "sh", "-c", "hostname periln-probe && hostname"],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0 or r.stdout.strip() != "periln-probe":
            return f"cannot enter a network namespace with a private mount/UTS namespace: {r.stderr.strip()}"
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        return f"network namespaces unavailable: {e}"
    finally:
        _ip("link", "del", host_end, check=False)
        _ip("netns", "del", ns, check=False)
    return None


def _free_subnet(seed: int) -> ipaddress.IPv4Network:
    """A /24 in 10.200-249.x.x that no address or route of this machine overlaps."""
    used = [ipaddress.ip_network(m, strict=False) for m in re.findall(
        r"\binet (\d+\.\d+\.\d+\.\d+/\d+)", _ip("-o", "-4", "addr", "show", check=False).stdout)]
    for line in _ip("-4", "route", "show", "table", "all", check=False).stdout.splitlines():
        word = line.split()[0] if line.split() else ""
        if word in ("local", "broadcast", "unicast") and len(line.split()) > 1:
            word = line.split()[1]
        if re.fullmatch(r"\d+\.\d+\.\d+\.\d+(/\d+)?", word):
            used.append(ipaddress.ip_network(word, strict=False))
    for j in range(50 * 256):
        n = seed + j
        net = ipaddress.ip_network(f"10.{200 + n % 50}.{(n // 50) % 256}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free 10.200-249.x.0/24 subnet for the test cluster")


class MultiNodeCluster(SlurmCluster):
    """SlurmCluster with `nodes` namespaced nodes node01.. on a bridge; slurmctld in the root namespace."""

    def __init__(self, root: Path, nodes: int = 2, cpus: int | None = None):
        super().__init__(root, cpus)
        if not 2 <= nodes <= 9:
            raise ValueError("2 to 9 nodes")
        self.k = next(_counter) % 9
        pid = os.getpid()
        self.nodes = [f"node{i + 1:02d}" for i in range(nodes)]
        self.netns = {n: f"{NETNS_PREFIX}{pid}-{self.k}-{n}" for n in self.nodes}
        self.host_ends = {n: f"{LINK_PREFIX}{pid}k{self.k}v{i + 1}" for i, n in enumerate(self.nodes)}
        self.bridge = f"{LINK_PREFIX}{pid}k{self.k}b"
        self.controller = socket.gethostname().split(".")[0]
        self.subnet = None
        self.bridge_ip = None
        self.addr: dict[str, str] = {}
        self.hosts_file = self.root / "hosts"
        self.node = self.nodes[0]

    # ------------------------------------------------------------------ network
    def setup_network(self) -> None:
        remove_stale()
        self.subnet = _free_subnet(os.getpid() * 10 + self.k)
        hosts = list(self.subnet.hosts())
        self.bridge_ip = str(hosts[0])
        self.addr = {n: str(hosts[10 + i]) for i, n in enumerate(self.nodes)}
        prefix = self.subnet.prefixlen
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.bridge_ip}/{prefix}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for n in self.nodes:
            ns = self.netns[n]
            _ip("netns", "add", ns)
            _ip("link", "add", self.host_ends[n], "type", "veth", "peer", "name", NODE_IFNAME, "netns", ns)
            _ip("link", "set", self.host_ends[n], "master", self.bridge, "up")
            _ip("-n", ns, "addr", "add", f"{self.addr[n]}/{prefix}", "dev", NODE_IFNAME)
            _ip("-n", ns, "link", "set", NODE_IFNAME, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        # One hosts file for every node, as a cluster's DNS: each name resolves to its node's address.
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback",
                 f"{self.bridge_ip} {self.controller}"]
        lines += [f"{self.addr[n]} {n}" for n in self.nodes]
        self.hosts_file.parent.mkdir(parents=True, exist_ok=True)
        self.hosts_file.write_text("\n".join(lines) + "\n")

    def teardown_network(self) -> list[str]:
        """Remove this cluster's veths, namespaces and bridge; returns what could not be removed."""
        for ns in self.netns.values():
            if ns in netns_list():
                _kill_netns_pids(ns)
        for n in self.nodes:
            _ip("link", "del", self.host_ends[n], check=False)
            _ip("netns", "del", self.netns[n], check=False)
        _ip("link", "del", self.bridge, check=False)
        links, spaces = set(link_list()), set(netns_list())
        return sorted((links & {self.bridge, *self.host_ends.values()}) | (spaces & set(self.netns.values())))

    # ------------------------------------------------------------------ lifecycle
    def write_conf(self) -> None:
        super().write_conf()
        replaced = ("SlurmctldHost=", "SlurmdSpoolDir=", "SlurmdPidFile=", "SlurmdLogFile=", "NodeName=",
                    "PartitionName=")
        lines = [ln for ln in self.conf.read_text().splitlines() if not ln.startswith(replaced)]
        lines += [
            f"SlurmctldHost={self.controller}({self.bridge_ip})",
            f"SlurmdSpoolDir={self.root / 'spool' / '%n'}",
            f"SlurmdPidFile={self.root / 'slurmd-%n.pid'}",
            f"SlurmdLogFile={self.root / 'log' / 'slurmd-%n.log'}",
        ]
        lines += [f"NodeName={n} NodeAddr={self.addr[n]} NodeHostname={n} CPUs={self.cpus} RealMemory=1000 "
                  "State=UNKNOWN" for n in self.nodes]
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP "
                     "OverSubscribe=YES")
        self.conf.write_text("\n".join(lines) + "\n")
        for n in self.nodes:
            (self.root / "spool" / n).mkdir(parents=True, exist_ok=True)

    def _spawn(self, name: str, args: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.stdout", "w")
        try:
            self.procs[name] = subprocess.Popen(args, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            out.close()

    def start(self, timeout: float = 60) -> None:
        self.setup_network()
        self.write_conf()
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        node_init = 'hostname "$1" && mount --bind "$2" /etc/hosts && exec "$3" -D -N "$1" -f "$4"'
        for n in self.nodes:
            self._spawn(f"slurmd-{n}", [
                _which("nsenter"), f"--net=/var/run/netns/{self.netns[n]}", "--",
                _which("unshare"), "--mount", "--uts", "--",
                "sh", "-c", node_init, "node-init", n, str(self.hosts_file), _which("slurmd"), str(self.conf)])
        deadline = time.monotonic() + timeout
        states: dict = {}
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}\n{self.daemon_logs()}")
            r = self._run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False)
            states = dict(ln.split() for ln in r.stdout.splitlines() if len(ln.split()) == 2)
            if r.returncode == 0 and set(states) == set(self.nodes) and \
                    all(s.rstrip("*") == "idle" for s in states.values()):
                return
            time.sleep(0.5)
        raise RuntimeError(f"nodes not idle after {timeout}s (sinfo: {states})\n{self.daemon_logs()}")

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            left = self.teardown_network()
            if left:
                raise RuntimeError(f"could not remove {left}")

    # ------------------------------------------------------------------ helpers for tests
    def node_of(self, pid: int) -> str | None:
        """The node whose network namespace process `pid` runs in (None: the root namespace)."""
        try:
            inode = os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:
            return None
        for n, ns in self.netns.items():
            try:
                if os.stat(f"/var/run/netns/{ns}").st_ino == inode:
                    return n
            except OSError:
                pass
        return None


@pytest.fixture(scope="module")
def slurm_nodes(tmp_path_factory):
    """A two-node namespaced cluster for a test module; skips saying why where it cannot be built."""
    reason = slurm_available() or netns_unavailable()
    if reason:
        pytest.skip(reason)
    root = Path(tmp_path_factory.mktemp("slurm2n"))
    with MultiNodeCluster(root, nodes=2) as cluster:
        yield cluster
