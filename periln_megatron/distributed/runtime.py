"""Process and device layer: who am I, which device, and megatron-core's parallel state.

One code path serves torchrun and Slurm's srun. With a GPU it is NCCL + CUDA; without one, gloo +
CPU, with cpu_shims.install() serving megatron-core's few CUDA-only requests (cpu_shims.py).
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass

import torch

from periln_megatron.distributed import cpu_shims


class RendezvousError(RuntimeError):
    pass


class LayoutError(ValueError):
    """A parallel layout that cannot work with this world size or model; `key` is the recipe key to fix."""

    def __init__(self, message: str, key: str = "parallel"):
        super().__init__(message)
        self.key = key


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


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1
    vpp: int | None = None  # virtual pipeline stages per rank (interleaved schedule)
    cp: int = 1
    sequence_parallel: bool = False

    @property
    def model_parallel(self) -> int:
        return self.tp * self.pp * self.cp

    def data_parallel(self, world_size: int) -> int:
        return world_size // self.model_parallel


def check_layout(
    layout: ParallelLayout,
    world_size: int,
    num_attention_heads: int | None = None,
    num_query_groups: int | None = None,
    num_layers: int | None = None,
) -> None:
    """Raise LayoutError for a layout that megatron-core would reject later, or crash on."""
    for name in ("tp", "pp", "cp"):
        if getattr(layout, name) < 1:
            raise LayoutError(f"parallel.{name} must be >= 1, got {getattr(layout, name)}", f"parallel.{name}")
    if world_size % layout.model_parallel:
        # the key to fix: the first of tp, pp, cp whose running product no longer divides the world
        product, key = 1, "parallel.cp"
        for name in ("tp", "pp", "cp"):
            product *= getattr(layout, name)
            if world_size % product:
                key = f"parallel.{name}"
                break
        raise LayoutError(
            f"world size {world_size} is not divisible by tp*pp*cp = "
            f"{layout.tp}*{layout.pp}*{layout.cp} = {layout.model_parallel}", key
        )
    if layout.sequence_parallel and layout.tp == 1:
        raise LayoutError("parallel.sequence_parallel needs parallel.tp > 1", "parallel.sequence_parallel")
    if layout.vpp is not None:
        if layout.pp < 2:
            raise LayoutError("parallel.vpp (interleaved pipeline) needs parallel.pp >= 2", "parallel.vpp")
        if layout.vpp < 1:
            raise LayoutError(f"parallel.vpp must be >= 1, got {layout.vpp}", "parallel.vpp")
    if num_attention_heads is not None:
        if layout.tp > num_attention_heads:
            raise LayoutError(f"parallel.tp={layout.tp} is larger than model.num_attention_heads={num_attention_heads}",
                              "parallel.tp")
        if num_attention_heads % layout.tp:
            raise LayoutError(f"model.num_attention_heads={num_attention_heads} is not divisible by parallel.tp={layout.tp}",
                              "parallel.tp")
    if num_query_groups is not None and num_query_groups % layout.tp:
        raise LayoutError(f"model.num_query_groups={num_query_groups} is not divisible by parallel.tp={layout.tp}",
                          "parallel.tp")
    if num_layers is not None:
        stages = layout.pp * (layout.vpp or 1)
        if num_layers % stages:
            raise LayoutError(
                f"model.num_layers={num_layers} is not divisible by parallel.pp*vpp = {stages}",
                "parallel.vpp" if layout.vpp else "parallel.pp",
            )


# ---------------------------------------------------------------------------- initialisation

MAX_CONNECTIONS = "CUDA_DEVICE_MAX_CONNECTIONS"


def launch_environment(tp: int, cp: int, environ=None) -> dict[str, str]:
    """Variables the ranks need before CUDA starts, that the user has not set. TP or CP > 1:
    CUDA_DEVICE_MAX_CONNECTIONS=1, which Megatron-LM asserts before Blackwell (one hardware queue,
    so the TP/SP collectives are issued before the GEMMs they overlap with)."""
    environ = os.environ if environ is None else environ
    if tp * cp > 1 and MAX_CONNECTIONS not in environ:
        return {MAX_CONNECTIONS: "1"}
    return {}

def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def initialize(
    layout: ParallelLayout = ParallelLayout(),
    seed: int = 1234,
    distributed_timeout_minutes: float = 10.0,
    dist_env: DistEnv | None = None,
) -> DistEnv:
    """Start torch.distributed and megatron-core's parallel state; seed every RNG.

    `distributed_timeout_minutes` (the recipe's train.distributed_timeout_minutes) is the timeout of
    the rendezvous and of every process group: a collective that waits that long for a rank raises.
    Seeding follows megatron: the default RNG gets `seed + 100 * pp_rank`, the tensor-parallel
    tracker `seed + 2718 + tp_rank`.
    """
    from megatron.core import parallel_state

    env = dist_env or read_dist_env()
    check_layout(layout, env.world_size)
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    else:
        cpu_shims.install()
    if not torch.distributed.is_initialized():
        if env.world_size == 1:  # nobody connects: an in-process store, no port to collide on
            rendezvous = {"store": torch.distributed.HashStore()}
        else:
            rendezvous = {"init_method": f"tcp://{env.master_addr}:{env.master_port}"}
        try:
            torch.distributed.init_process_group(
                backend="nccl" if use_cuda else "gloo",
                **rendezvous,
                rank=env.rank,
                world_size=env.world_size,
                timeout=datetime.timedelta(minutes=distributed_timeout_minutes),
            )
        except torch.distributed.DistNetworkError as e:
            if "EADDRINUSE" not in str(e):
                raise
            raise RendezvousError(
                f"rank 0 cannot listen on {env.master_addr}:{env.master_port} for the rendezvous: the port is in use "
                f"(another job on this node, or a MASTER_PORT left in the environment). Set MASTER_PORT to a free port."
            ) from e
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
        distributed_timeout_minutes=distributed_timeout_minutes,
    )
    seed_everything(seed)
    return env


def seed_everything(seed: int) -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    import random

    import numpy as np

    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    model_parallel_cuda_manual_seed(
        stage_seed, inference_rng_tracker=not torch.cuda.is_available(), force_reset_rng=True
    )


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
