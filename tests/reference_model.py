"""Plain-PyTorch GPT with the four norm placements, written from the formulas, not from megatron.

    peri    h = x + N_out(F(N_in(x)))      pre  h = x + F(N(x))
    post    h = N(x + F(x))                output  h = x + N(F(x))
Final norm before the LM head for all but post; optional norm on the embedding output.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class RefNorm(nn.Module):
    def __init__(self, dim: int, kind: str, eps: float):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if kind == "LayerNorm" else None

    def forward(self, x):
        if self.kind == "RMSNorm":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        centred = x - x.mean(-1, keepdim=True)
        return centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight + self.bias


def rope(x, base: float):
    """x: [batch, heads, seq, head_dim]; rotates the two halves of head_dim (GPT-NeoX style)."""
    seq, dim = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


class RefLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        h, hd = c["hidden"], c["hidden"] // c["heads"]
        bias = c["bias"]
        self.q = nn.Linear(h, c["heads"] * hd, bias=bias)
        self.k = nn.Linear(h, c["groups"] * hd, bias=bias)
        self.v = nn.Linear(h, c["groups"] * hd, bias=bias)
        self.o = nn.Linear(c["heads"] * hd, h, bias=bias)
        self.gate = nn.Linear(h, c["ffn"], bias=bias)
        self.up = nn.Linear(h, c["ffn"], bias=bias)
        self.down = nn.Linear(c["ffn"], h, bias=bias)
        norm = lambda: RefNorm(h, c["norm"], c["eps"])  # noqa: E731
        p = c["placement"]
        self.attn_in, self.mlp_in = (norm(), norm()) if p in ("peri", "pre") else (None, None)
        self.attn_out, self.mlp_out = (norm(), norm()) if p in ("peri", "output") else (None, None)
        self.attn_post, self.mlp_post = (norm(), norm()) if p == "post" else (None, None)

    def attention(self, x):
        b, s, _ = x.shape
        nh, ng = self.c["heads"], self.c["groups"]
        hd = self.c["hidden"] // nh
        q = self.q(x).view(b, s, nh, hd).transpose(1, 2)
        k = self.k(x).view(b, s, ng, hd).transpose(1, 2)
        v = self.v(x).view(b, s, ng, hd).transpose(1, 2)
        q, k = rope(q, self.c["rope_base"]), rope(k, self.c["rope_base"])
        k, v = k.repeat_interleave(nh // ng, dim=1), v.repeat_interleave(nh // ng, dim=1)  # GQA
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        causal = torch.ones(s, s, dtype=torch.bool).triu(1)
        probs = scores.masked_fill(causal, float("-inf")).softmax(-1)
        return self.o((probs @ v).transpose(1, 2).reshape(b, s, nh * hd))

    def mlp(self, x):
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))

    def sublayer(self, x, f, n_in, n_out, n_post):
        y = f(n_in(x) if n_in else x)
        y = n_out(y) if n_out else y
        return n_post(x + y) if n_post else x + y

    def forward(self, x):
        x = self.sublayer(x, self.attention, self.attn_in, self.attn_out, self.attn_post)
        return self.sublayer(x, self.mlp, self.mlp_in, self.mlp_out, self.mlp_post)


class RefGPT(nn.Module):
    def __init__(self, placement, vocab, hidden, layers, heads, groups, ffn, norm="RMSNorm", eps=1e-5,
                 embedding_norm=False, bias=False, rope_base=10000.0):
        super().__init__()
        self.c = dict(placement=placement, hidden=hidden, heads=heads, groups=groups, ffn=ffn, norm=norm,
                      eps=eps, bias=bias, rope_base=rope_base)
        self.embed = nn.Embedding(vocab, hidden)
        self.embed_norm = RefNorm(hidden, norm, eps) if embedding_norm else None
        self.layers = nn.ModuleList(RefLayer(self.c) for _ in range(layers))
        self.final_norm = None if placement == "post" else RefNorm(hidden, norm, eps)
        self.head = nn.Linear(hidden, vocab, bias=False)  # untied

    def forward(self, tokens):  # [batch, seq] -> logits [batch, seq, vocab]
        x = self.embed(tokens)
        x = self.embed_norm(x) if self.embed_norm else x
        for layer in self.layers:
            x = layer(x)
        return self.head(self.final_norm(x) if self.final_norm else x)


def _copy_norm(ref: RefNorm | None, sd: dict, prefix: str) -> None:
    if ref is None:
        return
    ref.weight.copy_(sd.pop(prefix + ".weight"))
    if ref.bias is not None:
        ref.bias.copy_(sd.pop(prefix + ".bias"))


@torch.no_grad()
def load_megatron_state(ref: RefGPT, megatron_sd: dict) -> None:
    """Copy a TP=1 megatron GPTModel (local backend) into `ref`; every tensor must be used."""
    sd = {k: v.float().clone() for k, v in megatron_sd.items() if not k.endswith("_extra_state")}
    c = ref.c
    nh, ng, hd, ffn = c["heads"], c["groups"], c["hidden"] // c["heads"], c["ffn"]
    ref.embed.weight.copy_(sd.pop("embedding.word_embeddings.weight"))
    _copy_norm(ref.embed_norm, sd, "embedding.norm")
    for i, layer in enumerate(ref.layers):
        p = f"decoder.layers.{i}."
        for suffix in ("weight", "bias") if c["bias"] else ("weight",):
            # fused QKV: per query group, its nh/ng query heads, then one key head, then one value head
            qkv = sd.pop(p + "self_attention.linear_qkv." + suffix)
            qkv = qkv.view(ng, nh // ng + 2, hd, -1)
            getattr(layer.q, suffix).copy_(qkv[:, : nh // ng].reshape(nh * hd, -1).squeeze(-1))
            getattr(layer.k, suffix).copy_(qkv[:, nh // ng].reshape(ng * hd, -1).squeeze(-1))
            getattr(layer.v, suffix).copy_(qkv[:, nh // ng + 1].reshape(ng * hd, -1).squeeze(-1))
            fc1 = sd.pop(p + "mlp.linear_fc1." + suffix)  # SwiGLU: [gate; up]
            getattr(layer.gate, suffix).copy_(fc1[:ffn])
            getattr(layer.up, suffix).copy_(fc1[ffn:])
            getattr(layer.o, suffix).copy_(sd.pop(p + "self_attention.linear_proj." + suffix))
            getattr(layer.down, suffix).copy_(sd.pop(p + "mlp.linear_fc2." + suffix))
        _copy_norm(layer.attn_in, sd, p + "input_layernorm")
        _copy_norm(layer.mlp_in, sd, p + "pre_mlp_layernorm")
        _copy_norm(layer.attn_out, sd, p + "self_attention.linear_proj.out_norm")
        _copy_norm(layer.mlp_out, sd, p + "mlp.linear_fc2.out_norm")
        _copy_norm(layer.attn_post, sd, p + "self_attn_bda.norm")
        _copy_norm(layer.mlp_post, sd, p + "mlp_bda.norm")
    _copy_norm(ref.final_norm, sd, "decoder.final_layernorm")
    ref.head.weight.copy_(sd.pop("output_layer.weight"))
    if sd:
        raise KeyError(f"megatron tensors not used by the reference: {sorted(sd)}")
