"""Training data: megatron-core's GPTDataset over indexed prefixes, and a deterministic sampler.

The sampler is a pure function of (batch id, data-parallel rank), so the data position saved in
a checkpoint is just the iteration, and resume replays exactly the samples an uninterrupted run
would have seen. The batch id is the iteration unless a rollback skipped batches: then it is the
iteration-th batch id not skipped (periln_megatron/training/stability.py; the skip list is in the
checkpoint).
"""

from __future__ import annotations

import copy
import errno
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from periln_megatron.config import Recipe


@dataclass(frozen=True)
class TokenizerInfo:
    """What GPTDataset needs to know of a tokenizer."""

    vocab_size: int
    eod: int

    @property
    def unique_identifiers(self) -> dict:  # part of GPTDataset's cache key
        return {"class": "TokenizerInfo", "vocab_size": self.vocab_size, "eod": self.eod}


def split_blend(prefixes: list) -> tuple[list[str], list[float] | None]:
    """[p1, p2] -> ([p1, p2], None); [0.3, p1, 0.7, p2] -> ([p1, p2], [0.3, 0.7]). A path given as
    PREFIX.bin or PREFIX.idx is PREFIX (as config.validate checks it)."""
    from periln_megatron.data.indexed import strip_data_suffix

    if len(prefixes) % 2 == 0 and all(isinstance(x, (int, float)) for x in prefixes[0::2]):
        return [strip_data_suffix(str(p)) for p in prefixes[1::2]], [float(w) for w in prefixes[0::2]]
    return [strip_data_suffix(str(p)) for p in prefixes], None


