"""Build a megatron-core GPTModel with a Peri-LN (or pre/post/output) layer spec."""

from __future__ import annotations

import torch

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from periln_megatron.config import Recipe, RecipeError
from periln_megatron.model import specs



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


def fusion_kernels() -> dict[str, bool]:
    """What this process can fuse with: `cuda`; `have_te`, Transformer Engine (fused RoPE, its
    cross-entropy kernel, fused weight-gradient accumulation in its linears); `have_apex`, apex's
    CUDA extensions: fused_weight_gradient_mlp_cuda, which megatron's own linears need for
    gradient-accumulation fusion (the LM head is one under either backend), and the masked-softmax
    kernels of the local backend's attention. Megatron-LM turns all of these on by default."""
    import importlib

    def importable(*names: str) -> bool:
        try:
            for name in names:
                importlib.import_module(name)
            return True
        except Exception:  # noqa: BLE001 - ImportError, or an extension built for another CUDA/torch
            return False

    from periln_megatron.model.specs import HAVE_TE

    return {"cuda": torch.cuda.is_available(), "have_te": HAVE_TE, "te_version": te_version() if HAVE_TE else None,
            "have_apex": importable("fused_weight_gradient_mlp_cuda", "scaled_upper_triang_masked_softmax_cuda",
                                    "scaled_masked_softmax_cuda")}


def te_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("transformer_engine", "transformer-engine", "transformer_engine_torch"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


# TE's fused cross-entropy before 2.18 computes the logits' gradient in the bf16 logits buffer
# (TransformerEngine#3193); Megatron-LM refuses --cross-entropy-fusion-impl te since #5115.
TE_CROSS_ENTROPY_MIN_VERSION = (2, 18)


def _version_tuple(text: str) -> tuple[int, ...]:
    import re

    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


def cross_entropy_choice(recipe: Recipe, *, cuda: bool, have_te: bool, te_version: str | None) -> tuple[bool, str]:
    """(cross_entropy_loss_fusion, cross_entropy_fusion_impl) for TransformerConfig.

    Every choice computes the softmax and the logits' gradient in FP32. megatron-core's native fused
    kernel casts that gradient to bf16 whatever the logits' dtype (fused_cross_entropy.py), so it is
    used only where the logits are bf16; fp32/fp16 runs take the unfused loss."""
    m = recipe.model
    key = "model.cross_entropy_fusion_impl"
    if m.cross_entropy_fusion_impl == "te" and cuda and m.cross_entropy_fusion:
        need = ".".join(map(str, TE_CROSS_ENTROPY_MIN_VERSION))
        if not have_te:
            raise RecipeError(f"{recipe.source}: `{key}` = te needs Transformer Engine >= {need}, which is not "
                              f"importable; use native")
        if te_version is None or _version_tuple(te_version) < TE_CROSS_ENTROPY_MIN_VERSION:
            raise RecipeError(f"{recipe.source}: `{key}` = te needs Transformer Engine >= {need} (FP32 gradient); "
                              f"found {te_version or 'an unknown version'}; use native")
        return True, "te"
    bf16_logits = recipe.precision.preset in ("bf16", "fp8")
    return cuda and m.cross_entropy_fusion and bf16_logits, "native"


def transformer_config_kwargs(recipe: Recipe, *, cuda: bool | None = None, have_te: bool | None = None,
                              have_apex: bool | None = None, te_version: str | None = None) -> dict:
    """TransformerConfig's arguments for `recipe`; capabilities not given are this process's
    (fusion_kernels()), so a test can ask for the config a CUDA run builds without a GPU.

    On CUDA, as Megatron-LM: bias-dropout-add, SwiGLU and persistent-LN fusions; RoPE fusion and
    megatron-core's native fused cross-entropy in bf16 (cross_entropy_choice), both
    placement-independent (rotary acts on q/k before the core attention; the loss on the last
    stage's logits); gradient-accumulation fusion and the masked-softmax kernel with apex. The
    output norm of RowParallelLinearWithOutNorm (peri/output) is a plain autograd module after the
    linear's fused-wgrad GEMM, and the post-LN NormAfterAdd calls megatron's (fused)
    bias-dropout-add first, so every placement runs with every fusion. On CPU every fusion is off."""
    found = fusion_kernels() if None in (cuda, have_te, have_apex) else {}
    cuda = found["cuda"] if cuda is None else cuda
    have_te = found["have_te"] if have_te is None else have_te
    have_apex = found["have_apex"] if have_apex is None else have_apex
    te_version = found.get("te_version") if te_version is None else te_version
    ce_fusion, ce_impl = cross_entropy_choice(recipe, cuda=cuda, have_te=have_te, te_version=te_version)
    m, p, prec = recipe.model, recipe.parallel, recipe.precision
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}.get(prec.preset, torch.float32)
    kwargs = dict(
        num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups, ffn_hidden_size=m.ffn_size,
        normalization=m.normalization, layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
        hidden_dropout=m.hidden_dropout, attention_dropout=m.attention_dropout, init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tp, pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp, context_parallel_size=p.cp,
        sequence_parallel=p.sequence_parallel, pipeline_dtype=dtype, params_dtype=dtype,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=not cuda, gradient_accumulation_fusion=cuda and have_apex,
        bias_dropout_fusion=cuda, bias_activation_fusion=cuda, apply_rope_fusion=cuda and have_te,
        masked_softmax_fusion=cuda and have_apex, persist_layer_norm=cuda,
        cross_entropy_loss_fusion=ce_fusion, cross_entropy_fusion_impl=ce_impl,
        # as Megatron-LM's core_transformer_config_from_args: a stage's output tensor is freed once
        # sent, keeping only its autograd graph (pipeline stages > 1)
        deallocate_pipeline_outputs=True,
    )
    if m.recompute != "none":
        kwargs.update(recompute_granularity=m.recompute)
        if m.recompute == "full":
            kwargs.update(recompute_method="uniform", recompute_num_layers=m.recompute_num_layers)
    if prec.preset == "fp8":
        kwargs.update(fp8=prec.fp8_format, fp8_recipe=prec.fp8_recipe,
                      first_last_layers_bf16=prec.fp8_bf16_first_last_layers > 0,
                      num_layers_at_start_in_bf16=prec.fp8_bf16_first_last_layers,
                      num_layers_at_end_in_bf16=prec.fp8_bf16_first_last_layers)
    return kwargs


