"""Megatron <-> Hugging Face: which architecture, names, tensor layouts and config.json.

    Peri-LN (RMSNorm)  ->  HyperCLOVAX (use_post_norm: true, all MuP multipliers neutral)
    Pre-LN  (RMSNorm)  ->  Llama

Per layer (megatron name under `decoder.layers.{i}.`  <->  HF name under `model.layers.{i}.`):
    input_layernorm.weight                       input_layernorm.weight
    self_attention.linear_qkv.weight             self_attn.{q,k,v}_proj.weight   (fused, below)
    self_attention.linear_proj.weight            self_attn.o_proj.weight
    self_attention.linear_proj.out_norm.weight   post_norm1.weight               (Peri-LN only)
    pre_mlp_layernorm.weight                     post_attention_layernorm.weight
    mlp.linear_fc1.weight                        mlp.{gate,up}_proj.weight       (fused, below)
    mlp.linear_fc2.weight                        mlp.down_proj.weight
    mlp.linear_fc2.out_norm.weight               post_norm2.weight               (Peri-LN only)
With Transformer Engine the input norms live in the fused linears (`linear_qkv.layer_norm_weight`,
`linear_fc1.layer_norm_weight`). Outside the layers: embedding.word_embeddings.weight <->
model.embed_tokens.weight, decoder.final_layernorm.weight <-> model.norm.weight,
output_layer.weight <-> lm_head.weight (absent when the embeddings are tied).

Fused QKV: rows grouped by query group, each group [its q heads, one k head, one v head]
(head_dim rows each); TP splits whole groups, so the global tensor has this order for any TP.
Fused FC1 (SwiGLU): the global tensor is [gate; up] (megatron saves the two halves as separately
sharded pieces of one tensor), and megatron computes silu(gate) * up like HF's LlamaMLP.
RoPE: megatron's rotary_interleaved=False rotates halves, i.e. HF's rotate_half.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRESET_DTYPE = {"fp32": "fp32", "bf16": "bf16", "fp8": "bf16", "fp16": "fp16"}
HF_DTYPE_NAME = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class UnsupportedModelError(ValueError):
    """A model with no faithful stock-transformers equivalent (or one we do not convert)."""


@dataclass
class Shape:
    num_layers: int
    hidden: int
    heads: int
    groups: int
    ffn: int
    vocab: int  # the real (unpadded) vocabulary
    tied: bool
    placement: str
    eps: float
    rotary_base: float
    seq_length: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def arch_for(model) -> str:
    """The HF model_type a recipe's model section exports to, or UnsupportedModelError saying why."""
    problems = []
    if model.normalization != "RMSNorm":
        problems.append(f"normalization={model.normalization}: HyperCLOVAX and Llama only have RMSNorm "
                        "(a LayerNorm model would need a custom architecture with mean-centring norms and biases)")
    if model.embedding_norm:
        problems.append("embedding_norm=true: no stock architecture normalises the embedding output "
                        "(it would need a norm between embed_tokens and the first layer)")
    if model.placement == "post":
        problems.append("placement=post (Post-LN, h = Norm(x + F(x)), no final norm): no stock decoder-only "
                        "architecture in transformers computes this; it would need a custom modeling file")
    elif model.placement == "output":
        problems.append("placement=output (h = x + Norm(F(x)), no input norms): HyperCLOVAX always applies "
                        "input norms; exporting would need an architecture with post-norms only (e.g. OLMo2's, "
                        "which also adds q/k norms)")
    elif model.placement not in ("peri", "pre"):
        problems.append(f"placement={model.placement} is unknown")
    if problems:
        raise UnsupportedModelError("cannot export faithfully to a stock transformers architecture: "
                                    + "; ".join(problems))
    return "hyperclovax" if model.placement == "peri" else "llama"


def shape_from_recipe(recipe, vocab: int) -> Shape:
    m = recipe.model
    return Shape(num_layers=m.num_layers, hidden=m.hidden_size, heads=m.num_attention_heads,
                 groups=m.num_query_groups or m.num_attention_heads, ffn=m.ffn_size, vocab=vocab,
                 tied=not m.untie_embeddings, placement=m.placement, eps=m.norm_epsilon,
                 rotary_base=m.rotary_base, seq_length=m.seq_length)


# ----------------------------------------------------------------------------- tensor layouts

