"""Megatron-core layer and block specs for the four norm placements, local or Transformer Engine.

    peri    h = x + Norm_out(F(Norm_in(x)))    for F = attention, then MLP; final norm kept
    pre     h = x + F(Norm(x))                  megatron's standard layer; final norm kept
    post    h = Norm(x + F(x))                  classic Transformer; *no* final norm: the last
                                                layer already ends in a norm, a second would only
                                                renormalise an already normalised vector
    output  h = x + Norm(F(x))                  OLMo2-style, no input norm; final norm kept

Everything is composed through the spec; `TransformerLayer.forward` is megatron's, unchanged:

* the output norm (peri, output) lives *inside* the row-parallel output linear (`linear_proj`,
  `linear_fc2`): `RowParallelLinearWithOutNorm` subclasses the backend's row-parallel linear, adds
  the bias and normalises, and returns `(out, None)`, so the bias-dropout-add sees a bias-free,
  normalised sublayer output;
* the post-LN norm lives in the bias-dropout-add slot (`NormAfterAdd`);
* with `te`, the input norm is fused into `TELayerNormColumnParallelLinear` (QKV and FC1).

Normalisation kind and epsilon are `config.normalization` and `config.layernorm_epsilon`: megatron's
TE modules read them from the config anyway, so a separate argument could silently disagree.
Parameter names: docs/specs.md.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from periln_megatron.config.choices import BACKENDS, FP8_FORMATS, FP8_RECIPES, NORMALIZATIONS, PLACEMENTS  # noqa: F401

try:
    import transformer_engine  # noqa: F401

    HAVE_TE = True
except ImportError:  # CPU-only machines; the `te` backend is then GPU-only
    HAVE_TE = False

try:
    import apex  # noqa: F401

    from megatron.core.fusions.fused_layer_norm import FusedLayerNorm

    HAVE_APEX = True
except ImportError:
    FusedLayerNorm = None
    HAVE_APEX = False

# Oldest Transformer Engine for each recipe, as megatron-core 0.16.1's fp8_utils.get_fp8_recipe needs.
_FP8_RECIPE_MIN_TE = {"delayed": "1.0", "mxfp8": "2.1.0", "tensorwise": "2.2.0.dev0", "blockwise": "2.3.0.dev0"}


class SpecError(ValueError):
    """An invalid placement/backend/normalisation/FP8 combination."""


# ---------------------------------------------------------------------------- modules

class Norm(torch.nn.Module):
    """RMSNorm or LayerNorm (config.normalization) with gains initialised to 1.

    Unlike megatron's torch fallback (WrappedTorchNorm) it works with sequence parallelism: its
    parameters carry `sequence_parallel`, so megatron all-reduces their gradients over TP ranks.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        if config.normalization not in NORMALIZATIONS:
            raise SpecError(f"normalization must be one of {NORMALIZATIONS}, got {config.normalization!r}")
        if config.layernorm_zero_centered_gamma:
            raise SpecError("layernorm_zero_centered_gamma is not supported by the local Norm")
        self.rms = config.normalization == "RMSNorm"
        self.eps = eps
        self.shape = (hidden_size,)
        # where megatron's own layers put their parameters (build the model on the GPU it runs on)
        on_gpu = torch.cuda.is_available() and not config.use_cpu_initialization
        device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=device))
        self.bias = None if self.rms else torch.nn.Parameter(
            torch.zeros(hidden_size, dtype=config.params_dtype, device=device))
        for p in self.parameters():
            p.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms:
            return F.rms_norm(x, self.shape, self.weight, self.eps)
        return F.layer_norm(x, self.shape, self.weight, self.bias, self.eps)


@dataclass
class OutNormSubmodules:
    out_norm: Union[ModuleSpec, type]