def build_datasets(recipe: Recipe, tokenizer: TokenizerInfo, run_dir: Path, extra_batches: int = 0):
    """(train, valid) GPTDatasets sized for the whole run, built by megatron-core; `extra_batches`
    more global batches of training data (what rollbacks may skip)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    t = recipe.train
    blend = None
    if not recipe.data.synthetic:
        blend = split_blend(recipe.data.prefixes)
    num_valid = (t.steps // t.eval_interval + 1) * t.eval_iters * t.global_batch_size if t.eval_interval else 0
    config = GPTDatasetConfig(
        random_seed=t.seed,
        sequence_length=recipe.model.seq_length,
        blend=blend,
        split=recipe.data.split,
        path_to_cache=str(Path(recipe.data.cache_dir or run_dir / "data_cache")),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    cls = MockGPTDataset if recipe.data.synthetic else GPTDataset
    sizes = [(t.steps + extra_batches) * t.global_batch_size, num_valid, 0]
    try:
        train, valid, _ = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build()
    except Exception as e:
        cache = Path(config.path_to_cache)
        existing = next((p for p in (cache, *cache.parents) if p.exists()), None)
        free = shutil.disk_usage(existing).free if existing else None
        if free is not None and free < 64 * 2**20:  # numpy reports a full disk as "N requested and M written"
            raise OSError(errno.ENOSPC, f"No space left on device ({free / 2**20:.1f} MiB free) for the data cache",
                          str(cache)) from e
        raise
    if valid is None and t.eval_interval:
        raise ValueError(f"{recipe.source}: `data.split` = {recipe.data.split!r} leaves no validation data "
                         f"but train.eval_interval = {t.eval_interval}")
    return train, valid


class MicroBatches:
    """Micro-batches of one data-parallel rank for one global batch, as dicts of tensors."""

    def __init__(self, dataset, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 vocab_size: int | None = None):
        self.dataset = dataset
        self.vocab_size = vocab_size
        self.gbs, self.mbs = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size

    @property
    def num_microbatches(self) -> int:
        return self.gbs // (self.mbs * self.dp_size)

    def for_iteration(self, iteration: int):
        """The micro-batches of global batch number `iteration` (a batch id: see the module docstring)."""
        per_rank = self.gbs // self.dp_size
        start = iteration * self.gbs + self.dp_rank * per_rank
        for m in range(self.num_microbatches):
            first = start + m * self.mbs
            samples = [self.dataset[(first + i) % len(self.dataset)] for i in range(self.mbs)]
            batch = {key: torch.stack([torch.as_tensor(s[key]) for s in samples])
                     for key in ("tokens", "labels", "loss_mask", "position_ids")}
            if self.vocab_size is not None and int(batch["labels"].max()) >= self.vocab_size:
                raise TokenIdError(f"iteration {iteration + 1}: token id {int(batch['labels'].max())} >= the vocabulary "
                                   f"size {self.vocab_size}: data.prefixes were made with another tokenizer")
            yield batch


class BatchPrefetcher:
    """The micro-batches of iteration i, with those of i + 1 built in a background thread while
    step i runs (pinned for a non-blocking copy on CUDA). A rank whose model chunks are all middle
    pipeline stages needs no data and loads none: it gets `None` per micro-batch.

    The batches are a pure function of the iteration, so prefetching changes nothing but timing."""

    def __init__(self, batches: MicroBatches, needs_data: bool, pin_memory: bool):
        from concurrent.futures import ThreadPoolExecutor

        self.batches, self.needs_data, self.pin_memory = batches, needs_data, pin_memory
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="batch-prefetch") if needs_data else None
        self._next: tuple[int, object] | None = None

    def _build(self, iteration: int) -> list[dict]:
        micro = list(self.batches.for_iteration(iteration))
        if self.pin_memory:
            micro = [{k: v.pin_memory() for k, v in batch.items()} for batch in micro]
        return micro

    def get(self, iteration: int, prefetch_next: bool = True, next_iteration: int | None = None) -> list:
        """The micro-batches of batch id `iteration`; `next_iteration` (default iteration + 1) is built
        in the background. A prefetched batch other than the one asked for is dropped (after a rollback)."""
        if not self.needs_data:
            return [None] * self.batches.num_microbatches
        if self._next is not None and self._next[0] == iteration:
            micro = self._next[1].result()
        else:
            micro = self._build(iteration)
        upcoming = iteration + 1 if next_iteration is None else next_iteration
        self._next = (upcoming, self._pool.submit(self._build, upcoming)) if prefetch_next else None
        return micro

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def check_prefixes(recipe: Recipe) -> None:
    """Every data prefix has a .bin and .idx that agree, and tokens in each split megatron-core builds.

    A truncated file fails here, naming it. So does a split left without tokens: megatron-core's
    GPTDataset builds every split with a nonzero share, used or not, and would loop forever
    counting epochs over an empty one.
    """
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)

    from periln_megatron.data.indexed import DataPrefixError, verified_sequence_lengths

    if recipe.data.synthetic:
        return
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(recipe.data.split))
    vocab = recipe.data_vocab_size()
    for prefix in split_blend(recipe.data.prefixes)[0]:
        num_documents, lengths = verified_sequence_lengths(prefix)
        if lengths.sum() == 0:  # np.memmap of the empty .bin: "cannot mmap an empty file", naming none
            raise DataPrefixError(f"{prefix}: an empty dataset ({num_documents} documents, 0 tokens) in "
                                  f"data.prefixes: nothing to train on")
        if vocab:
            check_token_ids(prefix, vocab)
        for name, bounds in zip(("train", "valid", "test"), matrix):
            if bounds is None:
                continue
            beg, end = (int(round(b * len(lengths))) for b in bounds)  # as megatron-core splits
            if lengths[beg:end].sum() == 0:
                raise DataPrefixError(
                    f"{prefix}: data.split {recipe.data.split!r} leaves the {name} split {end - beg} of its "
                    f"{len(lengths)} documents and no tokens; give it more documents or change data.split")


SCANNED_TOKENS = 1 << 24  # per prefix, from its start: a prefix made with another tokenizer shows at once


def check_token_ids(prefix: str, vocab_size: int) -> None:
    """No token id of the prefix's first SCANNED_TOKENS reaches the vocabulary (an embedding
    lookup past its end is an IndexError on CPU and a device-side assert on GPU). MicroBatches
    checks every batch as well."""
    from periln_megatron.data.indexed import DataPrefixError, read_index_header

    dtype, _, _ = read_index_header(prefix + ".idx")
    if np.iinfo(dtype).max < vocab_size:
        return
    tokens = np.memmap(prefix + ".bin", dtype=dtype, mode="r")
    head = tokens[:SCANNED_TOKENS]
    if head.size and int(head.max()) >= vocab_size:
        raise DataPrefixError(f"{prefix}: token id {int(head.max())} >= the vocabulary size {vocab_size}: the "
                              f"prefix was made with another tokenizer than tokenizer.model / model.vocab_size")


class TokenIdError(ValueError):
    pass


def resolve_tokenizer(recipe: Recipe) -> TokenizerInfo:
    """Read the tokenizer's size and EOD id and check model.vocab_size against it; `recipe` is left as it
    is (with_tokenizer_size gives the recipe the run records). Without a tokenizer the size is
    model.vocab_size, or for synthetic data data.synthetic_vocab_size."""
    from periln_megatron.config import RecipeError

    tok, m = recipe.tokenizer, recipe.model
    if tok.model:
        from periln_megatron.data.tokenizers import load_tokenizer

        loaded = load_tokenizer(tok.type, tok.model)
        if tok.vocab_size is not None and tok.vocab_size != loaded.vocab_size:
            raise RecipeError(f"{recipe.source}: `tokenizer.vocab_size` = {tok.vocab_size} but {tok.model} "
                              f"has {loaded.vocab_size} tokens")
        size, eod = loaded.vocab_size, loaded.eod_id
        if m.vocab_size is not None and m.vocab_size < loaded.vocab_size:
            multiple = math.lcm(m.make_vocab_size_divisible_by, recipe.parallel.tp)
            raise RecipeError(
                f"{recipe.source}: `model.vocab_size` = {m.vocab_size} is smaller than the {loaded.vocab_size} "
                f"tokens of tokenizer.model {tok.model} ({tok.type}): set model.vocab_size to null (the "
                f"tokenizer's size padded to a multiple of {multiple}: {-(-loaded.vocab_size // multiple) * multiple}) "
                f"or to at least {loaded.vocab_size}")
    else:
        size, eod = recipe.data_vocab_size(), 0
    if m.vocab_size is not None and m.vocab_size < size:
        raise RecipeError(f"{recipe.source}: `model.vocab_size` = {m.vocab_size} is smaller than the "
                          f"tokenizer's {size} tokens")
    return TokenizerInfo(vocab_size=size, eod=eod)


def with_tokenizer_size(recipe: Recipe, tokenizer: TokenizerInfo) -> Recipe:
    """A copy of `recipe` whose tokenizer.vocab_size is the size resolve_tokenizer read from tokenizer.model:
    what the run's recipe.yaml, its checkpoints and an HF export record, and what data_vocab_size() and
    padded_vocab_size() then give. `recipe` itself is not changed; without a tokenizer it is returned."""
    if not recipe.tokenizer.model or recipe.tokenizer.vocab_size == tokenizer.vocab_size:
        return recipe
    resolved = copy.deepcopy(recipe)
    resolved.tokenizer.vocab_size = tokenizer.vocab_size
    return resolved
