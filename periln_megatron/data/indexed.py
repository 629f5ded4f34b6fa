"""megatron-core indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``): checking and writing.

``verify_prefix`` checks that a prefix is complete and self-consistent before megatron-core's
reader memory-maps it (the reader itself would fail late and obscurely on a truncated ``.bin``).
``PrefixWriter`` writes one through megatron-core's ``IndexedDatasetBuilder`` into temporary
names and renames them only on success, ``.idx`` last, so a complete-looking pair always is one.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

_INDEX_HEADER = b"MMIDIDX\x00\x00"  # megatron-core's _INDEX_HEADER
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count


class DataPrefixError(ValueError):
    """A prefix is missing, truncated or inconsistent; the message names the file."""


# megatron-core's DType codes (megatron.core.datasets.indexed_dataset.DType), kept here so that
# checking a prefix does not import megatron-core (seconds of start-up); a test keeps them equal.
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}


def strip_data_suffix(prefix: str) -> str:
    """A prefix given as one of its files, PREFIX.bin or PREFIX.idx, as PREFIX (one suffix only).
    The trainer (data.prefixes) and tools/inspect_data.py take either form."""
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix):
            return prefix[: -len(suffix)]
    return prefix


def _dtype_from_code(code: int):
    return DTYPE_CODES.get(code)


def read_index_header(idx_path: str | Path) -> tuple[np.dtype, int, int]:
    """(token dtype, sequence count, document-index count) from an .idx header; DataPrefixError if bad."""
    idx_path = Path(idx_path)
    try:
        with open(idx_path, "rb") as f:
            head = f.read(_HEADER_BYTES)
    except OSError as exc:
        raise DataPrefixError(f"{idx_path}: cannot read: {exc.strerror or exc}") from None
    if len(head) < _HEADER_BYTES:
        raise DataPrefixError(f"{idx_path}: truncated index: expected at least {_HEADER_BYTES} header bytes, "
                              f"found {len(head)} bytes")
    if head[:9] != _INDEX_HEADER:
        raise DataPrefixError(f"{idx_path}: not a megatron-core index (bad magic {head[:9]!r})")
    version, code, seq_count, doc_count = struct.unpack("<QBQQ", head[9:])
    if version != 1:
        raise DataPrefixError(f"{idx_path}: unsupported index version {version} (expected 1)")
    dtype = _dtype_from_code(code)
    if dtype is None:
        raise DataPrefixError(f"{idx_path}: unknown token dtype code {code}")
    return np.dtype(dtype), seq_count, doc_count


def verify_prefix(prefix: str | Path) -> tuple[int, int]:
    """Check ``PREFIX.idx`` and ``PREFIX.bin`` agree; return (num_documents, num_tokens).

    See `verified_sequence_lengths` for the checks.
    """
    num_documents, lengths = verified_sequence_lengths(prefix)
    return num_documents, int(lengths.sum(dtype=np.int64))


def verified_sequence_lengths(prefix: str | Path) -> tuple[int, np.ndarray]:
    """Check ``PREFIX.idx`` and ``PREFIX.bin`` agree; return (num_documents, token count per sequence).

    Checks: both files exist; the .idx header is valid and its size matches its counts; sequence
    lengths are non-negative, pointers are contiguous, document indices run from 0 to the sequence
    count; the .bin holds exactly the bytes the index points at. Raises DataPrefixError naming the
    file and the expected vs actual sizes.
    """
    prefix = str(prefix)
    idx_path, bin_path = Path(prefix + ".idx"), Path(prefix + ".bin")
    for p in (idx_path, bin_path):
        if not p.is_file():
            raise DataPrefixError(f"{p}: file not found (prefix {prefix!r} needs both .idx and .bin)")
    dtype, seq_count, doc_count = read_index_header(idx_path)
    body = seq_count * (4 + 8) + doc_count * 8
    expected = (_HEADER_BYTES + body, _HEADER_BYTES + body + seq_count)  # without / with sequence modes
    actual = idx_path.stat().st_size
    if actual not in expected:
        what = "truncated" if actual < expected[0] else "has trailing bytes"
        raise DataPrefixError(f"{idx_path}: index {what}: expected {expected[0]} bytes for {seq_count} sequences "
                              f"and {doc_count} document indices, found {actual} bytes")
    if doc_count < 1:
        raise DataPrefixError(f"{idx_path}: no document indices (expected at least the leading 0)")
    mm = np.memmap(idx_path, mode="r", dtype=np.uint8)
    try:
        off = _HEADER_BYTES
        lengths = np.frombuffer(mm, np.int32, seq_count, off)
        pointers = np.frombuffer(mm, np.int64, seq_count, off + 4 * seq_count)
        docs = np.frombuffer(mm, np.int64, doc_count, off + 12 * seq_count)
        if seq_count and lengths.min() < 0:
            raise DataPrefixError(f"{idx_path}: negative sequence length at sequence {int(np.argmin(lengths))}")
        lengths = np.array(lengths)  # a copy that outlives the map
        num_tokens = int(lengths.sum(dtype=np.int64))
        if seq_count:
            expect_ptr = np.concatenate(([0], np.cumsum(lengths[:-1], dtype=np.int64))) * dtype.itemsize
            bad = np.flatnonzero(pointers != expect_ptr)
            if len(bad):
                i = int(bad[0])
                raise DataPrefixError(f"{idx_path}: sequence {i} points at byte {int(pointers[i])}, expected "
                                      f"{int(expect_ptr[i])} (the index is inconsistent)")
        if docs[0] != 0 or docs[-1] != seq_count or (doc_count > 1 and np.any(np.diff(docs) < 0)):
            raise DataPrefixError(f"{idx_path}: document indices must rise from 0 to {seq_count} "
                                  f"(found {int(docs[0])} .. {int(docs[-1])})")
    finally:
        del mm
    expected_bin = num_tokens * dtype.itemsize
    actual_bin = bin_path.stat().st_size
    if actual_bin != expected_bin:
        what = "truncated" if actual_bin < expected_bin else "longer than its index"
        raise DataPrefixError(f"{bin_path}: {what}: {idx_path.name} describes {num_tokens} tokens of "
                              f"{dtype.name} = {expected_bin} bytes, found {actual_bin} bytes")
    return doc_count - 1, lengths


class PrefixWriter:
    """Write one prefix with megatron-core's IndexedDatasetBuilder, atomically.

    Data goes to ``PREFIX.bin.tmp-PID`` / ``PREFIX.idx.tmp-PID``; ``finalize()`` writes the index there
    (several outputs can be finalized before any is renamed); ``commit()`` finalizes, removes
    any old ``PREFIX.idx`` first, renames ``.bin`` then ``.idx``; ``abort()`` removes the temporaries.
    ``add_documents`` (one sequence each) and ``add_sequences`` append many in one contiguous write.
    """

    def __init__(self, prefix: str | Path, vocab_size: int):
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

        self.prefix = str(prefix)
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(DType.optimal_dtype(vocab_size))
        tag = f".tmp-{os.getpid()}"
        self.tmp_bin, self.tmp_idx = self.prefix + ".bin" + tag, self.prefix + ".idx" + tag
        self.builder = IndexedDatasetBuilder(self.tmp_bin, dtype=self.dtype.type)
        self.num_documents = self.num_tokens = 0
        self._done = self._finalized = False

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as all their tokens concatenated plus the length of each."""
        self.add_sequences(tokens, lengths, np.ones(len(lengths), dtype=np.int64))

    def add_sequences(self, tokens: np.ndarray, lengths: np.ndarray, counts: np.ndarray) -> None:
        """Append documents as megatron-core's ``add_document`` does, many at once: all their tokens
        concatenated, the tokens of each sequence, the sequences of each document (0: a document of
        no sequences)."""
        if len(counts) == 0:
            return
        b = self.builder
        b.data_file.write(memoryview(np.ascontiguousarray(tokens, dtype=self.dtype)))
        n = len(b.sequence_lengths)
        b.sequence_lengths.extend(lengths.tolist())
        b.document_indices.extend((n + np.cumsum(counts, dtype=np.int64)).tolist())
        self.num_documents += len(counts)
        self.num_tokens += len(tokens)

    def finalize(self) -> None:
        """Write the index under its temporary name: all of `commit` but the renames."""
        if not self._finalized:
            self.builder.finalize(self.tmp_idx)
            self.builder, self._finalized = None, True  # its index lists can be large: not kept till commit

    def commit(self) -> tuple[int, int]:
        """Finalize, check, rename into place; return (num_documents, num_tokens)."""
        self.finalize()
        final_bin, final_idx = self.prefix + ".bin", self.prefix + ".idx"
        if os.path.exists(final_idx):
            os.remove(final_idx)
        os.replace(self.tmp_bin, final_bin)
        os.replace(self.tmp_idx, final_idx)
        self._done = True
        return verify_prefix(self.prefix)

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            if self.builder is not None:
                self.builder.data_file.close()
        except Exception:  # noqa: BLE001
            pass
        for p in (self.tmp_bin, self.tmp_idx):
            if os.path.exists(p):
                os.remove(p)
