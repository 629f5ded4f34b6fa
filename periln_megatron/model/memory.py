"""Per-GPU memory of a recipe at its layout, estimated from shapes (`periln-params --memory`).

Structured as Megatron-LM 0.16.1's megatron/training/theoretical_memory_usage.py: weights, gradients
and optimizer state per parameter (the distributed optimizer shards the optimizer state over DP),
activations of all in-flight microbatches of a pipeline stage (TP divides what is tensor-parallel,
SP also the rest), and the loss over the logits on the last stage. Unlike Megatron-LM's constants
(34 bytes * s*b*h per layer, written for a GELU MLP with dropout), the activations are counted
tensor by tensor for this repository's layers (Peri-LN's output norms, SwiGLU, no dropout, RoPE)
and the implementation that runs (`device`):

  gpu   the cluster image: Transformer Engine (flash attention, fused norm+linear, TE's
        cross-entropy only when model.cross_entropy_fusion_impl: te), apex (fused wgrad accumulation, the
        masked-softmax kernel of the local attention), the fused SwiGLU - the fusions
        train.transformer_config_kwargs enables there. The TE terms follow what TE's modules
        keep; tools/gpu_smoke.py checks them against torch.cuda.max_memory_allocated.
  cpu   these machines: no fusions; the SwiGLU keeps its intermediates. Measured here: the
        trainer's peak RSS agrees within 3% (tests/test_efficiency.py).

With the local backend on either device the unfused attention keeps the s x s probabilities and a
local RMSNorm (torch's composite op) keeps fp32 copies of its input and of the normalised output.
A stage's output is freed once sent to the next stage (deallocate_pipeline_outputs, as in
Megatron-LM), so in-flight microbatches hold only their saved activations, counted below.
Only the first and the last pipeline stage are reported: the first holds the most microbatches
and the input embedding, the last the LM head and the loss; the stages between hold less.

Per parameter (grad_reduce_in_fp32, as train.build_optimizer sets): weights 2 bytes (bf16/fp16/fp8
presets) or 4 (fp32); gradients 4 (the DDP buffer); optimizer 12 (fp32 master copy + Adam's two
moments) or 8 for fp32 params (the params are the master copy), divided by DP x CP with the
distributed optimizer. Not counted: the CUDA context, NCCL and cuBLAS workspaces, the caching
allocator's reserve and fragmentation (torch.cuda.max_memory_allocated does not count them
either; nvidia-smi does: keep several GiB of headroom), and transient buffers inside one op.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from periln_megatron.config import Recipe
from periln_megatron.model.param_count import NORMS_PER_SUBLAYER

GIB = 2**30
H100_GIB = 79.6  # an H100 80GB: 81559 MiB


@dataclass
class StageMemory:
    stage: int
    layers: int
    in_flight: float  # microbatches' worth of this stage's layers whose activations are held
    params: int  # parameters this rank holds
    weights: float  # bytes, as the rest
    grads: float
    optimizer: float
    activations: float
    logits: float  # the loss's peak over the logits (last stage)
    recompute: float = 0.0  # full recompute: one group of layers rebuilt during its backward

    @property
    def total(self) -> float:
        # the loss runs before the first recomputed group is rebuilt: never both at once
        return self.weights + self.grads + self.optimizer + self.activations + max(self.logits, self.recompute)


@dataclass
class MemoryEstimate:
    gpus: int
    dp: int
    microbatches: int
    device: str
    stages: list[StageMemory]
    layer_bytes_per_token: float  # one layer's saved activations per token on one rank (TP/SP applied)
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> StageMemory:
        return max(self.stages, key=lambda st: st.total)

    def to_dict(self) -> dict:
        out = {"gpus": self.gpus, "dp": self.dp, "microbatches_per_step": self.microbatches, "device": self.device,
               "layer_bytes_per_token": self.layer_bytes_per_token, "notes": self.notes, "stages": []}
        for st in self.stages:
            out["stages"].append({"stage": st.stage, "layers": st.layers, "in_flight_microbatches": st.in_flight,
                                  "params": st.params, "weights": st.weights, "grads": st.grads,
                                  "optimizer": st.optimizer, "activations": st.activations, "logits": st.logits,
                                  "recompute": st.recompute, "total": st.total})
        out["peak_total"] = self.peak.total
        return out


def norm_bytes(recipe: Recipe) -> float:
    """Bytes per token a standalone norm keeps for its backward, its input included: a local RMSNorm
    is torch's composite op, which keeps its input upcast to fp32 and the fp32 normalised copy; a
    local LayerNorm (native or apex) and TE's norms keep their input (and per-token statistics)."""
    m = recipe.model
    if m.backend == "local" and m.normalization == "RMSNorm":
        return 8 * m.hidden_size
    return (4 if recipe.precision.preset == "fp32" else 2) * m.hidden_size


