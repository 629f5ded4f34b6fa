"""Megatron (TP=1, one process) vs transformers on an exported checkpoint: logits and greedy decoding.

    python tests/workers/hf_parity.py CHECKPOINT_ITER_DIR HF_DIR OUT_JSON
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main():
    iter_dir, hf_dir, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    from transformers import AutoModelForCausalLM

    from periln_megatron import checkpoint
    from periln_megatron.hf import megatron_side
    from periln_megatron.hf.export import load_checkpoint_recipe, true_vocab_size

    recipe = load_checkpoint_recipe(iter_dir)
    recipe.precision.preset = "fp32"  # compare in fp32 (bf16 checkpoints are upcast on load)
    recipe.model.backend = "local"  # on CPU; checkpoint keys are the same for te checkpoints
    megatron_side.init_single_process()
    padded = megatron_side.single_process_recipe(recipe).padded_vocab_size()
    model = megatron_side.build_model(recipe, padded, torch.float32)
    checkpoint.load(iter_dir, [model], None, None)
    model.eval()
    vocab = true_vocab_size(recipe)

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    hf.eval()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (2, 48), generator=g)
    mlog = megatron_side.logits(model, tokens)[..., :vocab]
    with torch.no_grad():
        hlog = hf(tokens).logits
    prompt = tokens[:1, :8]
    mgen = megatron_side.greedy(model, prompt, 20, vocab)
    hgen = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, min_new_tokens=20,
                       do_sample=False, eos_token_id=None, pad_token_id=0)
    result = {"arch": type(hf).__name__, "max_abs_diff": (mlog - hlog).abs().max().item(),
              "logit_scale": mlog.abs().max().item(), "shape": list(hlog.shape),
              "megatron_greedy": mgen[0].tolist(), "hf_greedy": hgen[0].tolist()}
    out.write_text(json.dumps(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
