"""Checkpoints with megatron-core's dist_checkpointing (torch_dist), in Megatron-LM's layout.

    <dir>/iter_0000010/                 one checkpoint (model, optimizer, scheduler, RNG, position)
    <dir>/iter_0000010/recipe.yaml      the resolved recipe that wrote it
    <dir>/latest_checkpointed_iteration.txt

The marker file is replaced atomically, and only after every rank has finished writing, so a
crash in the middle of a save leaves the previous checkpoint as the one resume uses. Tensors are
saved in a layout-independent form (the distributed optimizer's `fully_reshardable` keys: each
parameter's fp32 copy and Adam moments as tensors of the parameter's global shape), so a
checkpoint loads under any TP/PP/DP.

`checkpoint.format` decides how those same tensors are written and read (either reads the other's):

- `fully_parallel` (default): no gather. Each rank writes the slices of the optimizer state it owns
  (its flat range of the distributed optimizer's buffers, cut into boxes of the parameters' global
  tensors), and the model tensors, replicated across data parallelism, are spread over the DP ranks
  (megatron-core's FullyParallelSaveStrategyWrapper). A load reads only the slices this rank owns
  under the new layout. Extra memory during a save: the model tensors a rank writes (copies of
  views into the DDP buffer) and the few parameters split between two ranks.
- `gathered`: megatron-core's own `fully_reshardable` path, as before: every DP rank all-gathers
  the full fp32 parameters and both Adam moments, DP rank 0 writes them and all model tensors; a
  load reads the full tensors on every rank, then keeps its slice.
"""

from __future__ import annotations

import contextlib
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from periln_megatron.config.choices import CHECKPOINT_FORMATS, DEFAULT_CHECKPOINT_FORMAT
from periln_megatron.checkpoint.layout import CheckpointError, _publish, iteration_dir, latest_iteration, prune
from periln_megatron.checkpoint.optimizer_state import (_allocate_adam_state, _parallel_optimizer_state,
                                                        _torch_adam_load_fixes)

OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _model_keys(chunks) -> list[str]:
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size()}


def _rng_object():
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    layout = _layout()
    return ShardedObject(
        "rng_state", state, (layout["pp"], layout["tp"], layout["dp"]),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank()),
        replica_id=0,
    )


def _restore_rng(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _check_format(fmt: str) -> None:
    if fmt not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint format {fmt!r}: expected one of {', '.join(CHECKPOINT_FORMATS)}")


def _save_strategy(fmt: str):
    """fully_parallel: megatron-core's torch_dist writer, with the model tensors (replicated
    across data parallelism) spread over the DP ranks. gathered: the default writer (the first
    replica, DP rank 0, writes them)."""
    from megatron.core import parallel_state as ps

    if fmt != "fully_parallel" or ps.get_data_parallel_world_size(with_context_parallel=True) == 1:
        return None
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy("torch_dist"),
                                            ps.get_data_parallel_group(with_context_parallel=True))


def _sharded_state(chunks, optimizer, is_loading: bool) -> dict:
    from megatron.core.utils import unwrap_model

    # Keys as Megatron-LM writes them (no DDP/Float16Module "module." prefixes): the HF converter reads them.
    state = {key: chunk.sharded_state_dict() for key, chunk in zip(_model_keys(chunks), unwrap_model(chunks))}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=OPTIMIZER_METADATA)
    return state


def save(root: Path, iteration: int, chunks, optimizer, scheduler, recipe_yaml: str, keep: int,
         async_queue=None, fmt: str = DEFAULT_CHECKPOINT_FORMAT, extra: dict | None = None) -> Path:
    """Write one checkpoint on all ranks; then (rank 0) point the marker at it and prune old ones.

    `extra`: more common (rank-agreed, picklable) state, e.g. {"stability": ...}; read back with read_common.

    With `async_queue` (megatron's AsyncCallsQueue, GPU) the tensors are written in the background and
    the marker moves when the queue finalizes the request. `fmt`: see CHECKPOINT_FORMATS and the module docstring.
    """
    _check_format(fmt)
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    root = Path(root)
    target = iteration_dir(root, iteration)
    rank = torch.distributed.get_rank()
    if rank == 0:
        if target.exists():  # a partial write from a crashed save of the same iteration
            shutil.rmtree(target)
        target.mkdir(parents=True)
    torch.distributed.barrier()

    _forked_write_results_queue()
    _allocate_adam_state(optimizer)
    with _parallel_optimizer_state(optimizer, enabled=fmt == "fully_parallel"):
        state = _sharded_state(chunks, optimizer, is_loading=False)
    strategy = _save_strategy(fmt)
    state["rng_state"] = _rng_object()
    state["iteration"] = iteration
    state["scheduler"] = scheduler.state_dict()
    state["layout"] = _layout()
    state.update(extra or {})

    def finalize():
        torch.distributed.barrier()
        if rank == 0:
            (target / "recipe.yaml").write_text(recipe_yaml)
            _publish(root, iteration)
            prune(root, keep)
            print(f"saved checkpoint iteration {iteration} to {target}", flush=True)
        torch.distributed.barrier()

    if async_queue is not None:
        request = dist_checkpointing.save(state, str(target), strategy, async_sharded_save=True)
        request.add_finalize_fn(finalize)
        async_queue.schedule_async_request(request)
    else:
        try:
            dist_checkpointing.save(state, str(target), strategy)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - a full disk reads "unexpected pos ..."
            raise CheckpointError(f"{target}: saving iteration {iteration} failed: {_write_failure(target, e)}; "
                                  f"the marker still names iteration {latest_iteration(root)}") from e
        finalize()
    return target


