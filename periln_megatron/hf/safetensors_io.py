"""Streaming safetensors writer: the header is planned from shapes alone, then tensors are
produced and written one at a time, so a shard never sits in memory (safetensors' save_file
would hold the whole shard, plus a bytes copy of it)."""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ST_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


@dataclass
class Entry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


def parse_size(text: str) -> int:
    """'2GB' -> 2e9 bytes (HF's decimal units), '500MiB' -> 500 * 2**20, '1000' -> 1000."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B?)\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {text!r} (e.g. 2GB, 500MB, 4GiB)")
    unit = m.group(2).upper().rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def plan_shards(entries: list[Entry], max_bytes: int) -> list[list[Entry]]:
    shards, current, size = [], [], 0
    for e in entries:
        if current and size + e.nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(e)
        size += e.nbytes
    if current:
        shards.append(current)
    return shards


def write_shard(path: Path, entries: list[Entry], progress: Callable[[Entry], None] = lambda e: None) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for e in entries:
        header[e.name] = {"dtype": ST_DTYPE[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for e in entries:
            t = e.produce()
            if tuple(t.shape) != e.shape or t.dtype != e.dtype:
                raise RuntimeError(f"{e.name}: produced {tuple(t.shape)} {t.dtype}, planned {e.shape} {e.dtype}")
            t = t.contiguous()
            f.write(t.view(torch.uint8).numpy().data if t.numel() else b"")
            progress(e)
            del t


def write_sharded(out_dir: Path, entries: list[Entry], max_bytes: int, log=print) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    shards = plan_shards(entries, max_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    done, total = [0], len(entries)

    def progress(e):
        done[0] += 1
        log(f"  [{done[0]}/{total}] {e.name} {list(e.shape)}")

    for name, shard in zip(names, shards):
        log(f"writing {name}: {len(shard)} tensors, {sum(e.nbytes for e in shard) / 1e9:.2f} GB")
        write_shard(out_dir / name, shard, progress)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(e.nbytes for e in entries)},
                 "weight_map": {e.name: name for name, shard in zip(names, shards) for e in shard}}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names
