"""The machine's matmul throughput, a fixed GEMM benchmark, so that timings taken on different machines
can be compared (docs/demo_search.md records it beside each timing; the report prints it)."""

from __future__ import annotations

import time

GEMM_SIZE = 512       # fp32 512 x 512 @ 512 x 512, one thread: the demo's training processes run one thread each
GEMM_SECONDS = 0.25   # measured for about this long


def matmul_gflops(size: int = GEMM_SIZE, seconds: float = GEMM_SECONDS) -> float:
    """GFLOP/s of a single-threaded fp32 square matmul of `size` (best of repeated timings over about
    `seconds`; the first call, which may allocate and warm caches, is not counted)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, generator=gen)
        b = torch.randn(size, size, generator=gen)
        out = torch.empty(size, size)
        torch.mm(a, b, out=out)
        best, deadline = float("inf"), time.perf_counter() + seconds
        while time.perf_counter() < deadline or best == float("inf"):
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return 2 * size ** 3 / best / 1e9
