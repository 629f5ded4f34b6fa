"""Export a megatron-core torch_dist checkpoint (any TP/PP layout) to a Hugging Face model directory.

    python tools/convert_to_hf.py CHECKPOINT_DIR OUTPUT_DIR [--dtype bf16] [--iteration N]
    (or `periln-convert-to-hf` instead of `python tools/convert_to_hf.py`: the same command)

CHECKPOINT_DIR is a run's checkpoint root (the newest iteration, or --iteration N, is exported)
or one iter_XXXXXXX directory; the recipe.yaml saved beside the weights gives the model's shape.
Peri-LN (RMSNorm) becomes HyperCLOVAX (use_post_norm: true), Pre-LN (RMSNorm) becomes Llama;
other placements, LayerNorm and the embedding norm are refused (no stock architecture computes
them). Output: safetensors (sharded, with an index, above --max-shard-size), config.json,
generation_config.json (the tokenizer's bos/eos ids), the tokenizer (SentencePiece -> fast
tokenizer.json; TikTokenizer .tiktoken/.json -> byte-level BPE tokenizer.json; HF carried over),
megatron_source.json, and a README.md model card: architecture, norm placement and parameter count,
tokenizer and training tokens, the recipe (YAML), the last losses and diagnostics (residual variance
and max |activation| at the last layer) up to the exported iteration from the run's metrics.jsonl
(found beside the checkpoint, in the recipe's logging.run_dir or checkpoint.dir, or --metrics;
otherwise the card says they are unavailable), the periln-megatron version and this command.
Runs in one CPU process, tensor by tensor; the output appears only when complete: it is written
into a hidden sibling and renamed into place. OUTPUT_DIR must be new, empty or an earlier export
(.periln-export.json); --overwrite replaces only such an export, and an output that is, holds or
lies inside the exported run is always refused (docs/hf.md). Errors are one line (exit 2), Ctrl-C
exits 130 leaving nothing; PERILN_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from periln_megatron.config.choices import HF_DTYPES


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint_dir", type=Path, help="checkpoint root (with latest_checkpointed_iteration.txt) or an iter_* directory")
    parser.add_argument("output_dir", type=Path, help="HF model directory to create (written to a temporary sibling, then renamed)")
    parser.add_argument("--iteration", type=int, help="iteration to export (default: the marker's, i.e. the newest)")
    parser.add_argument("--dtype", choices=HF_DTYPES,
                        help="weights' dtype (default: the training dtype: fp32 -> fp32, bf16/fp8 -> bf16, fp16 -> fp16)")
    parser.add_argument("--max-shard-size", default="2GB", help="largest safetensors file, e.g. 2GB, 500MB, 4GiB (default 2GB)")
    parser.add_argument("--tokenizer", help="tokenizer file/dir to use instead of the recipe's tokenizer.model (e.g. moved since training)")
    parser.add_argument("--skip-tokenizer", action="store_true", help="write no tokenizer files")
    parser.add_argument("--metrics", type=Path, help="the run's metrics.jsonl (or its run dir) for the model card, "
                        "when it is neither beside the checkpoint nor where the recipe's logging.run_dir/checkpoint.dir say")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it holds an earlier export (never other files, never the run)")
    parser.add_argument("--quiet", action="store_true", help="no per-tensor progress")
    args = parser.parse_args(argv)
    command = list(sys.argv) if argv is None else ["periln-convert-to-hf", *argv]  # recorded in the model card

    from periln_megatron.hf import run_tool
    from periln_megatron.hf.export import convert_to_hf
    from periln_megatron.hf.safetensors_io import parse_size

    return run_tool("convert_to_hf", args.quiet, lambda log: convert_to_hf(
        args.checkpoint_dir, args.output_dir, iteration=args.iteration, dtype=args.dtype,
        max_shard_size=parse_size(args.max_shard_size), tokenizer=args.tokenizer,
        skip_tokenizer=args.skip_tokenizer, overwrite=args.overwrite, metrics=args.metrics, command=command,
        log=log))


if __name__ == "__main__":
    sys.exit(main())
