"""TransformerConfig from keyword arguments for tests that build layers directly (the package builds
its configs from recipes: periln_megatron.model.build.transformer_config)."""

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

# Fusions whose kernels need CUDA (or apex); turned off when CUDA is absent.
_CPU_OFF = ("gradient_accumulation_fusion", "bias_dropout_fusion", "apply_rope_fusion",
            "masked_softmax_fusion", "persist_layer_norm", "bias_activation_fusion")


def transformer_config(**kwargs) -> TransformerConfig:
    """TransformerConfig with Llama-style defaults (RMSNorm, SwiGLU, no linear biases, no dropout)
    and, without CUDA, CPU initialisation and every CUDA-only fusion off."""
    kwargs.setdefault("normalization", "RMSNorm")
    kwargs.setdefault("gated_linear_unit", True)
    kwargs.setdefault("activation_func", torch.nn.functional.silu)
    kwargs.setdefault("add_bias_linear", False)
    kwargs.setdefault("hidden_dropout", 0.0)
    kwargs.setdefault("attention_dropout", 0.0)
    if not torch.cuda.is_available():
        kwargs["use_cpu_initialization"] = True
        for flag in _CPU_OFF:
            kwargs[flag] = False
    return TransformerConfig(**kwargs)
