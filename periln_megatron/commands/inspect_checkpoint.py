"""Verify every iteration of a checkpoint directory without training.

    python tools/inspect_checkpoint.py CHECKPOINT_DIR
    (or `periln-inspect-checkpoint` instead of `python tools/inspect_checkpoint.py`: the same command)

For each iter_NNNNNNN: the metadata and common state load, every shard file is present and as
long as the metadata says; whether it holds optimizer state (resumable) or weights only; its
recipe's model shape. Says which iteration a run would resume from (the marker's, or with
checkpoint.on_corrupt=previous the newest intact one). Exit status: 0 all intact, 1 some iteration
is damaged, 2 not a checkpoint directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from periln_megatron.config.choices import ON_CORRUPT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint_dir", type=Path)
    args = parser.parse_args(argv)

    from periln_megatron import checkpoint

    root = args.checkpoint_dir
    iterations = checkpoint.saved_iterations(root) if root.is_dir() else []
    if not iterations:
        print(f"inspect_checkpoint: error: {root}: no iter_* directories", file=sys.stderr)
        return 2
    marker = root / checkpoint.MARKER
    print(f"{root}: {len(iterations)} iterations; marker: "
          f"{marker.read_text().strip() if marker.is_file() else 'none'}")
    damaged = 0
    for iteration in iterations:
        directory = checkpoint.iteration_dir(root, iteration)
        try:
            checkpoint.verify_iteration(directory)
        except checkpoint.CheckpointError as e:
            damaged += 1
            print(f"  {directory.name}  DAMAGED  {e}")
            continue
        kind = "resumable" if checkpoint.has_optimizer_state(directory) else "weights only"
        print(f"  {directory.name}  ok  {kind}{_shape(directory)}")
    for policy in ON_CORRUPT:
        try:
            resume = checkpoint.resume_iteration(root, policy, log=lambda msg: None)
            print(f"resume (checkpoint.on_corrupt={policy}): iteration {resume}")
        except checkpoint.CheckpointError as e:
            print(f"resume (checkpoint.on_corrupt={policy}): refused: {e}")
    return 1 if damaged else 0


def _shape(directory: Path) -> str:
    from periln_megatron.config import RecipeError, load_recipe

    try:
        m = load_recipe(directory / "recipe.yaml", check_environment=False).model
    except (RecipeError, OSError):
        return ""
    return f"  ({m.placement}-LN, {m.num_layers} layers, hidden {m.hidden_size})"


if __name__ == "__main__":
    sys.exit(main())
