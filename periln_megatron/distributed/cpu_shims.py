"""megatron-core without CUDA (gloo + CPU): `install()` serves the few CUDA-only requests
megatron-core makes, so that its real DDP, distributed optimizer and pipeline schedules run
unmodified on a laptop or CI runner:

1. `torch.cuda.current_device()` and friends -> answered for the CPU (device index 0, no-op
   synchronize/set_device, a dummy stream), see `_patch_torch_cuda`.
2. The CUDA RNG tracker -> `model_parallel_cuda_manual_seed(..., inference_rng_tracker=True)`,
   whose tracker never touches CUDA RNG state (runtime.seed_everything); activation recompute's reads of
   the CUDA RNG state get the CPU generator's, which is the one dropout draws from on a CPU.
3. Hard-coded `device="cuda"` / `.cuda()` in the pipeline schedules and DDP buffers -> the
   `_CudaToCpu` TorchFunctionMode rewrites cuda devices to cpu. A mode is popped while it handles a
   call, and `torch.autograd.backward` is such a call on torch >= 2.13, so the autograd engine
   enters it again: that covers every backward function, e.g. sequence parallelism's all-gather
   and activation recompute's forward-inside-backward (megatron's CheckpointFunction).
4. The optimizer's `param.type() == 'torch.cuda.FloatTensor'` checks -> `Tensor.type()` with no
   argument reports a CPU float tensor under its CUDA type name.

None of this is installed when CUDA is available.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is a CUDA ordinal; bools are ints too but never devices.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpu(TorchFunctionMode):
    """Rewrites cuda device arguments to cpu and makes `.cuda()` a no-op."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.cuda, torch.Tensor.pin_memory):
            return args[0]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


_CPU_TO_CUDA_TYPE = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


class _DummyStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return event

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


INSTALLED = False


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.set_device = lambda device: None
    cuda.synchronize = lambda device=None: None
    cuda.device_count = lambda: 0
    cuda.current_stream = lambda device=None: _DummyStream()
    cuda.default_stream = lambda device=None: _DummyStream()
    cuda.Stream = _DummyStream
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.empty_cache = lambda: None
    cuda.memory_allocated = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0
    cuda.get_rng_state = cuda.random.get_rng_state = lambda device="cuda": torch.get_rng_state()

    original_type = torch.Tensor.type

    def type_as_if_on_cuda(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original_type(self)
            return _CPU_TO_CUDA_TYPE.get(name, name)
        return original_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_as_if_on_cuda


def _autograd_under_mode() -> None:
    import torch.autograd as autograd

    engine = autograd._engine_run_backward

    def run_backward_under_mode(*args, **kwargs):
        with _CudaToCpu():
            return engine(*args, **kwargs)

    autograd._engine_run_backward = run_backward_under_mode


def install() -> None:
    """Let megatron-core's CUDA-only paths run on the CPU. No-op when CUDA is available."""
    global INSTALLED
    if torch.cuda.is_available() or INSTALLED:
        return
    _patch_torch_cuda()
    _autograd_under_mode()
    _CudaToCpu().__enter__()  # for the life of the process
    INSTALLED = True
