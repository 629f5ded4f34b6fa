"""Recipes: the typed schema (recipe.py), loading with `base:` and `--set` (load.py), validation
(validate.py, checks.py), the closed choice lists (choices.py) and the generated reference (reference.py)."""

from periln_megatron.config.load import combine_overrides, load_recipe, parse_overrides  # noqa: F401 - the API
from periln_megatron.config.recipe import (  # noqa: F401
    CheckpointConfig, DataConfig, DiagnosticsConfig, LoggingConfig, ModelConfig, OptimConfig, ParallelConfig,
    PrecisionConfig, Recipe, RecipeError, StabilityConfig, TokenizerConfig, TrainConfig)
from periln_megatron.config.validate import CHOICES, validate  # noqa: F401
