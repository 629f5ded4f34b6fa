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
import math
import os
import random
import shutil
import types
from pathlib import Path

import numpy as np
import torch

MARKER = "latest_checkpointed_iteration.txt"
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
FORMATS = ("fully_parallel", "gathered")
DEFAULT_FORMAT = "fully_parallel"


def iteration_dir(root: Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root: str | os.PathLike | None) -> int | None:
    """The newest complete checkpoint's iteration, from the marker file, or None."""
    if not root:
        return None
    marker = Path(root) / MARKER
    if not marker.is_file():
        return None
    text = marker.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{marker}: expected an iteration number, found {text!r}")
    iteration = int(text)
    if not iteration_dir(root, iteration).is_dir():
        raise FileNotFoundError(f"{marker} names iteration {iteration}, but {iteration_dir(root, iteration)} is missing")
    return iteration


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: corrupt, incomplete, or of another model. One line."""


def verify_iteration(directory: Path) -> None:
    """Cheap integrity check of one torch_dist iteration: the common state and the metadata load,
    and every byte range the metadata points at lies inside its `.distcp` file (a truncated or
    missing shard is caught; flipped bits inside a file are not)."""
    from torch.distributed.checkpoint import FileSystemReader

    directory = Path(directory)
    for name in (".metadata", "common.pt"):
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory / name} is missing: iteration {directory.name} is incomplete")
    try:
        metadata = FileSystemReader(str(directory)).read_metadata()
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise CheckpointError(f"{directory / '.metadata'} is unreadable ({type(e).__name__}: {e})") from None
    try:
        torch.load(directory / "common.pt", map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{directory / 'common.pt'} is unreadable ({type(e).__name__}: {e})") from None
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        path = directory / name
        have = path.stat().st_size if path.is_file() else None
        if have is None or have < size:
            raise CheckpointError(f"{path} is {'missing' if have is None else f'truncated ({have} of {size} bytes)'}")


def has_optimizer_state(directory: Path) -> bool:
    """False for weights-only checkpoints (convert_from_hf.py's): resume starts a fresh optimizer."""
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    return any(key.startswith("optimizer.") for key in keys)


def saved_iterations(root: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in Path(root).glob("iter_*") if p.name[5:].isdigit() and p.is_dir())


def resume_iteration(root, on_corrupt: str = "fail", log=print) -> int | None:
    """The iteration to resume from: the marker's, verified. If it is damaged, `on_corrupt`
    "fail" raises CheckpointError (naming the file, and the intact iteration to fall back to);
    "previous" falls back to the newest intact older iteration and says so."""
    if not root or not (Path(root) / MARKER).is_file():
        return None
    marker = Path(root) / MARKER
    text = marker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{marker}: expected an iteration number, found {text!r}")
    latest = int(text)
    try:
        if not iteration_dir(root, latest).is_dir():
            raise CheckpointError(f"{marker} names iteration {latest}, but {iteration_dir(root, latest)} is missing")
        verify_iteration(iteration_dir(root, latest))
        return latest
    except CheckpointError as damaged:
        fallback = None
        for older in reversed([i for i in saved_iterations(root) if i < latest]):
            try:
                verify_iteration(iteration_dir(root, older))
                fallback = older
                break
            except CheckpointError:
                continue
        if on_corrupt != "previous" or fallback is None:
            hint = (f"; iteration {fallback} is intact: set checkpoint.on_corrupt=previous to resume from it"
                    if fallback is not None else "; no older intact iteration")
            raise CheckpointError(f"cannot resume iteration {latest}: {damaged}{hint}") from None
        log(f"warning: iteration {latest} is damaged ({damaged}); resuming from iteration {fallback} "
            f"(checkpoint.on_corrupt=previous)")
        return fallback


# Recipe keys that decide the tensors a checkpoint holds; everything else (layout, backend,
# precision, schedule, data) may change between a save and a resume.
SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_size", "placement",
              "normalization", "embedding_norm", "untie_embeddings")


def shape_differences(saved, new) -> list[str]:
    """`model.key: saved -> new` for each tensor-shaping key that differs between two recipes."""
    diffs = [f"model.{k}: {getattr(saved.model, k)} -> {getattr(new.model, k)}"
             for k in SHAPE_KEYS if getattr(saved.model, k) != getattr(new.model, k)]
    if saved.padded_vocab_size() != new.padded_vocab_size():
        diffs.append(f"padded vocabulary: {saved.padded_vocab_size()} -> {new.padded_vocab_size()}")
    return diffs