def transformer_config(recipe: Recipe, **capabilities):
    """megatron-core's TransformerConfig for `recipe` (capabilities: see transformer_config_kwargs)."""
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(**transformer_config_kwargs(recipe, **capabilities))


def build_model_chunks(recipe: Recipe, config, vocab_size: int) -> list:
    """One GPTModel per virtual pipeline stage of this rank, cast for mixed precision."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.module import Float16Module

    from periln_megatron.model.build import build_gpt_model

    m = recipe.model
    chunks = []
    for vp_stage in range(recipe.parallel.vpp or 1):
        vp = vp_stage if recipe.parallel.vpp else None
        chunk = build_gpt_model(
            config, placement=m.placement, backend=m.backend, embedding_norm=m.embedding_norm,
            vocab_size=vocab_size, max_sequence_length=m.seq_length, rotary_base=m.rotary_base,
            share_embeddings_and_output_weights=not m.untie_embeddings,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp), vp_stage=vp,
        )
        if torch.cuda.is_available():
            chunk.cuda(torch.cuda.current_device())
        if config.bf16 or config.fp16:
            chunk = Float16Module(config, chunk)
        chunks.append(chunk)
    return chunks


def model_flops_per_token(recipe: Recipe, vocab: int) -> float:
    """Training FLOPs per token as Megatron-LM counts them (periln_megatron/model/flops.py)."""
    from periln_megatron.model import flops

    return flops.training_flops_per_token(recipe, vocab)
