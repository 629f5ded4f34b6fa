"""Training diagnostics for the Peri-LN vs Pre-LN comparison, measured every `diagnostics.interval` steps.

Per layer (lists indexed by global layer number, `layer.layer_number - 1`):

    layer_variance    variance of the residual stream after the layer (all elements of the global batch)
    layer_max_abs     max |activation| of the same tensor (the paper's "massive activations")
    layer_grad_norm   L2 norm of the gradient of all the layer's parameters (before clipping)

Per step (every step, not only measured ones: a few scalar operations):

    spike             "loss 9.1 > 3.0x median 2.9" when the loss or the global grad norm exceeds
                      `spike_factor` times the median of the previous `spike_window` values

On other steps nothing is hooked and nothing is computed. On a measured step `start()` installs
forward hooks on every TransformerLayer; `layer_grad_norms()` (after the backward and the schedule's
gradient reduction, before `optimizer.step()`) removes them and takes the gradient sums of squares;
`finish()` combines everything with one SUM and one MAX all-reduce over the world, so every rank
returns the same, complete values.

How each rank contributes so that a plain world sum counts every element exactly once:

* activations: under sequence (or context) parallelism each TP rank holds a different slice of the
  tokens, so all contribute; without SP the residual stream is replicated on the TP ranks and only TP
  rank 0 contributes. Data-parallel ranks see different micro-batches: all contribute. Pipeline stages
  only run their own layers' hooks. All micro-batches of the step are accumulated.
* gradients: read from the DDP grad buffer (`param.main_grad`) after the reduction. With the
  distributed optimizer the buffer was reduce-scattered, so each data-parallel rank holds the reduced
  gradient only for its shard of every bucket, and contributes exactly that shard; without it the
  buffer was all-reduced and only data-parallel rank 0 contributes. Tensor-parallel shards all
  contribute; parameters duplicated on the TP ranks (norm gains; under SP their grads were all-reduced
  by finalize_model_grads) only on TP rank 0. Gradients are divided by the fp16 loss scale.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

import torch

LAYER_KEYS = ("layer_variance", "layer_max_abs", "layer_grad_norm")


class SpikeDetector:
    """Flags values above `factor` x the running median of the previous `window` values.

    Non-finite or missing values (e.g. the grad norm of an fp16 step skipped for overflow) are
    neither checked nor remembered. No verdict until `min_history` values have been seen.
    """

    def __init__(self, window: int = 50, factor: float = 3.0, min_history: int | None = None):
        if window < 1:
            raise ValueError(f"spike window must be >= 1, got {window}")
        if factor <= 0:
            raise ValueError(f"spike factor must be > 0, got {factor}")
        self.factor = factor
        self.min_history = min(window, 5) if min_history is None else max(1, min_history)
        self.history: dict[str, deque] = {}
        self.window = window

    def update(self, **values: float | None) -> list[str]:
        """Check each named value against its own history, then add it; return the spike messages."""
        messages = []
        for name, value in values.items():
            if value is None or not math.isfinite(value):
                continue
            past = self.history.setdefault(name, deque(maxlen=self.window))
            if len(past) >= self.min_history:
                median = statistics.median(past)
                if value > self.factor * median:
                    messages.append(f"{name} {value:.4g} > {self.factor:g}x median {median:.4g}")
            past.append(float(value))
        return messages


def _transformer_layers(module) -> list:
    from megatron.core.transformer.transformer_layer import TransformerLayer

    return [m for m in module.modules() if isinstance(m, TransformerLayer)]


class Diagnostics:
    def __init__(self, chunks, cfg, config, optimizer=None):
        """chunks: this rank's DDP-wrapped model chunks; cfg: DiagnosticsConfig; config: TransformerConfig;
        optimizer: the megatron optimizer (for the fp16 loss scale), optional."""
        from megatron.core import parallel_state as ps
        from megatron.core.utils import unwrap_model

        self.chunks = list(chunks)
        self.optimizer = optimizer
        self.num_layers = config.num_layers
        self.spikes = SpikeDetector(cfg.spike_window, cfg.spike_factor)
        # (global index, layer module, owning DDP chunk)
        self.layers = []
        for chunk in self.chunks:
            for layer in _transformer_layers(unwrap_model(chunk)):
                index = layer.layer_number - 1
                if not 0 <= index < self.num_layers:
                    raise ValueError(f"layer_number {layer.layer_number} outside 1..{self.num_layers}")
                self.layers.append((index, layer, chunk))
        for chunk in self.chunks:
            ddp_config = getattr(chunk, "ddp_config", None)
            if ddp_config is not None and getattr(ddp_config, "num_distributed_optimizer_instances", 1) > 1:
                raise NotImplementedError("diagnostics: num_distributed_optimizer_instances > 1 is not supported")
        sharded_tokens = config.sequence_parallel or getattr(config, "context_parallel_size", 1) > 1
        self.count_activations = sharded_tokens or ps.get_tensor_model_parallel_rank() == 0
        self.device = None
        self._handles = []
        self._act = None  # [num_layers, 3]: sum, sum of squares, count (float64)
        self._max = None  # [num_layers]: max |x|

    # ------------------------------------------------------------------ measured steps only

    def start(self) -> None:
        """Hook every layer's output for this step's forward passes (all micro-batches)."""
        self._remove_hooks()
        from periln_megatron import runtime

        self.device = runtime.device()
        self._act = torch.zeros(self.num_layers, 3, dtype=torch.float64, device=self.device)
        self._max = torch.zeros(self.num_layers, dtype=torch.float64, device=self.device)
        for index, layer, _ in self.layers:
            self._handles.append(layer.register_forward_hook(self._make_hook(index)))

    def _make_hook(self, index: int):
        def hook(module, args, output):
            x = output[0] if isinstance(output, (tuple, list)) else output
            x = x.detach().float()
            self._max[index] = torch.maximum(self._max[index], x.abs().max().to(torch.float64))
            if self.count_activations:
                self._act[index, 0] += x.sum(dtype=torch.float64)
                self._act[index, 1] += (x * x).sum(dtype=torch.float64)
                self._act[index, 2] += x.numel()

        return hook

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def layer_grad_norms(self) -> torch.Tensor:
        """This rank's share of each layer's squared gradient norm (call after the backward and the grad
        reduction, before optimizer.step(): the step may rewrite the grad buffer). Removes the hooks."""
        self._remove_hooks()
        device = self.device or _device()
        sumsq = torch.zeros(self.num_layers, dtype=torch.float64, device=device)
        for index, layer, chunk in self.layers:
            for param in layer.parameters():
                part = _owned_grad(chunk, param)
                if part is not None:
                    sumsq[index] += part.detach().float().pow(2).sum(dtype=torch.float64)
        scale = self._loss_scale()
        return sumsq / (scale * scale) if scale != 1.0 else sumsq

    def _loss_scale(self) -> float:
        if self.optimizer is None:
            return 1.0
        scale = self.optimizer.get_loss_scale()
        return float(scale.item() if torch.is_tensor(scale) else scale)

    def finish(self, layer_grads: torch.Tensor | None) -> dict:
        """Combine over all ranks (collective: every rank calls it) and return the per-layer lists."""
        self._remove_hooks()
        if self._act is None:
            raise RuntimeError("Diagnostics.finish() without start()")
        have_grads = layer_grads is not None
        if not have_grads:
            layer_grads = torch.zeros(self.num_layers, dtype=torch.float64, device=self._act.device)
        summed = torch.cat([self._act.flatten(), layer_grads.to(self._act.device, torch.float64)])
        maxed = self._max.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(summed, op=torch.distributed.ReduceOp.SUM)
            torch.distributed.all_reduce(maxed, op=torch.distributed.ReduceOp.MAX)
        act = summed[: 3 * self.num_layers].view(self.num_layers, 3).cpu().tolist()
        grads = summed[3 * self.num_layers:].cpu().tolist()
        record = {"layer_variance": [], "layer_max_abs": maxed.cpu().tolist(), "layer_grad_norm": []}
        for (total, total_sq, count), g in zip(act, grads):
            if count > 0:
                mean = total / count
                record["layer_variance"].append(max(total_sq / count - mean * mean, 0.0))
            else:
                record["layer_variance"].append(None)
            record["layer_grad_norm"].append(math.sqrt(max(g, 0.0)) if have_grads else None)
        self._act = self._max = None
        return record

    # ------------------------------------------------------------------ every step

    def observe(self, loss: float | None, grad_norm: float | None) -> dict:
        """Spike check of the step's (rank-agreed) loss and global grad norm: {"spike": msg} or {}."""
        messages = self.spikes.update(loss=loss, grad_norm=grad_norm)
        return {"spike": "; ".join(messages)} if messages else {}