def check_resumable(recipe, world_size: int | None = None, log=print) -> int | None:
    """Before anything is written: the iteration a run will resume from (verified, see
    `resume_iteration`), that its saved recipe has the same model shape, and the same schedule unless
    checkpoint.on_schedule_change says which wins (periln_megatron/schedule.py; with `checkpoint` the
    recipe is rewritten in place with the checkpoint's values). Raises CheckpointError."""
    from periln_megatron import schedule
    from periln_megatron.config import RecipeError, load_recipe

    root = recipe.checkpoint.dir
    iteration = resume_iteration(root, recipe.checkpoint.on_corrupt, log=lambda msg: None)
    if iteration is None:
        return None
    saved_yaml = iteration_dir(root, iteration) / "recipe.yaml"
    if not saved_yaml.is_file():
        return iteration
    try:
        saved = load_recipe(saved_yaml, check_environment=False)
    except RecipeError:
        return iteration  # written by an older version: the tensor load itself names any mismatch
    diffs = shape_differences(saved, recipe)
    if diffs:
        raise CheckpointError(f"{iteration_dir(root, iteration)} holds a different model ({'; '.join(diffs)}); "
                              f"use another checkpoint.dir, or checkpoint.load for initial weights of the same shape")
    if has_optimizer_state(iteration_dir(root, iteration)):
        schedule.reconcile(saved, recipe, iteration_dir(root, iteration), world_size, log=log)
    return iteration


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


def _torch_adams(optimizer) -> list:
    """The torch.optim.Adam instances inside a megatron optimizer (none with apex/TE's FusedAdam)."""
    inners = [getattr(inner, "optimizer", None) for inner in getattr(optimizer, "chained_optimizers", [optimizer])]
    return [o for o in inners if isinstance(o, torch.optim.Adam)]  # AdamW subclasses Adam


def _allocate_adam_state(optimizer) -> list:
    """Zero state (step 0) for parameters torch's Adam has not stepped yet: in a fresh process, or
    while fp16 loss scaling skips the first steps. megatron-core's state dict needs it."""
    adams = _torch_adams(optimizer)
    for adam in adams:
        for group in adam.param_groups:
            for param in group["params"]:
                if not adam.state[param]:
                    adam.state[param] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(param),
                                         "exp_avg_sq": torch.zeros_like(param)}
    return adams


