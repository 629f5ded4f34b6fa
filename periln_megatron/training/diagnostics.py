"""Training diagnostics for the Peri-LN vs Pre-LN comparison, measured every `diagnostics.interval` steps.

Per layer: lists indexed by the layer number, 0..num_layers. Index 0 is the embedding output (the
hidden states entering layer 1, after the embedding norm if the recipe has one), index n the residual
stream after layer n. Keys that do not apply to a layer hold None there.

    layer_variance         variance of the residual stream (all elements of the global batch)
    layer_max_abs          max |activation| of the same tensor (the paper's "massive activations")
    layer_max_abs_dim      the hidden dimension holding that max
    layer_top_dims         [[dim, share], ...]: the 3 hidden dimensions with the largest share of the
                           tensor's sum of squares (share of 1/hidden each if the energy were spread evenly)
    layer_max_token_sumsq  max over tokens of the token's sum of squares over the hidden dimension: above
                           65504 (FP16_MAX) a norm that squares and sums in fp16 overflows; an element
                           overflows fp16 itself when layer_max_abs > 65504
    layer_grad_norm        L2 norm of the gradient of the layer's parameters (before clipping); at index
                           0 the embedding's (word embeddings and embedding norm)
    attn_out_rms, mlp_out_rms
                           RMS of the attention / MLP sublayer output as it enters the residual add
                           (after Peri-LN's output norm, bias included); None at index 0
    attn_out_max_abs, mlp_out_max_abs
                           max |activation| of the same tensors
    attn_out_gain, mlp_out_gain
                           mean |gamma| of the sublayer's output norm (Peri-LN, Output-LN); None where the
                           layer has none (Pre-LN, Post-LN) and at index 0

Per step (every step, not only measured ones: a few scalar operations):

    spike             "loss 9.1 > 3.0x median 2.9" when the loss or the global grad norm exceeds
                      `spike_factor` times the median of the previous `spike_window` values

On other steps nothing is hooked and nothing is computed. On a measured step `start()` installs
forward hooks on every TransformerLayer, its attention and MLP and their output norms, and a forward
pre-hook on layer 1 (the embedding output); `layer_grad_norms()` (after the backward and the
schedule's gradient reduction, before `optimizer.step()`) removes them and takes the gradient sums of
squares; `finish()` combines everything with one SUM and one MAX all-reduce over the world, so every
rank returns the same, complete values.

How each rank contributes so that a plain world sum counts every element exactly once:

* activations: under sequence (or context) parallelism each TP rank holds a different slice of the
  tokens, so all contribute; without SP the residual stream and the sublayer outputs (reduced by the
  row-parallel linear) are replicated on the TP ranks and only TP rank 0 contributes. Data-parallel
  ranks see different micro-batches: all contribute. Pipeline stages only run their own layers' hooks.
  All micro-batches of the step are accumulated. The hidden dimension is never split (TP splits heads
  and the FFN inside the sublayers), so per-dimension and per-token figures are complete on every rank.
  Maxima need no such rule (MAX over the world). Under full activation recompute a layer runs twice;
  sums and counts double together, so no figure changes.
* output-norm gains: the parameters are replicated over TP and DP; only the rank at TP rank 0 and
  data-parallel rank 0 of the stage that holds the layer contributes, read in the norm's forward (the
  values this step used, also under overlapped parameter all-gathers).
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

FP16_MAX = 65504.0
TOP_DIMS = 3
SUBLAYERS = ("attn", "mlp")
# per-layer lists of numbers (None where not applicable), all indexed by layer number 0..num_layers
LAYER_KEYS = ("layer_variance", "layer_max_abs", "layer_max_token_sumsq", "layer_grad_norm",
              "attn_out_rms", "mlp_out_rms", "attn_out_max_abs", "mlp_out_max_abs", "attn_out_gain", "mlp_out_gain")
# per-layer lists of other shapes: an int, and [[dim, share], ...]
LAYER_DIM_KEYS = ("layer_max_abs_dim", "layer_top_dims")


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


def _out_norm(sublayer, linear: str):
    """The output norm inside a sublayer's row-parallel linear (specs.RowParallelLinearWithOutNorm), or None."""
    return getattr(getattr(sublayer, linear, None), "out_norm", None)


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class Diagnostics:
    def __init__(self, chunks, cfg, config, optimizer=None):
        """chunks: this rank's DDP-wrapped model chunks; cfg: DiagnosticsConfig; config: TransformerConfig;
        optimizer: the megatron optimizer (for the fp16 loss scale), optional."""
        from megatron.core import parallel_state as ps
        from megatron.core.utils import unwrap_model

        self.chunks = list(chunks)
        self.optimizer = optimizer
        self.num_layers = config.num_layers
        self.hidden = config.hidden_size
        self.spikes = SpikeDetector(cfg.spike_window, cfg.spike_factor)
        # (layer number 1..num_layers, layer module, owning DDP chunk)
        self.layers = []
        # (owning DDP chunk, the embedding module): its parameters are "layer 0" for the grad norm
        self.embeddings = []
        for chunk in self.chunks:
            model = unwrap_model(chunk)
            for layer in _transformer_layers(model):
                if not 1 <= layer.layer_number <= self.num_layers:
                    raise ValueError(f"layer_number {layer.layer_number} outside 1..{self.num_layers}")
                self.layers.append((layer.layer_number, layer, chunk))
            embedding = getattr(model, "embedding", None) if getattr(model, "pre_process", False) else None
            if embedding is not None:
                self.embeddings.append((chunk, embedding))
        for chunk in self.chunks:
            ddp_config = getattr(chunk, "ddp_config", None)
            if ddp_config is not None and getattr(ddp_config, "num_distributed_optimizer_instances", 1) > 1:
                raise NotImplementedError("diagnostics: num_distributed_optimizer_instances > 1 is not supported")
        sharded_tokens = config.sequence_parallel or getattr(config, "context_parallel_size", 1) > 1
        self.count_activations = sharded_tokens or ps.get_tensor_model_parallel_rank() == 0
        # replicated parameters (norm gains) are counted by one rank per pipeline stage
        self.count_params = (ps.get_tensor_model_parallel_rank() == 0
                             and ps.get_data_parallel_rank(with_context_parallel=True) == 0)
        self.device = None
        self._handles = []
        self._stats = None

    # ------------------------------------------------------------------ measured steps only

    def _zeros(self, *shape) -> torch.Tensor:
        return torch.zeros(*shape, dtype=torch.float64, device=self.device)

    def start(self) -> None:
        """Hook every layer's output, its sublayers' outputs and the embedding output (the input of layer
        1) for this step's forward passes (all micro-batches)."""
        self._remove_hooks()
        from periln_megatron.distributed import runtime

        self.device = runtime.device()
        n, h = self.num_layers + 1, self.hidden
        self._stats = {
            # summed over the world
            "act": self._zeros(n, 3),        # residual stream: sum, sum of squares, count
            "dim_sumsq": self._zeros(n, h),  # residual stream: sum of squares per hidden dimension
            "sub": self._zeros(n, 2, 2),     # attention / MLP output: sum of squares, count
            "gain": self._zeros(n, 2, 2),    # attention / MLP output norm: sum |gamma|, count
            # maxed over the world
            "max": self._zeros(n),           # residual stream: max |x|
            "dim_max": self._zeros(n, h),    # residual stream: max |x| per hidden dimension
            "tok_sumsq": self._zeros(n),     # residual stream: max over tokens of the token's sum of squares
            "sub_max": self._zeros(n, 2),    # attention / MLP output: max |x|
        }
        self._gain_seen = set()
        for number, layer, _ in self.layers:
            self._handles.append(layer.register_forward_hook(self._residual_hook(number)))
            if number == 1:  # its input is the embedding output (on the first stage, after any embedding norm)
                self._handles.append(layer.register_forward_pre_hook(self._embedding_hook(), with_kwargs=True))
            for s, (sublayer, linear) in enumerate(((layer.self_attention, "linear_proj"), (layer.mlp, "linear_fc2"))):
                self._handles.append(sublayer.register_forward_hook(self._sublayer_hook(number, s)))
                norm = _out_norm(sublayer, linear)
                if norm is not None and self.count_params:
                    self._handles.append(norm.register_forward_hook(self._gain_hook(number, s)))

    def _record_residual(self, index: int, x: torch.Tensor) -> None:
        st = self._stats
        x = x.detach().float()
        absx = x.abs()
        flat = absx.reshape(-1, x.shape[-1])
        dim_max = flat.amax(dim=0).to(torch.float64)
        st["dim_max"][index] = torch.maximum(st["dim_max"][index], dim_max)
        st["max"][index] = torch.maximum(st["max"][index], dim_max.max())
        sq = (x * x).reshape(-1, x.shape[-1])
        st["tok_sumsq"][index] = torch.maximum(st["tok_sumsq"][index], sq.sum(dim=-1, dtype=torch.float64).max())
        if self.count_activations:
            st["act"][index, 0] += x.sum(dtype=torch.float64)
            st["act"][index, 1] += sq.sum(dtype=torch.float64)
            st["act"][index, 2] += x.numel()
            st["dim_sumsq"][index] += sq.sum(dim=0, dtype=torch.float64)

    def _residual_hook(self, number: int):
        def hook(module, args, output):
            self._record_residual(number, _hidden(output))

        return hook

    def _embedding_hook(self):
        def hook(module, args, kwargs):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self._record_residual(0, x)

        return hook

    def _sublayer_hook(self, number: int, s: int):
        def hook(module, args, output):
            x = _hidden(output).detach().float()
            bias = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
            if bias is not None:  # what the bias-dropout-add adds to the residual
                x = x + bias.detach().float()
            st = self._stats
            st["sub_max"][number, s] = torch.maximum(st["sub_max"][number, s], x.abs().max().to(torch.float64))
            if self.count_activations:
                st["sub"][number, s, 0] += (x * x).sum(dtype=torch.float64)
                st["sub"][number, s, 1] += x.numel()

        return hook

    def _gain_hook(self, number: int, s: int):
        def hook(module, args, output):
            if (number, s) in self._gain_seen:  # once per step: the weights are the same for every micro-batch
                return
            self._gain_seen.add((number, s))
            weight = module.weight.detach().float()
            self._stats["gain"][number, s, 0] += weight.abs().sum(dtype=torch.float64)
            self._stats["gain"][number, s, 1] += weight.numel()

        return hook

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def layer_grad_norms(self) -> torch.Tensor:
        """This rank's share of each layer's squared gradient norm, index 0 the embedding's (call after the
        backward and the grad reduction, before optimizer.step(): the step may rewrite the grad buffer).
        Removes the hooks."""
        self._remove_hooks()
        device = self.device or _device()
        sumsq = torch.zeros(self.num_layers + 1, dtype=torch.float64, device=device)
        owners = [(0, embedding, chunk) for chunk, embedding in self.embeddings] + self.layers
        for index, module, chunk in owners:
            for param in module.parameters():
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
        if self._stats is None:
            raise RuntimeError("Diagnostics.finish() without start()")
        st, n = self._stats, self.num_layers + 1
        have_grads = layer_grads is not None
        if not have_grads:
            layer_grads = torch.zeros(n, dtype=torch.float64, device=st["act"].device)
        sum_keys, max_keys = ("act", "dim_sumsq", "sub", "gain"), ("max", "dim_max", "tok_sumsq", "sub_max")
        summed = torch.cat([st[k].flatten() for k in sum_keys] + [layer_grads.to(st["act"].device, torch.float64)])
        maxed = torch.cat([st[k].flatten() for k in max_keys])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(summed, op=torch.distributed.ReduceOp.SUM)
            torch.distributed.all_reduce(maxed, op=torch.distributed.ReduceOp.MAX)
        summed, maxed = summed.cpu(), maxed.cpu()
        out = {}
        for keys, flat in ((sum_keys, summed), (max_keys, maxed)):
            offset = 0
            for k in keys:
                size = st[k].numel()
                out[k] = flat[offset:offset + size].view(st[k].shape)
                offset += size
            if flat is summed:
                grads = flat[offset:].tolist()
        self._stats = None
        return summarise_layers(out, grads if have_grads else None)

    # ------------------------------------------------------------------ every step

    def observe(self, loss: float | None, grad_norm: float | None) -> dict:
        """Spike check of the step's (rank-agreed) loss and global grad norm: {"spike": msg} or {}."""
        messages = self.spikes.update(loss=loss, grad_norm=grad_norm)
        return {"spike": "; ".join(messages)} if messages else {}


