"""Read tensors (or parts of them) from a megatron-core torch_dist checkpoint in one process.

torch_dist is torch.distributed.checkpoint's format: every saved tensor is a *global* tensor
(megatron stacks a block's layers along a leading layer axis, e.g.
`decoder.layers.self_attention.linear_qkv.weight` of shape [num_layers, ...]) written as chunks
with global offsets, one chunk per (layer, TP rank). Which TP/PP layout wrote it does not matter:
we ask for a region of the global tensor and DCP's resharding arithmetic picks the overlapping
chunks. No process group is needed; only the chunks that overlap the region are read.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list


class CheckpointReadError(RuntimeError):
    pass


class _RegionPlanner:
    """The three LoadPlanner calls FileSystemReader.read_data makes, writing into one tensor."""

    def __init__(self, dest: torch.Tensor):
        self.dest = dest

    def resolve_tensor(self, item):
        t = self.dest
        for dim, (off, length) in enumerate(zip(item.dest_offsets, item.lengths)):
            t = t.narrow(dim, off, length)
        return t

    def commit_tensor(self, item, tensor):
        pass

    def load_bytes(self, item, value: io.BytesIO):
        raise CheckpointReadError(f"unexpected byte item {item.storage_index.fqn}")


class TorchDistReader:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not (self.directory / ".metadata").is_file():
            raise CheckpointReadError(f"{self.directory}: no .metadata file; not a torch_dist checkpoint directory")
        self._reader = FileSystemReader(str(self.directory))
        metadata = self._reader.read_metadata()
        self._reader.set_up_storage_reader(metadata, is_coordinator=True)
        self.tensors: dict[str, TensorStorageMetadata] = {
            k: v for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._md(key).size)

    def dtype(self, key: str) -> torch.dtype:
        return self._md(key).properties.dtype

    def _md(self, key: str) -> TensorStorageMetadata:
        if key not in self.tensors:
            near = sorted(k for k in self.tensors if not k.startswith("optimizer"))
            raise CheckpointReadError(f"{self.directory}: tensor {key!r} is not in the checkpoint "
                                      f"(model tensors present: {', '.join(near)})")
        return self.tensors[key]

    def read(self, key: str, index: tuple[int, ...] = (), dtype: torch.dtype | None = None) -> torch.Tensor:
        """`tensor[index]` of the global tensor `key`, where `index` picks leading positions
        (e.g. `(layer,)`); read chunk by chunk, never the whole global tensor."""
        md = self._md(key)
        size = list(md.size)
        offsets = list(index) + [0] * (len(size) - len(index))
        lengths = [1] * len(index) + size[len(index):]
        for dim, i in enumerate(index):
            if not 0 <= i < size[dim]:
                raise CheckpointReadError(f"{self.directory}: {key} has shape {tuple(size)}; index {tuple(index)} is out of range")
        dest = torch.empty(lengths, dtype=md.properties.dtype)
        region = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(lengths))
        items = create_read_items_for_chunk_list(key, md, [region])
        covered = sum(torch.Size(i.lengths).numel() for i in items)
        if covered != dest.numel():
            raise CheckpointReadError(f"{self.directory}: the chunks of {key} cover {covered} of the "
                                      f"{dest.numel()} elements asked for (incomplete checkpoint?)")

        class _Plan:  # read_data only looks at .items
            pass

        plan = _Plan()
        plan.items = items
        try:
            self._reader.read_data(plan, _RegionPlanner(dest)).wait()
        except (OSError, RuntimeError) as e:
            raise CheckpointReadError(f"{self.directory}: reading {key}{list(index)}: {e}") from e
        out = dest.reshape(lengths[len(index):])
        return out if dtype is None else out.to(dtype)
