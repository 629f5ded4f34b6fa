"""Recipes: the typed schema (recipe.py), its checks (checks.py) and the generated reference (reference.py)."""

from periln_megatron.config.recipe import (  # noqa: F401 - the package's API
    CHOICES, CheckpointConfig, DataConfig, DiagnosticsConfig, LoggingConfig, ModelConfig, OptimConfig, ParallelConfig,
    PrecisionConfig, Recipe, RecipeError, TokenizerConfig, TrainConfig, combine_overrides, load_recipe,
    parse_overrides, validate)
