"""The distributed optimizer's state in layout-independent boxes: each rank writes (fully_parallel)
or reads only the slices of the parameters' global fp32 copies and Adam moments that it owns."""

from __future__ import annotations

import contextlib
import math
import types

import torch

from periln_megatron.checkpoint.layout import CheckpointError

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
