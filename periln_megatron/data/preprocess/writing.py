"""Writing the outputs: one prefix per key (and per input file with --keep-separate) through
PrefixWriter, partitions merged in Megatron-LM's order, renamed into place only when all are complete."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from periln_megatron.data.indexed import PrefixWriter
from periln_megatron.data.preprocess.inputs import InputError


def check_writable(flag: str, path: str) -> None:
    """InputError (one line naming the path) if a file cannot be created at `path`: the nearest
    existing ancestor of its directory must be a writable directory."""
    probe = Path(path).absolute().parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"{flag} {path}: cannot write there: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: cannot write there: directory {probe} is not writable")


def select_documents(tokens: np.ndarray, lengths: np.ndarray, counts: np.ndarray, mask: np.ndarray):
    """The documents where `mask` is true, as (tokens, tokens per sequence, sequences per document)."""
    seq_mask = np.repeat(mask, counts)
    return tokens[np.repeat(seq_mask, lengths)], lengths[seq_mask], counts[mask]


class KeyOutput:
    """One output prefix, written through `partitions` PrefixWriters (partition p: temporary prefix
    ``PREFIX.partP-PID``) merged in partition order with megatron-core's ``add_index`` at commit,
    as Megatron-LM merges its partitions. One partition writes PREFIX directly."""

    def __init__(self, prefix: str, key: str, vocab_size: int, partitions: int):
        self.prefix, self.key, self.vocab_size = prefix, key, vocab_size
        names = [prefix] if partitions == 1 else [f"{prefix}.part{p}-{os.getpid()}" for p in range(partitions)]
        self.parts: list[PrefixWriter] = []
        for name in names:
            self.parts.append(PrefixWriter(name, vocab_size))
        self.dtype = self.parts[0].dtype
        self.merged: PrefixWriter | None = None

    def add(self, tokens, lengths, counts, part: int = 0) -> None:
        self.parts[part].add_sequences(tokens, lengths, counts)

    @property
    def num_tokens(self) -> int:
        return sum(part.num_tokens for part in self.parts)

    def finalize(self) -> None:
        """Finalize (merge the partitions) under temporary names; nothing is renamed into place."""
        if len(self.parts) == 1:
            return self.parts[0].finalize()
        for part in self.parts:
            part.commit()
        self.merged = PrefixWriter(self.prefix, self.vocab_size)
        for part in self.parts:
            self.merged.builder.add_index(part.prefix)
        try:
            self.merged.finalize()
        finally:
            self._remove_parts()

    def commit(self) -> tuple[int, int]:
        """Check, rename into place (after finalize); return (num_documents, num_tokens)."""
        if self.merged is None and len(self.parts) > 1:
            self.finalize()
        return (self.merged or self.parts[0]).commit()

    def _remove_parts(self) -> None:
        for part in self.parts if len(self.parts) > 1 else ():
            for suffix in (".bin", ".idx"):
                if os.path.exists(part.prefix + suffix):
                    os.remove(part.prefix + suffix)

    def abort(self) -> None:
        for w in [*self.parts, *([self.merged] if self.merged else [])]:
            w.abort()
        self._remove_parts()
