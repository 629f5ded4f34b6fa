"""Where checkpoints live and which one a run resumes from: Megatron-LM's `iter_NNNNNNN/`
directories, the marker file naming the newest complete one, verification and pruning."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

MARKER = "latest_checkpointed_iteration.txt"


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
