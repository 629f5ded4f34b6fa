"""The trainer (periln-train) for the diagnostics tests, with the CPU shim kept active in the backward.

runtime.cpu_shims on torch >= 2.13 loses its cuda->cpu rewrite inside torch.autograd.backward, so
sequence parallelism's backward (`torch.empty(..., device=torch.cuda.current_device())`) fails on a
CPU; the same gap tests/workers/spec_parallel_worker.py works around. Until runtime.py handles it,
re-enter the rewrite around the autograd engine, then run the unmodified trainer CLI.

    torchrun ... tests/workers/diag_train.py --recipe R --set ...
"""

import sys

import torch

from periln_megatron import runtime
from periln_megatron.cli import train_main


def keep_cpu_shim_in_backward() -> None:
    import torch.autograd as autograd

    engine = autograd._engine_run_backward
    if getattr(engine, "_diag_shim", False):
        return

    def engine_with_shim(*args, **kwargs):
        with runtime._CudaToCpu():
            return engine(*args, **kwargs)

    engine_with_shim._diag_shim = True
    autograd._engine_run_backward = engine_with_shim


if __name__ == "__main__":
    if not torch.cuda.is_available():
        keep_cpu_shim_in_backward()
    sys.exit(train_main())
