"""The multi-node paths of the Slurm templates, on a real two-node Slurm cluster on this machine.

Each node is a network namespace with its own address, hostname and slurmd (tests/slurm_multinode.py),
so a job's ranks on node01 and node02 reach each other only over the network, as on a cluster:
MASTER_ADDR from the job's node list, ranks and local ranks per node, the rendezvous and the
collectives between hosts, a requeue and a rank lost on one node. slurm/peri_3b.sbatch runs
unchanged with the tiny recipe at TP=2 and sbatch options for this machine (-N2, no GPUs).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import run_torchrun
from periln_megatron.distributed.dist_env import first_host
from slurm_cluster import REPO, slurm_available
from slurm_multinode import MultiNodeCluster, link_list, netns_list, netns_unavailable, remove_stale
from slurm_multinode import slurm_nodes  # noqa: F401  (pytest fixture)
from test_slurm import TEMPLATE, TINY, read, steps, trainer_pid, wait_for_log, wait_through_requeue


STEPS = 20          # 2 ranks: enough steps for USR1 to arrive mid-run
STEPS_4 = 6         # 4 ranks on this machine's 2 cores: fewer
SETS = "parallel.tp=2 checkpoint.interval=1000"
RANK_LINE = re.compile(r"^\[periln-slurm [^]]+\] rank (\d+)/(\d+) \(local (\d+)\) on (\S+), master (\S+)$", re.M)


def submit(cluster, tmp: Path, name: str, per_node: int = 1, env: dict | None = None, options=()) -> tuple[str, Path]:
    """sbatch the template on both nodes from the repo root; returns (job id, log path)."""
    log = tmp / f"{name}.out"
    env = {"OMP_NUM_THREADS": "1", "CKPT_DIR": str(tmp / "ckpt"), "RECIPE": TINY, "TRAIN_STEPS": str(STEPS),
           "EXTRA_SETS": SETS, **(env or {})}
    opts = ["-N2", f"--ntasks-per-node={per_node}", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={log}",
            f"--job-name={name}", *options]
    return cluster.sbatch([TEMPLATE], env=env, options=opts), log


def must(info, log: Path, state="COMPLETED", exit_code="0:0"):
    assert (info.state, info.exit_code) == (state, exit_code), f"{info.fields}\n--- job log\n{read(log)[-6000:]}"


def losses(run_dir: Path) -> dict[int, float]:
    """Per-step training loss from the run's metrics.jsonl (full precision), every step once."""
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            assert rec["step"] not in out, f"step {rec['step']} logged twice"
            out[rec["step"]] = rec["loss"]
    return out


def rank_lines(text: str) -> dict[int, tuple[int, int, str, str]]:
    """rank -> (world size, local rank, host, MASTER_ADDR), from each rank's start line (one per rank)."""
    found = RANK_LINE.findall(text)
    out = {int(r): (int(n), int(local), host, master) for r, n, local, host, master in found}
    assert len(out) == len(found), f"a rank started twice: {found}"
    return out


_references: dict[tuple[int, int], dict[int, float]] = {}


def torchrun_losses(nproc: int, steps_: int, tmp_factory) -> dict[int, float]:
    """Losses of the same recipe and layout run by torchrun on one host (loopback), computed once."""
    if (nproc, steps_) not in _references:
        ckpt = tmp_factory.mktemp(f"torchrun{nproc}")
        run_torchrun(nproc, ["-m", "periln_megatron.train", "--recipe", str(REPO / TINY),
                             "--set", f"checkpoint.dir={ckpt}", "--set", f"train.steps={steps_}",
                             *[a for s in SETS.split() for a in ("--set", s)]], timeout=300)
        _references[nproc, steps_] = losses(ckpt)
        assert sorted(_references[nproc, steps_]) == list(range(1, steps_ + 1))
    return _references[nproc, steps_]


# ----------------------------------------------------------------------------- training across nodes