class _OutNormMixin:
    """Row-parallel linear whose forward returns (Norm(x W + b), None)."""

    def __init__(self, input_size, output_size, *, out_norm, config, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.out_norm = build_module(out_norm, config=config, hidden_size=output_size, eps=config.layernorm_epsilon)

    def forward(self, x, *args, **kwargs):
        out, bias = super().forward(x, *args, **kwargs)
        if bias is not None:  # the norm must see the sublayer output including its bias
            out = out + bias
        return self.out_norm(out), None


@functools.lru_cache(maxsize=None)
def with_out_norm(linear: type) -> type:
    """`linear` (RowParallelLinear, TERowParallelLinear, ...) extended by an `out_norm` submodule."""
    return type(f"{linear.__name__}WithOutNorm", (_OutNormMixin, linear), {"__module__": __name__})


class RowParallelLinearWithOutNorm:
    """Spec-level factory, like megatron's TENorm: `ModuleSpec(module=RowParallelLinearWithOutNorm,
    params={"linear": <row-parallel class>}, submodules=OutNormSubmodules(out_norm=<norm>))` builds a
    `with_out_norm(linear)`. Keeping the class in `params` lets the spec name TE classes even where
    TE is absent (and so cannot be subclassed)."""

    def __new__(cls, *args, linear: type, submodules: OutNormSubmodules, **kwargs):
        return with_out_norm(linear)(*args, out_norm=submodules.out_norm, **kwargs)


@dataclass
class NormAfterAddSubmodules:
    norm: Union[ModuleSpec, type]


class NormAfterAdd(torch.nn.Module):
    """Post-LN bias-dropout-add for the self_attn_bda/mlp_bda slots: Norm(residual + dropout(F + b)).

    TransformerLayer calls `bda(training, fused)(output_with_bias, residual, prob)`; this module
    answers the first call with megatron's own bias-dropout-add followed by its norm."""

    def __init__(self, config: TransformerConfig, submodules: NormAfterAddSubmodules):
        super().__init__()
        self.norm = build_module(
            submodules.norm, config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
        )

    def forward(self, training: bool, fused: bool):
        bda = get_bias_dropout_add(training, fused)
        return lambda x_with_bias, residual, prob: self.norm(bda(x_with_bias, residual, prob))


# ---------------------------------------------------------------------------- specs

# Separate input norms (local backend) are saved under the names of TE's fused norm+linear.
TE_INPUT_NORM_KEYS = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}

def _provider(backend: str):
    if backend == "te":
        # Importable without TE (its classes are then placeholders): the spec can be inspected
        # anywhere, the model only built where TE is installed.
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    return LocalSpecProvider()


def _local_norm_class(config: TransformerConfig) -> type:
    if HAVE_APEX and config.normalization == "LayerNorm" and not config.layernorm_zero_centered_gamma:
        return FusedLayerNorm
    return Norm


