"""Whether a checkpoint can be resumed by a recipe: its model shape, checked before anything is built."""

from __future__ import annotations

from periln_megatron.checkpoint.layout import CheckpointError, has_optimizer_state, iteration_dir, resume_iteration

# Recipe keys that decide the tensors a checkpoint holds; everything else (layout, backend,
# precision, schedule, data) may change between a save and a resume.
SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_size", "placement",
              "normalization", "embedding_norm", "untie_embeddings")


def shape_differences(saved, new) -> list[str]:
    """`model.key: saved -> new` for each tensor-shaping key that differs between two recipes."""
    diffs = [f"model.{k}: {getattr(saved.model, k)} -> {getattr(new.model, k)}"
             for k in SHAPE_KEYS if getattr(saved.model, k) != getattr(new.model, k)]
    if saved.padded_vocab_size() != new.padded_vocab_size():
        diffs.append(f"padded vocabulary: {saved.padded_vocab_size()} -> {new.padded_vocab_size()}")
    return diffs


def check_resumable(recipe, world_size: int | None = None, log=print) -> int | None:
    """Before anything is written: the iteration a run will resume from (verified, see
    `resume_iteration`), that its saved recipe has the same model shape, and the same schedule unless
    checkpoint.on_schedule_change says which wins (periln_megatron/training/schedule.py; with `checkpoint` the
    recipe is rewritten in place with the checkpoint's values). Raises CheckpointError."""
    from periln_megatron.training import schedule
    from periln_megatron.config import RecipeError, load_recipe

    root = recipe.checkpoint.dir
    iteration = resume_iteration(root, recipe.checkpoint.on_corrupt, log=lambda msg: None)
    if iteration is None:
        return None
    saved_yaml = iteration_dir(root, iteration) / "recipe.yaml"
    if not saved_yaml.is_file():
        return iteration
    try:
        saved = load_recipe(saved_yaml, check_environment=False)
    except RecipeError:
        return iteration  # written by an older version: the tensor load itself names any mismatch
    diffs = shape_differences(saved, recipe)
    if diffs:
        raise CheckpointError(f"{iteration_dir(root, iteration)} holds a different model ({'; '.join(diffs)}); "
                              f"use another checkpoint.dir, or checkpoint.load for initial weights of the same shape")
    if has_optimizer_state(iteration_dir(root, iteration)):
        schedule.reconcile(saved, recipe, iteration_dir(root, iteration), world_size, log=log)
    return iteration
