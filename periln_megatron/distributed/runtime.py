"""Process and device layer: who am I, which device, and megatron-core's parallel state.

One code path serves torchrun and Slurm's srun. With a GPU it is NCCL + CUDA; without one, gloo +
CPU, with cpu_shims.install() serving megatron-core's few CUDA-only requests (cpu_shims.py).
"""

from __future__ import annotations

import datetime

import torch

from periln_megatron.distributed import cpu_shims
# initialize()'s arguments, which its callers name as runtime.ParallelLayout and runtime.SINGLE_PROCESS
from periln_megatron.distributed.dist_env import SINGLE_PROCESS, DistEnv, read_dist_env  # noqa: F401
from periln_megatron.distributed.layout import ParallelLayout, check_layout


class RendezvousError(RuntimeError):
    pass


# ---------------------------------------------------------------------------- initialisation

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