class LocalNorm:
    """Spec-level factory, like megatron's TENorm: the local backend's standalone norm, chosen from
    the config when built (`_local_norm_class`), for specs made without a config."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **kwargs):
        return _local_norm_class(config)(config=config, hidden_size=hidden_size, eps=eps, **kwargs)


def norm_module(config: TransformerConfig | None, backend: str = "local") -> type:
    """The norm class for standalone norms: TENorm; apex FusedLayerNorm for a local LayerNorm when
    apex is present; else `Norm`. (LocalSpecProvider.layer_norm is avoided on purpose: for RMSNorm
    it returns WrappedTorchNorm, which rejects sequence parallelism, and rebinds a module global.)
    Without a config (spec built before the config exists), the local choice is deferred to build
    time (`LocalNorm`); TENorm reads `config.normalization` when built anyway."""
    if backend == "te":
        return _provider("te").layer_norm(rms_norm=config is not None and config.normalization == "RMSNorm")
    if config is None:
        return LocalNorm
    return _local_norm_class(config)


def check_spec_options(config: TransformerConfig | None, placement: str, backend: str) -> None:
    """`config` None: only placement and backend are checked (a spec built without a config)."""
    if placement not in PLACEMENTS:
        raise SpecError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if backend not in BACKENDS:
        raise SpecError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if config is None:
        return
    if config.normalization not in NORMALIZATIONS:
        raise SpecError(f"normalization must be one of {NORMALIZATIONS}, got {config.normalization!r}")
    if config.fp8 and backend != "te":
        raise SpecError(f"fp8={config.fp8!r} needs backend 'te', got backend {backend!r}")


def get_layer_spec(config: TransformerConfig | None, placement: str = "peri", backend: str = "local") -> ModuleSpec:
    """ModuleSpec of one GPT decoder layer (causal self-attention + MLP) for `placement`.

    `config` may be None (a spec made at import time, as Megatron-LM's `--spec` needs: see
    periln_megatron/megatron_lm.py): every norm then reads `config.normalization` when built.
    Not for `post`, whose `NormAfterAdd` is built by TransformerLayer without a config."""
    check_spec_options(config, placement, backend)
    if config is None and placement == "post":
        raise SpecError("placement 'post' needs the config: TransformerLayer builds its bias-dropout-add "
                        "slot (NormAfterAdd) without one")
    provider = _provider(backend)
    norm = norm_module(config, backend)
    has_input_norm = placement in ("peri", "pre")
    fused_input_norm = has_input_norm and provider.fuse_layernorm_and_linear()
    input_linear = (
        provider.column_parallel_layer_norm_linear() if fused_input_norm else provider.column_parallel_linear()
    )
    input_norm = norm if has_input_norm and not fused_input_norm else IdentityOp

    def output_linear():
        if placement in ("peri", "output"):
            return ModuleSpec(
                module=RowParallelLinearWithOutNorm,
                params={"linear": provider.row_parallel_linear()},
                submodules=OutNormSubmodules(out_norm=norm),
            )
        return provider.row_parallel_linear()

    def bda():
        if placement == "post":
            return ModuleSpec(module=NormAfterAdd, params={"config": config}, submodules=NormAfterAddSubmodules(norm))
        return get_bias_dropout_add

    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=input_norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=input_linear,
                    core_attention=provider.core_attention(),
                    linear_proj=output_linear(),
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=bda(),
            pre_mlp_layernorm=input_norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=input_linear, linear_fc2=output_linear())),
            mlp_bda=bda(),
            # Checkpoint keys are the backend-independent TE names (as megatron-core's local spec
            # does), so a local checkpoint (CPU runs, convert_from_hf.py) loads into a te recipe.
            sharded_state_dict_keys_map=TE_INPUT_NORM_KEYS if input_norm is not IdentityOp else {},
        ),
    )


def get_block_spec(
    config: TransformerConfig, placement: str = "peri", backend: str = "local", vp_stage: int | None = None
) -> TransformerBlockSubmodules:
    """Decoder block for this pipeline stage (and virtual stage): the layers, plus the final norm
    before the LM head for every placement but `post`."""
    layer = get_layer_spec(config, placement, backend)
    final_norm = None if placement == "post" else norm_module(config, backend)
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage), layer_norm=final_norm
    )


# ---------------------------------------------------------------------------- FP8

def check_fp8_options(
    *,
    fp8: str | None,
    fp8_recipe: str = "delayed",
    backend: str = "te",
    first_last_layers_bf16: bool = False,
    num_layers_at_start_in_bf16: int = 1,
    num_layers_at_end_in_bf16: int = 1,
    num_layers: int | None = None,
    pipeline_parallel: int = 1,
    fp8_param: bool = False,
    te_version: str | None = None,
) -> None:
    """Raise SpecError naming an FP8 combination that megatron-core 0.16.1 + TE cannot run.

    FP8 runs through megatron's own `fp8_utils.get_fp8_context` (TransformerBlock enters it per
    layer, or once for `delayed`); the layers' GEMMs are TE modules and quantise under it, while the
    norms (TENorm / the LN of TELayerNormColumnParallelLinear), the residual stream and the LM head
    stay in the parameter dtype. `te_version` defaults to the installed TE's, checked only if known.
    """
    if fp8 is None:
        if first_last_layers_bf16:
            raise SpecError("first_last_layers_bf16 only applies with fp8 (fp8 is not set)")
        if fp8_param:
            raise SpecError("fp8_param needs fp8 (fp8 is not set)")
        return
    if backend != "te":
        raise SpecError(f"fp8={fp8!r} needs backend 'te' (Transformer Engine), got backend {backend!r}")
    if fp8 not in FP8_FORMATS:
        raise SpecError(f"fp8 format must be one of {FP8_FORMATS}, got {fp8!r}")
    if fp8_recipe not in FP8_RECIPES:
        raise SpecError(f"fp8_recipe must be one of {FP8_RECIPES}, got {fp8_recipe!r}")
    if first_last_layers_bf16:
        if fp8_recipe == "delayed":
            raise SpecError(
                "first_last_layers_bf16 with fp8_recipe 'delayed' is invalid: delayed scaling wraps the "
                "whole block in one FP8 context; use tensorwise, mxfp8 or blockwise"
            )
        if num_layers is not None:
            per_stage = num_layers // pipeline_parallel
            for name, n in (("num_layers_at_start_in_bf16", num_layers_at_start_in_bf16),
                            ("num_layers_at_end_in_bf16", num_layers_at_end_in_bf16)):
                if not 0 <= n <= per_stage:
                    raise SpecError(f"{name}={n} must be between 0 and the layers per pipeline stage ({per_stage})")
    if te_version is None and HAVE_TE:
        from megatron.core.utils import get_te_version

        te_version = str(get_te_version())
    if te_version is not None:
        from packaging.version import Version

        need = _FP8_RECIPE_MIN_TE[fp8_recipe]
        if Version(te_version) < Version(need):
            raise SpecError(f"fp8_recipe {fp8_recipe!r} needs Transformer Engine >= {need}, found {te_version}")
    if fp8_recipe == "mxfp8" and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 10:
        raise SpecError("fp8_recipe 'mxfp8' needs a Blackwell GPU (compute capability >= 10)")


def check_fp8_config(config: TransformerConfig, backend: str) -> None:
    """check_fp8_options on a TransformerConfig's fields."""
    check_fp8_options(
        fp8=config.fp8,
        fp8_recipe=str(getattr(config.fp8_recipe, "value", config.fp8_recipe)),
        backend=backend,
        first_last_layers_bf16=config.first_last_layers_bf16,
        num_layers_at_start_in_bf16=config.num_layers_at_start_in_bf16,
        num_layers_at_end_in_bf16=config.num_layers_at_end_in_bf16,
        num_layers=config.num_layers,
        pipeline_parallel=config.pipeline_model_parallel_size,
        fp8_param=config.fp8_param,
    )
