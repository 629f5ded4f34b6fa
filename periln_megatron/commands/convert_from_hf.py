"""Import a Hugging Face HyperCLOVAX (use_post_norm: true) or Llama model as a megatron-core checkpoint.

    python tools/convert_from_hf.py HF_DIR CHECKPOINT_DIR [--recipe-out FILE]
    (or `periln-convert-from-hf` instead of `python tools/convert_from_hf.py`: the same command)

Writes CHECKPOINT_DIR/iter_0000000 (torch_dist, loadable under any TP/PP), its recipe.yaml and
CHECKPOINT_DIR/latest_checkpointed_iteration.txt. The recipe's model section comes from
config.json, its tokenizer section points at HF_DIR (HuggingFaceTokenizer) and checkpoint.load at
the new iteration, so a run started from it (after setting data.prefixes) begins from these
weights; or resume from CHECKPOINT_DIR. Models we cannot represent exactly are refused: MuP
multipliers other than 1 (attention_multiplier other than head_dim**-0.5), biases, RoPE scaling,
activations other than SiLU. Runs in one CPU process (a world-size-1 gloo group).

Nothing is lost: CHECKPOINT_DIR must be new or empty. --overwrite lets it hold other files and
replaces an iter_0000000 (and a --recipe-out file) that an earlier convert_from_hf wrote, but a
directory with another run's checkpoints (any other iter_*, a marker naming another iteration, an
iter_0000000 not written by this tool) is always refused: convert into a new directory instead.
The checkpoint is written under a hidden temporary name and renamed into place when complete,
under a lock: of two conversions into one directory the second to finish refuses. Errors are one
line (exit 2), Ctrl-C exits 130 leaving nothing; PERILN_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_dir", type=Path, help="HF model directory (config.json + safetensors)")
    parser.add_argument("checkpoint_dir", type=Path, help="checkpoint root to create (iter_0000000 goes inside)")
    parser.add_argument("--recipe-out", type=Path, help="also write the recipe here")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty CHECKPOINT_DIR, replacing an earlier conversion's iter_0000000 "
                             "and --recipe-out (never another run's checkpoints)")
    parser.add_argument("--quiet", action="store_true", help="no per-tensor progress")
    args = parser.parse_args(argv)

    from periln_megatron.hf import run_tool
    from periln_megatron.hf.importer import convert_from_hf

    try:
        return run_tool("convert_from_hf", args.quiet, lambda log: convert_from_hf(
            args.hf_dir, args.checkpoint_dir, args.recipe_out, args.overwrite, log),
            errors=(ValueError, KeyError, RuntimeError, OSError))
    finally:
        if "periln_megatron.distributed.runtime" in sys.modules:  # megatron was started (not after an early refusal)
            sys.modules["periln_megatron.distributed.runtime"].shutdown()


if __name__ == "__main__":
    sys.exit(main())
