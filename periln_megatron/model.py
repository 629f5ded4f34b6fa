"""Build a megatron-core GPTModel with a Peri-LN (or pre/post/output) layer spec."""

from __future__ import annotations

import torch

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from periln_megatron import specs

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


def add_embedding_norm(model: GPTModel, config: TransformerConfig, backend: str = "local") -> None:
    """Normalise the embedding output (`embedding.norm`), as the Peri-LN paper allows.

    A forward hook on megatron's LanguageModelEmbedding, so its output (already scattered to the
    sequence-parallel region under SP, and after embedding dropout) goes through the norm; the
    norm is per token, and its parameters carry `sequence_parallel` like every other norm."""
    embedding = model.embedding
    embedding.norm = build_module(
        specs.norm_module(config, backend), config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
    )
    embedding.register_forward_hook(lambda module, args, output: module.norm(output))


def build_gpt_model(
    config: TransformerConfig,
    *,
    placement: str,
    backend: str,
    embedding_norm: bool,
    vocab_size: int,
    max_sequence_length: int,
    position_embedding_type="rope",
    rotary_base=10000,
    share_embeddings_and_output_weights=False,
    pre_process=None,
    post_process=None,
    vp_stage=None,
) -> GPTModel:
    """One model chunk for this pipeline (and virtual pipeline) stage."""
    specs.check_spec_options(config, placement, backend)
    specs.check_fp8_config(config, backend)
    if backend == "te" and not specs.HAVE_TE:
        raise specs.SpecError("backend 'te' needs Transformer Engine, which is not installed")
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    model = GPTModel(
        config=config,
        transformer_layer_spec=specs.get_block_spec(config, placement, backend, vp_stage=vp_stage),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
        position_embedding_type=position_embedding_type,
        rotary_base=rotary_base,
        vp_stage=vp_stage,
    )
    if embedding_norm and pre_process:
        add_embedding_norm(model, config, backend)
    return model