def layer_activation_terms(recipe: Recipe, device: str = "gpu", have_apex: bool = True) -> list[tuple[str, float, bool]]:
    """(name, bytes per token, tensor-parallel) of what one decoder layer keeps for its backward, for
    one token of one microbatch at TP=1. `tensor-parallel` terms are split over TP ranks; the others
    are full hidden states, split over TP only under sequence parallelism. Measured tensor by tensor
    on CPU with autograd's saved-tensor hooks; the TE terms follow TE's modules."""
    m, prec = recipe.model, recipe.precision.preset
    e = 4 if prec == "fp32" else 2
    h, f = m.hidden_size, m.ffn_size
    head_dim = h // m.num_attention_heads
    kv = head_dim * (m.num_query_groups or m.num_attention_heads)
    cpu = device == "cpu"
    has_in, has_out, post = m.placement in ("peri", "pre"), m.placement in ("peri", "output"), m.placement == "post"
    norm = norm_bytes(recipe)

    terms = []
    for block in ("attention", "MLP"):
        if has_in:
            terms += [(f"{block} input norm", norm, False), (f"{block} input norm output", h * e, False)]
        else:
            terms.append((f"{block} input", h * e, False))
        if block == "attention":
            # V is a strided view of the QKV output: it keeps all of it alive, unless the consumer
            # copies it (TE's attention makes q, k, v contiguous; CPU's half-precision bmm too)
            v_copy = m.backend == "te" or (cpu and prec != "fp32")
            terms += [("V" if v_copy else "QKV output (V is a view)", (kv if v_copy else h + 2 * kv) * e, True),
                      ("rotated Q and K", (h + kv) * e, True),
                      ("attention output", h * e, True)]
            if m.backend == "local" and not recompute_drops_scores(recipe):
                # megatron's unfused DotProductAttention keeps the s x s probabilities
                if prec == "fp32":
                    per = 4
                elif not cpu and have_apex:
                    per = 2  # apex's fused scale-mask-softmax keeps its half-precision output
                else:
                    per = 6  # softmax in fp32, then cast for the AV matmul: both kept
                terms.append(("attention probabilities", m.num_attention_heads * m.seq_length * per, True))
            if m.attention_dropout > 0 and m.backend == "local":
                terms.append(("attention dropout mask", m.num_attention_heads * m.seq_length, True))
        else:
            terms.append(("FC1 output (gate, up)", 2 * f * e, True))
            if cpu:  # unfused SwiGLU: silu(gate) and (up + glu_linear_offset) are new tensors
                terms.append(("SwiGLU intermediates", 2 * f * e, True))
            terms.append(("FC2 input", f * e, True))
        if has_out:
            terms.append((f"{block} output norm", norm, False))
        if post:
            terms.append((f"{block} post-norm (after the add)", norm, False))
        if m.hidden_dropout > 0:
            terms.append((f"{block} dropout mask", h, False))
    return terms


def recompute_drops_scores(recipe: Recipe) -> bool:
    """Selective recompute (megatron's core_attn) recomputes the attention scores instead of keeping them."""
    return recipe.model.recompute == "selective"


