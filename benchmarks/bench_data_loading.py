#!/usr/bin/env python3
"""What reading a batch costs a rank at the 400M recipe's shape, and how much of it prefetching hides.

    python benchmarks/bench_data_loading.py [--iterations 20] [--compute-ms 300]

Builds a random-token indexed prefix (cl100k-sized ids, int32), megatron-core's GPTDataset over it
(seq 2048), and one data-parallel rank's share of a 256-sequence global batch at DP=8 (32
sequences, micro batch 16), as the trainer does. Prints, measured in this run:
  - the time to build one iteration's micro-batches on the main thread (what every TP rank pays
    without prefetching);
  - the main thread's wait for data per step with BatchPrefetcher while a stand-in compute step
    (a CPU matmul loop of --compute-ms) runs, and the ratio of the two.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def build_dataset(tmp: Path, seq: int, samples: int):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from periln_megatron.data.datasets import TokenizerInfo
    from periln_megatron.data.indexed import PrefixWriter

    writer = PrefixWriter(tmp / "random", vocab_size=100277)
    rng = np.random.default_rng(0)
    lengths = rng.integers(200, 4000, 8000)
    writer.add_documents(rng.integers(0, 100277, int(lengths.sum())).astype(np.int32), lengths)
    writer.commit()
    config = GPTDatasetConfig(random_seed=1, sequence_length=seq, blend=([str(tmp / "random")], None), split="100,0,0",
                              path_to_cache=str(tmp / "cache"), tokenizer=TokenizerInfo(100277, 100257),
                              reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                              create_attention_mask=False, mmap_bin_files=True)
    return BlendedMegatronDatasetBuilder(GPTDataset, [samples, 0, 0], lambda: True, config).build()[0]


def stand_in_step(ms: float) -> None:
    a = torch.randn(256, 256)
    deadline = time.perf_counter() + ms / 1000
    while time.perf_counter() < deadline:
        a = torch.tanh(a @ a)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--compute-ms", type=float, default=300.0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from periln_megatron.data.datasets import BatchPrefetcher, MicroBatches

    with tempfile.TemporaryDirectory() as tmp:
        dataset = build_dataset(Path(tmp), seq=2048, samples=(args.iterations + 2) * 256)
        batches = MicroBatches(dataset, global_batch_size=256, micro_batch_size=16, dp_rank=3, dp_size=8)
        build = []
        for it in range(args.iterations):
            t0 = time.perf_counter()
            micro = list(batches.for_iteration(it))
            build.append(time.perf_counter() - t0)
        assert len(micro) == 2 and micro[0]["tokens"].shape == (16, 2048)

        prefetcher = BatchPrefetcher(batches, needs_data=True, pin_memory=False)
        waits = []
        try:
            prefetcher.get(0)
            for it in range(1, args.iterations):
                stand_in_step(args.compute_ms)
                t0 = time.perf_counter()
                prefetcher.get(it)
                waits.append(time.perf_counter() - t0)
        finally:
            prefetcher.close()
    b, w = statistics.median(build) * 1000, statistics.median(waits) * 1000
    print(f"one iteration's batches for one rank (32 x 2048 tokens): median {b:.1f} ms to build on the main thread")
    print(f"main-thread wait per step with prefetching (stand-in step {args.compute_ms:.0f} ms): median {w:.2f} ms")
    print(f"ratio wait/build: {w / b:.3f}; build time as a share of the stand-in step: {b / args.compute_ms:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
