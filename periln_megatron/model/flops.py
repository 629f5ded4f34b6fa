"""Model FLOPs per token and the GPU's peak, for throughput and MFU logging.

Model FLOPs are counted as Megatron-LM 0.16.1 counts them (`num_floating_point_operations` in
megatron/training/training.py, dense GPT branch): only the GEMMs, each done three times (forward,
weight gradient, input gradient) at 2 FLOPs per multiply-add, so per token

    6 * [ L * ( h*(q + 2*kv)          QKV projection (GQA: kv = num_query_groups * head_dim)
              + q*s/2*2               QK^T and (QK^T)V under the causal mask (half of s*s is computed)
              + q*h                   output projection
              + 3*h*ffn )             SwiGLU MLP: gate and up (h -> 2*ffn) and down (ffn -> h)
        + h*V ]                       the output layer (logits), V = the padded vocabulary

with q = num_attention_heads * head_dim (= h here), s = seq_length. Not counted: the input
embedding (a lookup, no GEMM), norms, softmax, rotary, activations, the loss, and activation
recompute (model FLOPs, not hardware FLOPs: a recomputed forward is not useful work).
"""

from __future__ import annotations

import math

from periln_megatron.config import Recipe


def training_flops_per_token(recipe: Recipe, padded_vocab: int | None = None) -> float:
    """Forward + backward model FLOPs per trained token (Megatron-LM's count, see the module doc)."""
    m = recipe.model
    vocab = padded_vocab or recipe.padded_vocab_size()
    h, s = m.hidden_size, m.seq_length
    head_dim = h // m.num_attention_heads
    q = head_dim * m.num_attention_heads
    kv = head_dim * (m.num_query_groups or m.num_attention_heads)
    attention = h * (q + 2 * kv) + q * s / 2 * 2 + q * h
    mlp = 3 * h * m.ffn_size
    return 6.0 * (m.num_layers * (attention + mlp) + h * vocab)


# Dense (no 2:4 sparsity) tensor-core peaks per GPU in TFLOP/s, from NVIDIA's datasheets (the
# sparse figures halved); "fp32" is the non-tensor-core rate. A GPU matches the first row whose
# words all occur in torch.cuda.get_device_name() (upper-cased), e.g. "NVIDIA H100 80GB HBM3".
_H100_SXM = {"fp8": 1979.0, "bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 67.0}
_NVL = {"fp8": 1670.5, "bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}  # H100 NVL, H200 NVL
PEAK_TFLOPS: tuple[tuple[tuple[str, ...], str, dict[str, float]], ...] = (
    (("GB200",), "GB200", {"fp8": 5000.0, "bf16": 2500.0, "fp16": 2500.0, "tf32": 1250.0}),
    (("B200",), "B200", {"fp8": 4500.0, "bf16": 2250.0, "fp16": 2250.0, "tf32": 1125.0}),
    (("GH200",), "GH200", _H100_SXM),
    (("H200", "NVL"), "H200 NVL", _NVL),
    (("H200",), "H200 SXM", _H100_SXM),
    (("H100", "PCIE"), "H100 PCIe", {"fp8": 1513.0, "bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.0}),
    (("H100", "NVL"), "H100 NVL", _NVL),
    (("H100",), "H100 SXM", _H100_SXM),
    (("A100",), "A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (("L40S",), "L40S", {"fp8": 733.0, "bf16": 362.0, "fp16": 362.0, "tf32": 183.0, "fp32": 91.6}),
)


# The MFU a plan assumes when none is measured (periln-ladder plan --mfu): what Megatron-Core dense GPT
# training of this size typically reaches on H100 in BF16 (about 40%); measure yours from the `mfu`
# field of a short run's metrics.jsonl and pass it instead.
ASSUMED_MFU = 0.40
PLAN_GPU = "H100 SXM"  # the GPU a plan prices (periln-ladder plan --gpu)


def gpu_hours(recipe: Recipe, tokens: float, mfu: float = ASSUMED_MFU, gpu: str = PLAN_GPU) -> float:
    """GPU-hours to train `tokens` tokens at `mfu` of the GPU's dense peak at the recipe's precision."""
    peak, why = peak_flops(recipe, gpu)
    if peak is None:
        raise ValueError(why)
    return training_flops_per_token(recipe) * tokens / (mfu * peak) / 3600


def matmul_dtype(preset: str, tf32: bool = False) -> str:
    """The GEMM rate that bounds a precision preset: fp8 runs the layers' GEMMs in FP8 (the LM head
    and attention stay BF16, so FP8 MFU reads low); fp32 runs at the TF32 rate only when
    torch.backends.cuda.matmul.allow_tf32 is on (PyTorch's default is off)."""
    if preset in ("bf16", "fp16", "fp8"):
        return preset
    return "tf32" if tf32 else "fp32"


def lookup_peak(device_name: str, dtype: str) -> tuple[float | None, str]:
    """(peak FLOP/s, description) for a GPU name and matmul dtype from PEAK_TFLOPS; (None, why) if unknown."""
    name = device_name.upper()
    for words, label, peaks in PEAK_TFLOPS:
        if all(w in name for w in words):
            if dtype not in peaks:
                return None, f"{label} has no {dtype} peak in periln_megatron.model.flops.PEAK_TFLOPS"
            return peaks[dtype] * 1e12, f"{label} {dtype} dense peak {peaks[dtype]:g} TFLOP/s"
    return None, f"{device_name!r} is not in periln_megatron.model.flops.PEAK_TFLOPS"


def peak_flops(recipe: Recipe, device_name: str | None, tf32: bool = False) -> tuple[float | None, str]:
    """Peak FLOP/s per GPU for MFU: recipe key logging.peak_tflops if set, else the table's entry for
    `device_name` (None: no GPU) at the recipe's precision; (None, why) when unknown."""
    if recipe.logging.peak_tflops:
        return recipe.logging.peak_tflops * 1e12, f"logging.peak_tflops = {recipe.logging.peak_tflops:g} TFLOP/s"
    if device_name is None:
        return None, "no GPU (set logging.peak_tflops to report MFU)"
    peak, why = lookup_peak(device_name, matmul_dtype(recipe.precision.preset, tf32))
    if peak is None:
        why += "; set logging.peak_tflops (dense TFLOP/s per GPU) to report MFU"
    return peak, why


def this_device_peak(recipe: Recipe) -> tuple[float | None, str]:
    """peak_flops for the GPU this process runs on (CUDA device 0 of its view), or none on CPU."""
    import torch

    if not torch.cuda.is_available():
        return peak_flops(recipe, None)
    return peak_flops(recipe, torch.cuda.get_device_name(), tf32=torch.backends.cuda.matmul.allow_tf32)


def throughput(flops_per_token: float, tokens: int, seconds: float, gpus: int,
               peak: float | None) -> dict[str, float]:
    """The per-step record's throughput fields: tokens/s/GPU, model TFLOP/s/GPU and, with a peak, MFU."""
    per_gpu_tokens = tokens / seconds / gpus
    out = {"tokens_per_s_per_gpu": per_gpu_tokens, "tflops_per_gpu": flops_per_token * per_gpu_tokens / 1e12}
    if peak and math.isfinite(peak):
        out["mfu"] = flops_per_token * per_gpu_tokens / peak
    return out
