"""Value checks of a recipe that its types do not express: numbers (finite, in range) and the data
section's form. config.validate calls them with its `fail(key, message)`, which raises RecipeError
naming the recipe file and the key."""

from __future__ import annotations

import dataclasses
import math
import re
import typing


def _get(recipe, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(recipe, section), key)


# Ranges of numeric keys beyond the general rule (every float finite, every int >= 0); null skips.
RANGES = {
    "model.norm_epsilon": (lambda v: v > 0, "> 0"),
    "model.init_method_std": (lambda v: v > 0, "> 0"),
    "model.hidden_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "model.attention_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "model.num_query_groups": (lambda v: v >= 1, ">= 1"),
    "model.ffn_hidden_size": (lambda v: v >= 1, ">= 1"),
    "model.vocab_size": (lambda v: v >= 1, ">= 1"),
    "model.rotary_base": (lambda v: v >= 1, ">= 1"),
    "model.make_vocab_size_divisible_by": (lambda v: v >= 1, ">= 1"),
    "model.recompute_num_layers": (lambda v: v >= 1, ">= 1"),
    "precision.initial_loss_scale": (lambda v: v > 0, "> 0"),
    "precision.min_loss_scale": (lambda v: v > 0, "> 0"),
    "precision.loss_scale_window": (lambda v: v >= 1, ">= 1"),
    "precision.hysteresis": (lambda v: v >= 1, ">= 1"),
    "optim.lr": (lambda v: v >= 0, ">= 0"),
    "optim.weight_decay": (lambda v: v >= 0, ">= 0"),
    "optim.adam_beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optim.adam_beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optim.adam_eps": (lambda v: v > 0, "> 0"),
    "optim.clip_grad": (lambda v: v >= 0, ">= 0 (0: no clipping)"),
    "tokenizer.vocab_size": (lambda v: v >= 1, ">= 1"),
    "diagnostics.spike_window": (lambda v: v >= 1, ">= 1"),
    "diagnostics.spike_factor": (lambda v: v > 0, "> 0"),
    "stability.window": (lambda v: v >= 2, ">= 2"),
    "stability.min_history": (lambda v: v >= 2, ">= 2"),
    "stability.zscore": (lambda v: v > 0, "> 0"),
    "stability.ratio": (lambda v: v > 1, "> 1"),
    "stability.lr_factor": (lambda v: v > 0, "> 0"),
    "stability.max_lost_fraction": (lambda v: 0 < v <= 1, "in (0, 1]"),
}

_SPLIT_PART = re.compile(r"\s*(\d+\.?\d*|\.\d+)\s*")


def _numeric_keys(recipe):
    """(dotted key, value, float or int) of every number-typed key of the recipe's sections."""
    for section in dataclasses.fields(recipe):
        value = getattr(recipe, section.name)
        if not dataclasses.is_dataclass(value):
            continue
        for name, hint in typing.get_type_hints(type(value)).items():
            kinds = {a for a in (typing.get_args(hint) or (hint,)) if a in (int, float)}
            if kinds:
                yield f"{section.name}.{name}", getattr(value, name), kinds.pop()


def check_numbers(recipe, fail) -> None:
    """nan/inf nowhere (a step at lr inf, a loss scale of nan); no negative count, interval or size."""
    for key, value, kind in _numeric_keys(recipe):
        if value is None:
            continue
        if kind is float and not math.isfinite(value):
            fail(key, f"must be a finite number, got {value}")
        if kind is int and value < 0:
            fail(key, f"must be >= 0, got {value}")
    for key, (ok, text) in RANGES.items():
        value = _get(recipe, key)
        if value is not None and not ok(value):
            fail(key, f"must be {text}, got {value}")


def split_weights(split: str) -> list[float] | None:
    """'98,2,0' -> [98.0, 2.0, 0.0] (1 to 3 non-negative numbers, ',' or '/' between); None if malformed."""
    parts = re.split(r"[,/]", split)
    if not 1 <= len(parts) <= 3 or not all(_SPLIT_PART.fullmatch(x) for x in parts):
        return None
    return [float(x) for x in parts] + [0.0] * (3 - len(parts))


def check_data(recipe, fail) -> list[str]:
    """data.split and data.prefixes' form; returns the prefixes' paths."""
    from periln_megatron.data.indexed import strip_data_suffix

    d = recipe.data
    weights = split_weights(d.split)
    if weights is None:
        fail("data.split", f"= {d.split!r} must be 1 to 3 non-negative numbers separated by commas (the train, "
             "valid and test weights), e.g. 98,2,0")
    if weights[0] <= 0:
        fail("data.split", f"= {d.split!r} gives the train split no weight")
    if weights[1] <= 0 and recipe.train.eval_interval:
        fail("data.split", f"= {d.split!r} leaves no validation data but train.eval_interval = "
             f"{recipe.train.eval_interval}")
    if d.synthetic and d.prefixes:
        fail("data.synthetic", "is true but data.prefixes is also set: choose one")
    if not d.synthetic and not d.prefixes:
        fail("data.prefixes", "is empty: give indexed .bin/.idx prefixes (or set data.synthetic: true)")
    paths = d.prefixes
    if d.prefixes and len(d.prefixes) % 2 == 0 and all(isinstance(x, (int, float)) for x in d.prefixes[0::2]):
        paths = d.prefixes[1::2]
        for weight, prefix in zip(d.prefixes[0::2], paths):
            if isinstance(weight, bool) or not (math.isfinite(weight) and weight > 0):
                fail("data.prefixes", f"weight {weight!r} of {prefix}: blend weights must be positive, finite numbers")
    for prefix in paths:
        if not isinstance(prefix, str):
            fail("data.prefixes", f"has {prefix!r}: expected paths, or alternating weight, path")
    return [strip_data_suffix(p) for p in paths]