@contextlib.contextmanager
def _torch_adam_load_fixes(optimizer):
    """Load megatron-core 0.16.1's reshardable optimizer state into torch's Adam (no apex/TE, e.g. CPU).

    Three gaps, all about Adam's per-parameter `step` tensor, which FusedAdam does not have:
    the state-dict builder reads `step` from existing state (none yet in a fresh process), the
    reshardable copy expects a source for every state key (there is none for `step`), and the step
    it restores is one tensor shared by all parameters, which Adam then increments once per parameter.
    """
    adams = _allocate_adam_state(optimizer)
    if not adams:
        yield
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def copy_without_step(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
        step = state.pop("step", None)
        try:
            original(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    DistributedOptimizer._set_main_param_and_optimizer_states = copy_without_step
    try:
        yield
    finally:
        DistributedOptimizer._set_main_param_and_optimizer_states = original
    for adam in adams:
        for state in adam.state.values():
            if "step" in state:
                state["step"] = state["step"].detach().clone()


def _row_major_boxes(lo: int, hi: int, shape: tuple) -> list[tuple[tuple, tuple]]:
    """(offset, size) boxes of a row-major tensor of `shape` whose flat ranges tile [lo, hi), in
    order: a partial leading row, a block of whole rows, a partial trailing row (recursively)."""
    if hi <= lo:
        return []
    if len(shape) <= 1:
        return [((lo,), (hi - lo,))]
    inner = math.prod(shape[1:])
    first, a = divmod(lo, inner)
    last, b = divmod(hi, inner)
    if first == last:
        return [((first, *o), (1, *n)) for o, n in _row_major_boxes(a, b, shape[1:])]
    boxes = []
    if a:
        boxes += [((first, *o), (1, *n)) for o, n in _row_major_boxes(a, inner, shape[1:])]
        first += 1
    if last > first:
        boxes.append(((first,) + (0,) * (len(shape) - 1), (last - first, *shape[1:])))
    if b:
        boxes += [((last, *o), (1, *n)) for o, n in _row_major_boxes(0, b, shape[1:])]
    return boxes


def _pieces(sharded) -> list[tuple]:
    """(ShardedTensor, flat start) for each part of a model parameter's checkpoint tensor(s): one
    for a ShardedTensor; for a factory (SwiGLU's fc1 is two global tensors, gate and up), its parts,
    each a contiguous flat range of the local parameter."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    if not isinstance(sharded, ShardedTensorFactory):
        return [(sharded, 0)]
    # Built on a meta tensor (no memory): each part's data is a view whose offset says where it starts.
    base = torch.empty(sharded.data.shape, dtype=sharded.data.dtype, device="meta")
    pieces = []
    for part in nested_values(sharded.build_fn(sharded.key, base, sharded.replica_id, None)):
        view = part.data
        if not ((view is base or view._base is base) and view.is_contiguous()):
            raise NotImplementedError(f"{sharded.key}: a checkpoint factory part is not a contiguous range")
        pieces.append((part, view.storage_offset()))
    return pieces


def _slice_tensors(sharded, key: str, flat: torch.Tensor, lo: int, replica_id) -> list[tuple]:
    """ShardedTensors for `flat`, the elements [lo, lo + len(flat)) of a local parameter whose model
    checkpoint tensor is `sharded`: boxes of the same global tensor shape under `key`, each a view
    of `flat`. Returns (ShardedTensor, position in flat)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    hi = lo + flat.numel()
    out = []
    for piece, start in _pieces(sharded):
        size = math.prod(piece.local_shape)
        a, b = max(lo, start), min(hi, start + size)
        if a >= b:
            continue
        pre = piece.prepend_axis_num
        pos = a - lo
        for offset, box in _row_major_boxes(a - start, b - start, tuple(piece.local_shape)):
            n = math.prod(box)
            # Leading (layer) axes become size-1 dimensions: irregular shards carry no prepend axes.
            shape = (1,) * pre + tuple(box)
            global_offset = tuple(piece.global_offset[:pre]) + tuple(
                g + o for g, o in zip(piece.global_offset[pre:], offset))
            out.append((ShardedTensor(
                key=f"{key}.{piece.key}", data=flat[pos:pos + n].view(shape), dtype=flat.dtype,
                local_shape=shape, global_shape=tuple(piece.global_shape), global_offset=global_offset,
                axis_fragmentations=None, replica_id=replica_id, prepend_axis_num=0,
            ), pos))
            pos += n
    return out


_STATE_KEYS = ("param", "exp_avg", "exp_avg_sq")  # megatron's names in the fully_reshardable keys


def _parallel_param_state(opt, model_sharded_state_dict, is_loading=False, metadata=None):
    """Stands in for DistributedOptimizer.sharded_param_state_fully_reshardable: the same keys
    (`optimizer.state.{param,exp_avg,exp_avg_sq}.<model key>`, the parameter's global shape, fp32),
    but each rank gives only the slices its own shard holds, as views: nothing is gathered or copied.
    Parameters are numbered as megatron numbers them; those with no slice here are absent."""
    from collections import ChainMap

    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

    model_sharded, _ = extract_sharded_tensors_and_factories(model_sharded_state_dict)
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    by_param = {sharded.data: sharded for sharded in nested_values(model_sharded)}
    state, layout = {}, {}
    param_idx = -1
    for gbuf_idx, gbuf_range_maps in enumerate(opt.gbuf_ranges):
        for range_maps in gbuf_range_maps.values():
            owned = ChainMap(*(range_map["param_map"] for range_map in range_maps))
            for model_param in opt.buffers[gbuf_idx].param_index_map:
                param_idx += 1
                if model_param not in owned:
                    continue
                param_range = owned[model_param]["param"]
                if param_range.size == 0:
                    continue
                sharded = by_param.get(model_param)
                if sharded is None:
                    raise CheckpointError(f"a parameter of shape {tuple(model_param.shape)} has no checkpoint key")
                if len(sharded.replica_id) != 3:
                    raise CheckpointError(f"{sharded.key}: expected a (PP, TP, DP) replica id, got {sharded.replica_id}")
                # Replicated across TP like the model tensor; never across DP: each slice is this rank's own.
                replica_id = (*sharded.replica_id[:2], opt.distributed_optimizer_instance_id)
                tensors = opt._get_main_param_and_optimizer_states(model_param)
                entry, where = {}, {}
                for name in _STATE_KEYS:
                    flat = tensors[name].detach().view(-1)
                    if flat.numel() != param_range.size:
                        raise CheckpointError(f"{sharded.key}: {name} holds {flat.numel()} elements, "
                                              f"the shard {param_range.size}")
                    parts = _slice_tensors(sharded, f"optimizer.state.{name}", flat, param_range.start, replica_id)
                    entry[name] = [t for t, _ in parts]
                    where[name] = [pos for _, pos in parts]
                state[param_idx] = entry
                layout[param_idx] = (model_param, where)
    opt._periln_parallel_layout = layout
    return state


def _load_parallel_param_state(opt, param_state: dict) -> None:
    """Stands in for DistributedOptimizer.load_parameter_state_from_fully_reshardable: the loaded
    slices are normally read in place into the optimizer's own tensors; copy any that were not."""
    layout = opt._periln_parallel_layout
    for param_idx, (model_param, where) in layout.items():
        tensors = opt._get_main_param_and_optimizer_states(model_param)
        for name in _STATE_KEYS:
            flat = tensors[name].detach().view(-1)
            for loaded, pos in zip(param_state[param_idx][name], where[name]):
                loaded = loaded.reshape(-1)
                target = flat[pos:pos + loaded.numel()]
                if loaded.data_ptr() != target.data_ptr():
                    target.copy_(loaded)
        if getattr(opt.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False):
            # the tensors above were unscaled copies: write them back
            opt._set_main_param_and_optimizer_states(model_param, {k: tensors[k] for k in _STATE_KEYS})


def _distributed_optimizers(optimizer) -> list:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inners = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o for o in inners if isinstance(o, DistributedOptimizer)]


@contextlib.contextmanager
def _parallel_optimizer_state(optimizer, enabled: bool):
    """With `enabled`, the distributed optimizers' fully_reshardable state methods are this module's
    no-gather ones (instance attributes, removed on exit)."""
    patched = _distributed_optimizers(optimizer) if enabled and optimizer is not None else []
    for opt in patched:
        opt.sharded_param_state_fully_reshardable = types.MethodType(_parallel_param_state, opt)
        opt.load_parameter_state_from_fully_reshardable = types.MethodType(_load_parallel_param_state, opt)
    try:
        yield
    finally:
        for opt in patched:
            for name in ("sharded_param_state_fully_reshardable", "load_parameter_state_from_fully_reshardable",
                         "_periln_parallel_layout"):
                opt.__dict__.pop(name, None)


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"checkpoint format {fmt!r}: expected one of {', '.join(FORMATS)}")


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
         async_queue=None, fmt: str = DEFAULT_FORMAT) -> Path:
    """Write one checkpoint on all ranks; then (rank 0) point the marker at it and prune old ones.

    With `async_queue` (megatron's AsyncCallsQueue, GPU) the tensors are written in the background and
    the marker moves when the queue finalizes the request. `fmt`: see FORMATS and the module docstring.
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

    _allocate_adam_state(optimizer)
    with _parallel_optimizer_state(optimizer, enabled=fmt == "fully_parallel"):
        state = _sharded_state(chunks, optimizer, is_loading=False)
    strategy = _save_strategy(fmt)
    state["rng_state"] = _rng_object()
    state["iteration"] = iteration
    state["scheduler"] = scheduler.state_dict()
    state["layout"] = _layout()

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


def _write_failure(target: Path, error: Exception) -> str:
    free = shutil.disk_usage(target).free
    if free < 64 * 2**20:
        return f"No space left on device ({free / 2**20:.1f} MiB free)"
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _publish(root: Path, iteration: int) -> None:
    tmp = root / (MARKER + ".tmp")
    tmp.write_text(f"{iteration}\n")
    with open(tmp) as f:
        os.fsync(f.fileno())
    os.replace(tmp, root / MARKER)


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints (rank 0 only); never the one the marker names."""
    latest = latest_iteration(root)
    if latest is None:
        return
    complete = sorted(int(p.name[5:]) for p in Path(root).glob("iter_*") if p.name[5:].isdigit() and int(p.name[5:]) <= latest)
    for old in complete[:-keep]:
        shutil.rmtree(iteration_dir(root, old), ignore_errors=True)


# Transformer Engine's per-module FP8 metadata; a checkpoint from the local backend has none, and
# a te model then keeps its fresh (unscaled) state.
_EXTRA_STATE = "_extra_state"


def _check_absent_keys(directory: Path, absent: set) -> None:
    """Keys this model asks for that the checkpoint lacks: only TE's extra state may be absent."""
    real = sorted(k for k in absent if not k.endswith(_EXTRA_STATE))
    if real:
        raise CheckpointError(f"{directory}: the checkpoint has no {', '.join(real[:8])}"
                              f"{' ...' if len(real) > 8 else ''} ({len(real)} keys): a different model or placement?")


def load(directory: Path, chunks, optimizer, scheduler, fmt: str = DEFAULT_FORMAT) -> int:
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


def load_weights_only(directory: Path, chunks) -> None:
    """Initial weights for a new run (e.g. converted from Hugging Face): model tensors only."""
    load(directory, chunks, optimizer=None, scheduler=None)