def estimate(recipe: Recipe, gpus: int, device: str = "gpu", have_te: bool = True,
             have_apex: bool = True) -> MemoryEstimate:
    """Estimated peak bytes on one rank of each pipeline stage (see the module doc)."""
    m, p, t, prec = recipe.model, recipe.parallel, recipe.train, recipe.precision.preset
    tp, pp, cp, vpp = p.tp, p.pp, p.cp, p.vpp
    dp = gpus // (tp * pp * cp)
    if dp < 1 or gpus % (tp * pp * cp):
        raise ValueError(f"{gpus} GPUs do not hold tp*pp*cp = {tp * pp * cp}")
    microbatches = max(t.global_batch_size // (t.micro_batch_size * dp), 1)
    vocab = recipe.padded_vocab_size()
    h = m.hidden_size
    e = 4 if prec == "fp32" else 2
    cpu = device == "cpu"
    tokens = m.seq_length * t.micro_batch_size / cp  # per microbatch on one rank

    # parameters on one rank (norm gains are replicated over TP, the rest is split)
    head_dim = h // m.num_attention_heads
    kv = head_dim * (m.num_query_groups or m.num_attention_heads)
    norm = h * (2 if m.normalization == "LayerNorm" else 1)
    layer_norms = 2 * NORMS_PER_SUBLAYER[m.placement] * norm
    layer_split = h * (h + 2 * kv) + h * h + 3 * h * m.ffn_size
    per_layer = layer_split / tp + layer_norms
    embedding = vocab * h / tp

    # one layer's saved activations per token on this rank
    terms = layer_activation_terms(recipe, device, have_apex)
    sp_div = tp if p.sequence_parallel else 1
    layer = sum(b / (tp if split else sp_div) for _, b, split in terms)

    param_bytes = 4 if prec == "fp32" else 2
    opt_bytes = (8 if prec == "fp32" else 12) / (dp * cp if p.distributed_optimizer else 1)
    notes = []
    stages = []
    layers_per_stage = m.num_layers // pp
    # TE's kernel writes the gradient into the logits buffer (train.cross_entropy_choice allows it
    # only when asked for, with TE >= 2.18); megatron's native one keeps an fp32 softmax as the unfused.
    te_cross_entropy = (not cpu and have_te and m.cross_entropy_fusion and m.cross_entropy_fusion_impl == "te")
    for stage in sorted({0, pp - 1}):
        first, last = stage == 0, stage == pp - 1
        n = layers_per_stage * per_layer
        if first:
            n += embedding + (norm if m.embedding_norm else 0)
        if last:
            n += 0 if m.placement == "post" else norm
            if m.untie_embeddings or pp > 1:
                n += embedding
        # 1F1B: how many microbatches' activations (of this stage's layers) are held at once
        if vpp:
            warmup = (pp - stage - 1) * 2 + (vpp - 1) * pp
            in_flight = min(warmup + 1, microbatches * vpp) / vpp
        else:
            in_flight = min(pp - stage, microbatches)
        rebuilt = 0.0
        if m.recompute == "full":  # megatron's uniform method: each group of layers keeps only its input
            group = m.recompute_num_layers
            act = in_flight * tokens * layers_per_stage / group * h * e / sp_div
            rebuilt = tokens * group * layer
        else:
            act = in_flight * tokens * layers_per_stage * layer
        act += in_flight * tokens * 8  # token ids (and labels on the last stage), int64
        if m.backend == "local" and not recompute_drops_scores(recipe):
            # megatron's global buffer that the local attention's baddbmm writes into (kept)
            act += t.micro_batch_size * m.num_attention_heads / tp * m.seq_length ** 2 * e
        if first and m.embedding_norm:
            act += in_flight * tokens * norm_bytes(recipe) / sp_div
        logits = 0.0
        if last:  # the final norm (none for post) and the LM head's input
            act += tokens * ((norm_bytes(recipe) if m.placement != "post" else 0) + h * e) / sp_div
            ce_bytes = 2 if te_cross_entropy else (4 if prec == "fp32" else 6)
            logits = tokens * vocab / tp * ce_bytes
            if cpu or not have_apex:  # the LM head's weight gradient is a temporary before the DDP buffer
                logits += embedding * param_bytes
            logits += tokens * h * e  # the LM head's input gradient
        stages.append(StageMemory(stage=stage, layers=layers_per_stage, in_flight=in_flight, params=round(n),
                                  weights=n * param_bytes, grads=n * 4, optimizer=n * opt_bytes,
                                  activations=act, logits=logits, recompute=rebuilt))
    if m.backend == "local" and not cpu:
        notes.append("local backend: unfused attention keeps the s x s scores (the te backend's flash attention does not)")
    if not cpu and not te_cross_entropy and prec != "fp32":
        notes.append("cross-entropy (megatron's, fused or not) keeps an fp32 softmax beside the half-precision logits")
    return MemoryEstimate(gpus=gpus, dp=dp, microbatches=microbatches, device=device, stages=stages,
                          layer_bytes_per_token=layer, notes=notes)


def format_estimate(path: str, recipe: Recipe, est: MemoryEstimate, gpu_gib: float = H100_GIB) -> str:
    p, t = recipe.parallel, recipe.train
    lines = [f"{path}: per-GPU memory estimate on {est.gpus} GPUs ({est.device}): tp={p.tp} pp={p.pp} "
             f"vpp={p.vpp} cp={p.cp} dp={est.dp}, sequence_parallel={p.sequence_parallel}, "
             f"distributed_optimizer={p.distributed_optimizer}, micro batch {t.micro_batch_size} x "
             f"{recipe.model.seq_length} tokens, {est.microbatches} microbatches/step, recompute={recipe.model.recompute}, "
             f"{recipe.precision.preset}, {recipe.model.backend} backend",
             f"  {'GiB':<28}{'weights':>8}{'grads':>8}{'optim':>8}{'activ':>8}{'logits':>8}{'recomp':>8}{'total':>8}"]
    for st in est.stages:
        label = f"stage {st.stage} ({st.layers} layers, {st.in_flight:g} mb)"
        lines.append(f"  {label:<28}" + "".join(f"{v / GIB:8.2f}" for v in (
            st.weights, st.grads, st.optimizer, st.activations, st.logits, st.recompute, st.total))
            + f"   {st.total / GIB / gpu_gib:.0%} of {gpu_gib:g} GiB")
    lines += [f"  note: {n}" for n in est.notes]
    return "\n".join(lines)
