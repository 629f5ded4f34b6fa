"""The slots a te layer spec must fill, checked without Transformer Engine (its megatron wrappers
import here as placeholders); and the mark of the tests that need TE on a GPU."""

import pytest
import torch

from periln_megatron.model import specs


def needs_gpu(test):
    """`-m gpu` selects it (tools/gpu_smoke.py); without a GPU it is skipped, saying why."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    return pytest.mark.gpu(skip(test))


def needs_te_gpu(test):
    skip = pytest.mark.skipif(not (specs.HAVE_TE and torch.cuda.is_available()),
                              reason="needs Transformer Engine and a CUDA GPU")
    return pytest.mark.gpu(skip(test))


def assert_te_layer_slots(layer, placement: str) -> None:
    """`layer` is a te layer spec's TransformerLayerSubmodules for `placement`."""
    from megatron.core.extensions import transformer_engine as te_ext
    from megatron.core.transformer.identity_op import IdentityOp

    attn, mlp = layer.self_attention.submodules, layer.mlp.submodules
    assert attn.core_attention is te_ext.TEDotProductAttention
    assert layer.input_layernorm is IdentityOp and layer.pre_mlp_layernorm is IdentityOp
    fused = te_ext.TELayerNormColumnParallelLinear if placement in ("peri", "pre") else te_ext.TEColumnParallelLinear
    assert attn.linear_qkv is fused and mlp.linear_fc1 is fused, placement
    for out in (attn.linear_proj, mlp.linear_fc2):
        if placement in ("peri", "output"):
            assert out.module is specs.RowParallelLinearWithOutNorm
            assert out.params["linear"] is te_ext.TERowParallelLinear
            assert out.submodules.out_norm is te_ext.TENorm
        else:
            assert out is te_ext.TERowParallelLinear