@pytest.mark.parametrize("per_node", [1, 2], ids=["1-task-per-node", "2-tasks-per-node"])
def test_two_nodes_train_like_one(slurm_nodes, tmp_path, tmp_path_factory, per_node):
    """TP=2 across the two nodes (1 task per node), or TP=2 within each node and DP=2 across them
    (2 tasks per node, Megatron's rank order): the ranks sit on the nodes Slurm says, rendezvous at
    the first node, and every loss equals torchrun's on one host. The 4-rank job also names the
    socket interface (PERILN_SOCKET_IFNAME) and is submitted from a shell that ran torchrun before
    (MASTER_ADDR of another node, RANK/WORLD_SIZE/LOCAL_RANK of a world of one): the job ignores those."""
    env, total = {}, STEPS
    if per_node == 2:
        total = STEPS_4
        env = {"TRAIN_STEPS": str(total), "PERILN_SOCKET_IFNAME": "eth0", "MASTER_ADDR": "node02", "RANK": "0",
               "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    job, log = submit(slurm_nodes, tmp_path, f"two-nodes-{per_node}", per_node, env)
    info = slurm_nodes.wait_job(job, timeout=240)
    must(info, log)
    text = read(log)
    world = 2 * per_node
    assert info.fields["NodeList"] == "node[01-02]" and first_host(info.fields["NodeList"]) == "node01"
    assert re.search(rf"2 node\(s\) \[node\[01-02\]\], {world} task\(s\), master node01$", text, re.M), text[-4000:]
    expected = {r: (world, r % per_node, f"node0{r // per_node + 1}", "node01") for r in range(world)}
    assert rank_lines(text) == expected, text[-4000:]
    assert f"periln-train: {world} ranks (slurm), tp=2 pp=1 vpp=None cp=1 dp={per_node}" in text, text[-4000:]
    if per_node == 2:
        assert "socket interfaces: GLOO_SOCKET_IFNAME=eth0 NCCL_SOCKET_IFNAME=eth0" in text, text[-4000:]
        assert ("ignoring the submitting shell's MASTER_ADDR=node02 RANK=0 WORLD_SIZE=1 LOCAL_RANK=0: srun sets "
                "the ranks, the rendezvous is this job's first node") in text, text[-4000:]
    assert steps(text) == list(range(1, total + 1)), text[-4000:]
    assert losses(tmp_path / "ckpt") == torchrun_losses(world, total, tmp_path_factory)


DIST_PROBE = """
import datetime, os, socket, torch, torch.distributed as dist
from periln_megatron.distributed.runtime import read_dist_env

e = read_dist_env()
dist.init_process_group("gloo", init_method=f"tcp://{e.master_addr}:{e.master_port}", rank=e.rank,
                        world_size=e.world_size, timeout=datetime.timedelta(seconds=float(os.environ["PROBE_TIMEOUT"])))
t = torch.ones(1)
dist.all_reduce(t)
print(f"probe rank={e.rank} world={e.world_size} local={e.local_rank} master={e.master_addr} "
      f"host={socket.gethostname()} sum={int(t.item())}", flush=True)
dist.destroy_process_group()
"""

PROBE_JOB = """#!/bin/bash
unset MASTER_ADDR MASTER_PORT GLOO_SOCKET_IFNAME
cd {repo}
echo "== part of the job"
PROBE_TIMEOUT=60 srun -N1 -n2 --relative=1 {python} {probe}
# Debian's /etc/hosts: a node's own name is 127.0.1.1, the others' their addresses.
debian_hosts() {{
    srun -N2 -n2 --kill-on-bad-exit=1 unshare --mount -- \\
        sh -c 'mount --bind "$0.$(hostname)" /etc/hosts && exec timeout 60 "$@"' {hosts} {python} {probe}
}}
echo "== loopback hostname, GLOO_SOCKET_IFNAME=eth0"
PROBE_TIMEOUT=60 GLOO_SOCKET_IFNAME=eth0 debian_hosts
echo "== loopback hostname"
PROBE_TIMEOUT=8 debian_hosts
echo "== exit $?"
"""


def test_rendezvous_between_hosts(slurm_nodes, tmp_path):
    """torch.distributed between the nodes without the templates (plain srun, no MASTER_ADDR):
    - srun on the second node of a two-node job only (`srun -N1 --relative=1`): the trainer's
      rendezvous host is the step's first node (node02), not the job's (node01, where no rank runs
      and the others would wait until the timeout);
    - nodes whose own hostname resolves to a loopback address (Debian's 127.0.1.1 line): gloo
      advertises it, and the ranks cannot connect to each other, until GLOO_SOCKET_IFNAME names the
      interface between the nodes (what PERILN_SOCKET_IFNAME sets in the templates)."""
    probe = tmp_path / "probe.py"
    probe.write_text(DIST_PROBE)
    hosts = tmp_path / "hosts"
    for node in slurm_nodes.nodes:
        own = f"{slurm_nodes.addr[node]} {node}\n"
        text = slurm_nodes.hosts_file.read_text()
        assert own in text
        Path(f"{hosts}.{node}").write_text(text.replace(own, f"127.0.1.1 {node}\n"))
    script = tmp_path / "probe.sbatch"
    script.write_text(PROBE_JOB.format(repo=REPO, python=sys.executable, probe=probe, hosts=hosts))
    log = tmp_path / "probe.out"
    job = slurm_nodes.sbatch([str(script)], env={"OMP_NUM_THREADS": "1"},
                             options=["-N2", "--ntasks-per-node=2", f"--output={log}", "--job-name=probe"])
    info = slurm_nodes.wait_job(job, timeout=180)
    must(info, log)
    part, ifname, loopback = [sorted(ln for ln in section.splitlines() if ln.startswith("probe "))
                              for section in re.split(r"^== ", read(log), flags=re.M)[1:4]]
    assert part == [f"probe rank={r} world=2 local={r} master=node02 host=node02 sum=2" for r in (0, 1)], read(log)
    assert ifname == [f"probe rank={r} world=2 local=0 master=node01 host=node0{r + 1} sum=2" for r in (0, 1)], \
        read(log)
    assert not loopback and not read(log).endswith("== exit 0\n"), read(log)


# ----------------------------------------------------------------------------- requeue and failure

def test_preemption_of_two_nodes_resumes_exactly(slurm_nodes, tmp_path, tmp_path_factory):
    """USR1 to the batch shell on node01 (what --signal=B:USR1@300 does): the ranks on both nodes save,
    the job requeues itself, lands on both nodes again and resumes; every step's loss equals an
    uninterrupted run's. test_slurm.py's single-node version runs only where this one cannot."""
    job, log = submit(slurm_nodes, tmp_path, "preempt-2n")
    wait_for_log(slurm_nodes, job, log, r"^step 2/", timeout=180)
    slurm_nodes._run(["scancel", "--signal=USR1", "--batch", job])
    wait_for_log(slurm_nodes, job, log, r"requeueing job", timeout=90)
    info = wait_through_requeue(slurm_nodes, job, timeout=240)
    must(info, log)
    text = read(log)
    assert info.restarts == 1, info.fields
    first, _, second = text.partition("requeueing job")
    saved = re.findall(r"saved checkpoint iteration (\d+) to ", first)
    assert len(saved) == 1 and 2 <= int(saved[0]) < STEPS, first[-4000:]
    stop = int(saved[0])
    assert steps(first) == list(range(1, stop + 1)) and steps(second) == list(range(stop + 1, STEPS + 1)), text[-6000:]
    assert re.search(rf"resumed from iteration {stop} \(", second), second[-4000:]
    placement = {0: (2, 0, "node01", "node01"), 1: (2, 0, "node02", "node01")}
    assert rank_lines(first) == placement and rank_lines(second) == placement, text[-6000:]
    assert "SIGUSR1 received" in first and "restart 1:" in second and "training finished (exit 0)" in second
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == str(STEPS)
    assert losses(tmp_path / "ckpt") == torchrun_losses(2, STEPS, tmp_path_factory)


def test_rank_killed_on_one_node_ends_the_job(slurm_nodes, tmp_path):
    """The trainer on node02 dies (SIGKILL, as the OOM killer does it) while the one on node01 is blocked
    in a way no error reaches: it is stopped (SIGSTOP), as a rank spinning in an NCCL kernel whose peer
    is gone. srun --kill-on-bad-exit ends the step at once (SIGCONT, SIGTERM, SIGKILL after KillWait):
    the job fails with the dead rank's status within a minute, is not requeued, and no process of it
    is left on either node. (With --kill-on-bad-exit=0 this job stays RUNNING: nothing ever wakes the
    stopped rank.) test_slurm.py's single-node version runs only where this one cannot."""
    job, log = submit(slurm_nodes, tmp_path, "kill-2n", env={"TRAIN_STEPS": "500"})
    wait_for_log(slurm_nodes, job, log, r"^step 2/", timeout=180)
    victim, survivor = trainer_pid(slurm_nodes, job, 1), trainer_pid(slurm_nodes, job, 0)
    assert slurm_nodes.node_of(victim) == "node02"
    assert slurm_nodes.node_of(survivor) == "node01"
    os.kill(survivor, signal.SIGSTOP)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    info = slurm_nodes.wait_job(job, timeout=90)
    elapsed = time.monotonic() - killed_at
    time.sleep(1)  # let the batch shell finish writing
    text = read(log)
    print(f"job {job} ended {info.state} {info.exit_code} {elapsed:.1f}s after the kill")
    assert info.state == "FAILED" and info.restarts == 0, f"{info.fields}\n{text[-4000:]}"
    assert elapsed < 60, f"the job took {elapsed:.0f}s to fail after a rank died\n{text[-4000:]}"
    assert info.exit_code == "137:0", info.fields  # the dead rank's own status (128 + SIGKILL)
    failed = r"training failed: srun exit status \d+ \(.*exit 137 on rank 1.*\); not requeueing"
    assert re.search(failed, text), text[-4000:]
    assert "requeueing job" not in text and "checkpoint saved" not in text
    deadline = time.monotonic() + 15
    while (left := [p for r in (0, 1) for p in slurm_nodes.step_processes(job, r)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, left
    time.sleep(2)  # a requeue, were there one, would show by now
    assert slurm_nodes.job(job).restarts == 0 and slurm_nodes.job(job).state == "FAILED"
    assert not (tmp_path / "ckpt" / ".periln-exit").exists()


# ----------------------------------------------------------------------------- the fixture itself

def test_cluster_teardown_leaves_nothing(tmp_path):
    """A cluster torn down by an exception while a job runs on both nodes: its processes, veths,
    namespaces and bridge are gone. Namespaces and links named after a dead test process are removed."""
    reason = slurm_available() or netns_unavailable()
    if reason:
        pytest.skip(reason)
    cluster = MultiNodeCluster(tmp_path / "c", nodes=2)
    script = tmp_path / "sleep.sbatch"
    script.write_text("#!/bin/bash\nsrun sleep 300\n")
    with pytest.raises(RuntimeError, match="test failure"):
        with cluster:
            job = cluster.sbatch([str(script)], options=["-N2", "--ntasks-per-node=1", f"--output={tmp_path}/s.out"])
            cluster.wait_job(job, timeout=30, until=lambda i: i.state == "RUNNING")
            deadline = time.monotonic() + 30
            while len(sleepers := [p for p, comm, _ in cluster.step_processes(job, 1) if comm == "sleep"]) < 1:
                assert time.monotonic() < deadline, "srun sleep did not start on node02"
                time.sleep(0.3)
            assert cluster.node_of(sleepers[0]) == "node02"
            names = {cluster.bridge, *cluster.host_ends.values()}
            assert names <= set(link_list()) and set(cluster.netns.values()) <= set(netns_list())
            raise RuntimeError("test failure")
    assert not names & set(link_list()) and not set(cluster.netns.values()) & set(netns_list())
    assert not cluster.kill_leftovers() and all(p.poll() is not None for p in cluster.procs.values())
    assert not any(Path(f"/proc/{pid}").exists() for pid in sleepers)

    # What a killed test process leaves behind: its names carry its (now dead) PID.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ns, bridge = f"periln-{dead.pid}-0-node01", f"pln{dead.pid}k0b"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    removed = remove_stale()
    assert {ns, bridge} <= set(removed) and ns not in netns_list() and bridge not in link_list()