def summarise_layers(t: dict, grads: list | None) -> dict:
    """The world-reduced sums and maxima (tensors named as in Diagnostics.start) as the logged lists."""
    n = t["act"].shape[0]
    record = {key: [] for key in (*LAYER_KEYS, *LAYER_DIM_KEYS)}
    for i in range(n):
        total, total_sq, count = t["act"][i].tolist()
        seen = count > 0
        mean = total / count if seen else 0.0
        record["layer_variance"].append(max(total_sq / count - mean * mean, 0.0) if seen else None)
        record["layer_max_abs"].append(float(t["max"][i]) if seen else None)
        record["layer_max_token_sumsq"].append(float(t["tok_sumsq"][i]) if seen else None)
        record["layer_max_abs_dim"].append(int(torch.argmax(t["dim_max"][i])) if seen else None)
        if seen and total_sq > 0:
            shares = t["dim_sumsq"][i] / total_sq
            top = torch.topk(shares, min(TOP_DIMS, shares.numel()))
            record["layer_top_dims"].append([[int(d), round(float(v), 6)] for v, d in zip(top.values, top.indices)])
        else:
            record["layer_top_dims"].append(None)
        record["layer_grad_norm"].append(math.sqrt(max(grads[i], 0.0)) if grads is not None else None)
        for s, name in enumerate(SUBLAYERS):
            sumsq, sub_count = t["sub"][i, s].tolist()
            record[f"{name}_out_rms"].append(math.sqrt(sumsq / sub_count) if sub_count > 0 else None)
            record[f"{name}_out_max_abs"].append(float(t["sub_max"][i, s]) if sub_count > 0 else None)
            gain, gain_count = t["gain"][i, s].tolist()
            record[f"{name}_out_gain"].append(gain / gain_count if gain_count > 0 else None)
    return record


def _device():
    from periln_megatron.distributed import runtime

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
