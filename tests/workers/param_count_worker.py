"""Builds each tiny recipe variant's real model (TP=1) and prints its parameter count next to ours."""

import json
import sys

from periln_megatron.distributed import runtime
from periln_megatron.config import load_recipe
from periln_megatron.model.param_count import count_parameters


def main():
    runtime.initialize()
    from periln_megatron.model.build import build_model_chunks, transformer_config

    for overrides in json.loads(sys.argv[1]):
        recipe = load_recipe("recipes/tiny/peri_ln.yaml", overrides)
        chunks = build_model_chunks(recipe, transformer_config(recipe), recipe.padded_vocab_size())
        built = sum(p.numel() for chunk in chunks for p in chunk.parameters())
        print("COUNT " + json.dumps({"overrides": overrides, "built": built,
                                     "counted": count_parameters(recipe)["total"]}), flush=True)
    runtime.shutdown()


if __name__ == "__main__":
    main()
