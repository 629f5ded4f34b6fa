"""Who this process is in the job: rank, world size and rendezvous address from torchrun's or
Slurm's variables, and what the ranks need in their environment before CUDA starts. Torch-free:
the Slurm batch script's recipe check and the launcher read it without loading torch."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    head = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not head:
        raise ValueError(f"cannot parse Slurm node list {nodelist!r}")
    prefix, ranges = head.group(1), head.group(2)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _master_port(env, world_size: int, default: int) -> int:
    """MASTER_PORT if the launcher set it. Else 0 for a world of one, which listens on no port
    (`initialize` gives it an in-process store), so unrelated single-process runs share a machine."""
    if env.get("MASTER_PORT"):
        return int(env["MASTER_PORT"])
    return 0 if world_size == 1 else default


def read_dist_env(environ=None) -> DistEnv:
    """Rank, world size and rendezvous address from torchrun's or Slurm's variables."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_master_port(env, int(env["WORLD_SIZE"]), 29500),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        # Rank 0 runs on the step's first node, which is the job's only when srun spans the job.
        nodelist = (env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
                    or "127.0.0.1")
        job_id = int(env.get("SLURM_JOB_ID", 0))
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or first_host(nodelist),
            # Derived from the job id so that two jobs sharing a node do not collide.
            master_port=_master_port(env, int(env["SLURM_NTASKS"]), 20000 + job_id % 20000),
            launcher="slurm",
        )
    return DistEnv(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), _master_port(env, 1, 29500), "single")


# A world of one in this process, whatever the environment says (converters, tests).
SINGLE_PROCESS = DistEnv(0, 1, 0, "127.0.0.1", 0, "single")


MAX_CONNECTIONS = "CUDA_DEVICE_MAX_CONNECTIONS"


def launch_environment(tp: int, cp: int, environ=None) -> dict[str, str]:
    """Variables the ranks need before CUDA starts, that the user has not set. TP or CP > 1:
    CUDA_DEVICE_MAX_CONNECTIONS=1, which Megatron-LM asserts before Blackwell (one hardware queue,
    so the TP/SP collectives are issued before the GEMMs they overlap with)."""
    environ = os.environ if environ is None else environ
    if tp * cp > 1 and MAX_CONNECTIONS not in environ:
        return {MAX_CONNECTIONS: "1"}
    return {}
