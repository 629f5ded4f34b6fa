"""A whole model in one process (TP=1, PP=1): for the HF importer and for parity checks."""

from __future__ import annotations

import copy

import torch


def init_single_process(seed: int = 1234) -> None:
    """megatron-core's parallel state at world size 1 (an in-process store: no port, no environment
    variables left behind for the caller's later subprocesses)."""
    from periln_megatron.distributed import runtime

    runtime.initialize(runtime.ParallelLayout(), seed=seed, dist_env=runtime.SINGLE_PROCESS)


def single_process_recipe(recipe):
    r = copy.deepcopy(recipe)
    r.parallel.tp = r.parallel.pp = 1
    r.parallel.vpp = None
    r.parallel.sequence_parallel = False
    r.model.recompute = "none"
    return r


def build_model(recipe, padded_vocab: int, dtype: torch.dtype | None = None, initialize: bool = True):
    """GPTModel for the whole network on the CPU, also on a GPU node (conversion and parity checks
    hold one whole model); parameters in `dtype` (default: the recipe's). The local backend: its
    checkpoint keys are TE's (specs.TE_INPUT_NORM_KEYS)."""
    from periln_megatron.model.build import build_gpt_model
    from periln_megatron.model.build import transformer_config

    r = single_process_recipe(recipe)
    r.model.backend = "local"
    if r.precision.preset == "fp8":  # FP8 is a compute format: the weights are bf16
        r.precision.preset = "bf16"
    config = transformer_config(r, cuda=False, have_te=False, have_apex=False, te_version=None)
    if dtype is not None:
        config.params_dtype = dtype
    config.perform_initialization = initialize
    m = r.model
    model = build_gpt_model(config, placement=m.placement, backend=m.backend, embedding_norm=m.embedding_norm,
                            vocab_size=padded_vocab, max_sequence_length=m.seq_length, rotary_base=m.rotary_base,
                            share_embeddings_and_output_weights=not m.untie_embeddings, pre_process=True,
                            post_process=True)
    return model.to(config.params_dtype)


@torch.no_grad()
def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """[batch, seq] -> [batch, seq, padded vocab] with a causal mask (megatron's default)."""
    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    return model(tokens, position_ids, None)


@torch.no_grad()
def greedy(model, prompt: torch.Tensor, new_tokens: int, vocab: int) -> torch.Tensor:
    """Greedy decoding without a KV cache, restricted to the real (unpadded) vocabulary."""
    tokens = prompt
    for _ in range(new_tokens):
        nxt = logits(model, tokens)[:, -1, :vocab].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
    return tokens