def _forked_write_results_queue() -> None:
    """Without CUDA: megatron-core's queue of write results served by a forked Manager. megatron-core
    makes that queue once per process from a *spawned* Manager, and a spawned process re-imports this
    process's __main__ (the trainer: torch and megatron-core), ~5 s of CPU for every process that saves;
    a forked one starts at once. With CUDA megatron-core's own choice stands (spawn keeps a CUDA
    context out of the child)."""
    if torch.cuda.is_available():
        return
    import multiprocessing

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "absent") is None:
        filesystem_async._results_queue = multiprocessing.get_context("fork").Manager().Queue()


def _write_failure(target: Path, error: Exception) -> str:
    free = shutil.disk_usage(target).free
    if free < 64 * 2**20:
        return f"No space left on device ({free / 2**20:.1f} MiB free)"
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


# Transformer Engine's per-module FP8 metadata; a checkpoint from the local backend has none, and
# a te model then keeps its fresh (unscaled) state.
_EXTRA_STATE = "_extra_state"


def _check_absent_keys(directory: Path, absent: set) -> None:
    """Keys this model asks for that the checkpoint lacks: only TE's extra state may be absent."""
    real = sorted(k for k in absent if not k.endswith(_EXTRA_STATE))
    if real:
        raise CheckpointError(f"{directory}: the checkpoint has no {', '.join(real[:8])}"
                              f"{' ...' if len(real) > 8 else ''} ({len(real)} keys): a different model or placement?")


def load(directory: Path, chunks, optimizer, scheduler, fmt: str = DEFAULT_CHECKPOINT_FORMAT) -> int:
    """Load a checkpoint directory into the model (and optimizer/scheduler if given); return its iteration.

    Either format's checkpoint loads either way under any layout; `fmt` decides how the optimizer
    state is read: fully_parallel reads only this rank's slices, gathered the whole tensors."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    _check_format(fmt)
    directory = Path(directory)
    common = dist_checkpointing.load_common_state_dict(str(directory))
    with (_torch_adam_load_fixes(optimizer) if optimizer is not None else contextlib.nullcontext(),
          _parallel_optimizer_state(optimizer, enabled=fmt == "fully_parallel")):
        state = _sharded_state(chunks, optimizer, is_loading=True)
        if optimizer is not None and common.get("layout") == _layout():
            state["rng_state"] = _rng_object()  # RNG streams only carry over to the same layout
        loaded, _, absent = dist_checkpointing.load(state, str(directory), strict=StrictHandling.RETURN_UNEXPECTED)
        _check_absent_keys(directory, absent)
        from megatron.core.utils import unwrap_model

        for key, chunk in zip(_model_keys(chunks), unwrap_model(chunks)):
            result = chunk.load_state_dict(loaded[key], strict=False)
            left = [k for k in result.missing_keys + result.unexpected_keys if not k.endswith(_EXTRA_STATE)]
            if left:
                raise CheckpointError(f"{directory}: the model and the checkpoint disagree on {', '.join(left[:8])}")
        if optimizer is not None:
            optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and "scheduler" in common:
        scheduler.load_state_dict(common["scheduler"])
    if "rng_state" in loaded:
        _restore_rng(loaded["rng_state"])
    return int(common.get("iteration", 0))


def read_common(directory: Path) -> dict:
    """A checkpoint's common (non-tensor) state: iteration, scheduler, layout and save()'s `extra`."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(str(directory))


def load_weights_only(directory: Path, chunks) -> None:
    """Initial weights for a new run (e.g. converted from Hugging Face): model tensors only."""
    load(directory, chunks, optimizer=None, scheduler=None)
