"""Parameter counts of a recipe's model, computed from its shapes (no model is built)."""

from __future__ import annotations

from periln_megatron.config import Recipe

# Norms per layer for each placement: (attention side, MLP side).
NORMS_PER_SUBLAYER = {"peri": 2, "pre": 1, "post": 1, "output": 1}


def count_parameters(recipe: Recipe, padded_vocab: int | None = None) -> dict:
    m = recipe.model
    vocab = padded_vocab or recipe.padded_vocab_size()
    h, heads = m.hidden_size, m.num_attention_heads
    head_dim = h // heads
    groups = m.num_query_groups or heads
    norm = h * (2 if m.normalization == "LayerNorm" else 1)
    attention = h * (heads + 2 * groups) * head_dim + heads * head_dim * h
    mlp = 3 * h * m.ffn_size  # SwiGLU: gate, up, down
    per_layer = attention + mlp + 2 * NORMS_PER_SUBLAYER[m.placement] * norm
    final_norm = 0 if m.placement == "post" else norm
    embedding = vocab * h
    non_embedding = m.num_layers * per_layer + final_norm + (norm if m.embedding_norm else 0)
    total = non_embedding + embedding * (2 if m.untie_embeddings else 1)
    return {"total": total, "non_embedding": non_embedding, "embedding": embedding,
            "per_layer": per_layer, "padded_vocab": vocab}