def split_qkv(w: torch.Tensor, s: Shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    per = s.heads // s.groups
    w = w.reshape(s.groups, per + 2, s.head_dim, -1)
    q = w[:, :per].reshape(s.heads * s.head_dim, -1)
    k = w[:, per].reshape(s.groups * s.head_dim, -1)
    v = w[:, per + 1].reshape(s.groups * s.head_dim, -1)
    return q.contiguous(), k.contiguous(), v.contiguous()


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: Shape) -> torch.Tensor:
    per = s.heads // s.groups
    cols = q.shape[-1]
    q = q.reshape(s.groups, per, s.head_dim, cols)
    k = k.reshape(s.groups, 1, s.head_dim, cols)
    v = v.reshape(s.groups, 1, s.head_dim, cols)
    return torch.cat([q, k, v], dim=1).reshape(-1, cols)


def layer_names(placement: str) -> list[tuple[str, str]]:
    """(megatron suffix, hf suffix) for the one-to-one tensors of a layer."""
    names = [("input_layernorm.weight", "input_layernorm.weight"),
             ("self_attention.linear_proj.weight", "self_attn.o_proj.weight"),
             ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
             ("mlp.linear_fc2.weight", "mlp.down_proj.weight")]
    if placement == "peri":
        names += [("self_attention.linear_proj.out_norm.weight", "post_norm1.weight"),
                  ("mlp.linear_fc2.out_norm.weight", "post_norm2.weight")]
    return names


TE_NORM_NAMES = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
                 "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}


# ----------------------------------------------------------------------------- config.json

def hf_config(arch: str, s: Shape, dtype: torch.dtype, special_ids: dict) -> dict:
    config = {
        "architectures": ["HyperCLOVAXForCausalLM" if arch == "hyperclovax" else "LlamaForCausalLM"],
        "model_type": arch,
        "vocab_size": s.vocab,
        "hidden_size": s.hidden,
        "intermediate_size": s.ffn,
        "num_hidden_layers": s.num_layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.groups,
        "head_dim": s.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": s.seq_length,
        "rms_norm_eps": s.eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(s.rotary_base)},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": s.tied,
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": HF_DTYPE_NAME[dtype],
        **special_ids,
    }
    if arch == "hyperclovax":
        config.update(use_post_norm=True, embedding_multiplier=1.0, residual_multiplier=1.0,
                      logits_scaling=1.0, attention_multiplier=s.head_dim ** -0.5)
    return config


def shape_from_hf_config(config: dict, source: str = "config.json") -> Shape:
    """The megatron model a HF config describes, or UnsupportedModelError naming every obstacle."""
    mt = config.get("model_type")
    problems = []
    if mt not in ("hyperclovax", "llama"):
        raise UnsupportedModelError(f"{source}: model_type={mt!r}; only 'hyperclovax' (use_post_norm: true) "
                                    "and 'llama' can be imported")
    heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // heads
    if mt == "hyperclovax":
        if not config.get("use_post_norm", True):
            problems.append("use_post_norm=false (Pre-LN HyperCLOVAX): convert it as a Llama model")
        for key in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
            if float(config.get(key, 1.0)) != 1.0:
                problems.append(f"{key}={config[key]} (MuP scaling; megatron-core's GPT has no such multiplier, only 1.0 is supported)")
        am = config.get("attention_multiplier")
        if am is not None and abs(float(am) - head_dim ** -0.5) > 1e-6 * head_dim ** -0.5:
            problems.append(f"attention_multiplier={am} (only head_dim**-0.5 = {head_dim ** -0.5:.6g}, "
                            "standard scaled dot-product attention, is supported)")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            problems.append(f"{key}=true (biases are not supported: the recipe's linears have none)")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config['hidden_act']!r} (only silu, i.e. SwiGLU)")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        problems.append(f"rope scaling type {rope_type!r} (only unscaled RoPE is implemented)")
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        problems.append(f"partial_rotary_factor={rope['partial_rotary_factor']} (only full rotary)")
    if head_dim * heads != hidden:
        problems.append(f"head_dim={head_dim} with {heads} heads != hidden_size={hidden} (megatron's recipe "
                        "derives head_dim = hidden_size / num_attention_heads)")
    if problems:
        raise UnsupportedModelError(f"{source}: cannot import this {mt} model: " + "; ".join(problems))
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    return Shape(num_layers=config["num_hidden_layers"], hidden=hidden, heads=heads,
                 groups=config.get("num_key_value_heads") or heads, ffn=config["intermediate_size"],
                 vocab=config["vocab_size"], tied=bool(config.get("tie_word_embeddings", False)),
                 placement="peri" if mt == "hyperclovax" else "pre", eps=float(config.get("rms_norm_eps", 1e-6)),
                 rotary_base=theta, seq_length=config.get("max_position_embeddings", 2048))


ARCH_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps",
             "rope_parameters", "attention_bias", "mlp_bias", "tie_word_embeddings", "use_post_norm",
             "embedding_multiplier", "residual_multiplier", "logits_scaling", "attention_multiplier")