def _device():
    from periln_megatron import runtime

    return runtime.device()


def _owned_grad(chunk, param) -> torch.Tensor | None:
    """The part of `param`'s reduced gradient this rank contributes (see the module docstring), or None."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    if not param.requires_grad or not param_is_not_tensor_parallel_duplicate(param):
        return None
    grad = getattr(param, "main_grad", None)
    bucket_group = getattr(chunk, "param_to_bucket_group", {}).get(param)
    if grad is None or bucket_group is None:  # not managed by megatron DDP: plain autograd grads
        grad = param.grad
        if grad is None or (torch.distributed.is_initialized() and _dp_rank() != 0):
            return None
        return grad
    if not chunk.ddp_config.use_distributed_optimizer:
        return grad if bucket_group.data_parallel_group.rank() == 0 else None
    bucket = bucket_group.param_to_bucket[param]
    size = bucket_group.intra_distributed_optimizer_instance_size
    rank = bucket_group.intra_distributed_optimizer_instance_rank
    shard = bucket.grad_data.numel() // size
    lo, hi = rank * shard, (rank + 1) * shard
    start = grad.storage_offset() - bucket.grad_data.storage_offset()  # param's place in its bucket
    a, b = max(lo, start), min(hi, start + grad.numel())
    if a >= b:
        return None
    return grad.reshape(-1)[a - start:b - start]


def _dp_rank() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_rank(with_context_parallel=True)
