"""Validation of a whole recipe before anything is built: choices, ranges, the parallel layout
against the world size, and (check_environment) what depends on this machine."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from periln_megatron.config import choices
from periln_megatron.config.checks import check_data, check_numbers
from periln_megatron.config.recipe import LoggingConfig, Recipe, RecipeError


CHOICES = {
    "model.placement": choices.PLACEMENTS,
    "model.backend": choices.BACKENDS,
    "model.normalization": choices.NORMALIZATIONS,
    "model.recompute": choices.RECOMPUTE,
    "model.cross_entropy_fusion_impl": choices.CROSS_ENTROPY_FUSION_IMPLS,
    "precision.preset": choices.PRECISION_PRESETS,
    "precision.fp8_format": choices.FP8_FORMATS,
    "precision.fp8_recipe": choices.FP8_RECIPES,
    "optim.decay_style": choices.DECAY_STYLES,
    "checkpoint.on_corrupt": choices.ON_CORRUPT,
    "checkpoint.on_schedule_change": choices.ON_SCHEDULE_CHANGE,
    "checkpoint.format": choices.CHECKPOINT_FORMATS,
    "stability.on_spike": choices.STABILITY_ACTIONS,
    "stability.on_nonfinite": choices.STABILITY_ACTIONS,
    "stability.act_on": choices.SPIKE_ACT_ON,
    "logging.wandb_mode": (None, *choices.WANDB_MODES),
    "tokenizer.type": (None, *choices.RECIPE_TOKENIZER_TYPES),
}


POSITIVE = ("model.num_layers", "model.hidden_size", "model.num_attention_heads", "model.seq_length",
            "train.steps", "train.global_batch_size", "train.micro_batch_size", "logging.interval",
            "parallel.tp", "parallel.pp", "parallel.cp")


def _get(recipe: Recipe, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(recipe, section), key)


def validate(recipe: Recipe, world_size: int | None = None, check_environment: bool = True) -> None:
    """Everything that can be checked before a process group or a model exists."""
    from periln_megatron.distributed.layout import LayoutError, ParallelLayout, check_layout

    def fail(key, msg):
        raise RecipeError(f"{recipe.source}: `{key}` {msg}")

    for key, allowed in CHOICES.items():
        if _get(recipe, key) not in allowed:
            fail(key, f"must be one of {', '.join(map(str, allowed))}; got {_get(recipe, key)!r}")
    for key in POSITIVE:
        if _get(recipe, key) < 1:
            fail(key, f"must be >= 1, got {_get(recipe, key)}")
    check_numbers(recipe, fail)

    m, p, t = recipe.model, recipe.parallel, recipe.train
    if m.hidden_size % m.num_attention_heads:
        fail("model.hidden_size", f"= {m.hidden_size} is not divisible by model.num_attention_heads = {m.num_attention_heads}")
    if m.num_query_groups and m.num_attention_heads % m.num_query_groups:
        fail("model.num_query_groups", f"= {m.num_query_groups} does not divide model.num_attention_heads = {m.num_attention_heads}")
    layout = ParallelLayout(tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, sequence_parallel=p.sequence_parallel)
    try:
        check_layout(layout, world_size or layout.model_parallel, num_attention_heads=m.num_attention_heads,
                     num_query_groups=m.num_query_groups, num_layers=m.num_layers)
    except LayoutError as e:
        fail(e.key, f"invalid parallel layout: {e}")
    if world_size is not None:
        dp = layout.data_parallel(world_size)
        if t.global_batch_size % (t.micro_batch_size * dp):
            fail("train.global_batch_size", f"= {t.global_batch_size} is not divisible by train.micro_batch_size * "
                 f"data-parallel size = {t.micro_batch_size} * {dp}")
    if p.vpp and (t.global_batch_size // t.micro_batch_size) % p.pp:
        fail("train.global_batch_size", "/ micro_batch_size must be a multiple of parallel.pp for the interleaved schedule")

    if not (math.isfinite(t.distributed_timeout_minutes) and t.distributed_timeout_minutes > 0):
        fail("train.distributed_timeout_minutes", f"must be a positive number of minutes, got {t.distributed_timeout_minutes}")
    peak = recipe.logging.peak_tflops
    if peak is not None and not (math.isfinite(peak) and peak > 0):
        fail("logging.peak_tflops", f"must be a positive number of TFLOP/s (or null), got {peak}")
    _check_wandb(recipe.logging, fail)
    _check_stability(recipe, fail)
    if p.ddp_bucket_size is not None and (isinstance(p.ddp_bucket_size, bool) or p.ddp_bucket_size < 1):
        fail("parallel.ddp_bucket_size", f"must be a number of parameters >= 1 (or null), got {p.ddp_bucket_size}")
    if p.overlap_param_gather and not p.distributed_optimizer:
        fail("parallel.overlap_param_gather", "needs parallel.distributed_optimizer: true")
    o = recipe.optim
    if o.decay_steps is not None and o.decay_steps < 1:
        fail("optim.decay_steps", f"must be >= 1 (or null: train.steps), got {o.decay_steps}")
    decay_key, decay = ("optim.decay_steps", o.decay_steps) if o.decay_steps else ("train.steps", t.steps)
    if not 0 <= o.warmup_steps < decay:
        fail("optim.warmup_steps", f"= {o.warmup_steps} must be >= 0 and below {decay_key} = {decay}")
    if not 0 <= o.min_lr <= o.lr:
        fail("optim.min_lr", f"= {o.min_lr} must be >= 0 and at most optim.lr = {o.lr}")

    tok = recipe.tokenizer
    if tok.type and not tok.model:
        fail("tokenizer.model", f"is required when tokenizer.type is {tok.type}")
    if tok.model and not tok.type:
        fail("tokenizer.type", "is required when tokenizer.model is given")
    if check_environment and tok.model and not Path(tok.model).exists():
        fail("tokenizer.model", f"file not found: {tok.model}")
    if recipe.data.synthetic_vocab_size < 1:
        fail("data.synthetic_vocab_size", f"must be >= 1, got {recipe.data.synthetic_vocab_size}")
    if m.vocab_size and tok.vocab_size and m.vocab_size < tok.vocab_size:
        fail("model.vocab_size", f"= {m.vocab_size} is smaller than tokenizer.vocab_size = {tok.vocab_size}: "
             "set model.vocab_size to null (the tokenizer's size, padded) or at least that")

    for prefix in check_data(recipe, fail):
        for ext in (".bin", ".idx") if check_environment else ():
            if not Path(prefix + ext).is_file():
                fail("data.prefixes", f"entry {prefix}: {prefix + ext} not found")
    if not (tok.model or recipe.data_vocab_size()):
        fail("model.vocab_size", "is unknown: give tokenizer.model, tokenizer.vocab_size or model.vocab_size")

    prec = recipe.precision
    if prec.preset == "fp8":
        from periln_megatron.model.specs import check_fp8_options

        n = prec.fp8_bf16_first_last_layers
        try:
            check_fp8_options(fp8=prec.fp8_format, fp8_recipe=prec.fp8_recipe, backend=m.backend,
                              first_last_layers_bf16=n > 0, num_layers_at_start_in_bf16=n,
                              num_layers_at_end_in_bf16=n, num_layers=m.num_layers, pipeline_parallel=p.pp,
                              te_version="99" if not check_environment else None)
        except ValueError as e:
            key = "model.backend" if "backend" in str(e) else (
                "precision.fp8_bf16_first_last_layers" if "bf16" in str(e) else "precision.fp8_recipe")
            fail(key, f"invalid fp8 setting: {e}")
    elif prec.fp8_bf16_first_last_layers:
        fail("precision.fp8_bf16_first_last_layers", "only applies with precision.preset = fp8")
    if recipe.checkpoint.keep < 1:
        fail("checkpoint.keep", f"must be >= 1, got {recipe.checkpoint.keep}")
    if recipe.nominal_size is not None:
        try:
            recipe.nominal_params()
        except (ValueError, KeyError):
            fail("nominal_size", f"must look like 400M or 3.2B, got {recipe.nominal_size!r}")
    if check_environment:
        _check_environment(recipe, fail)


WANDB_KEYS = ("wandb_project", "wandb_entity", "wandb_name", "wandb_mode", "wandb_dir")


def _check_wandb(log: LoggingConfig, fail) -> None:
    for key in WANDB_KEYS:
        value = getattr(log, key)
        if isinstance(value, str) and not value.strip():
            fail(f"logging.{key}", "is an empty string: give a value or leave it out (null)")
    if log.wandb_project is None:
        for key in WANDB_KEYS[1:]:
            if getattr(log, key) is not None:
                fail(f"logging.{key}", "is set but logging.wandb_project is not: W&B logging is on only with a project")


def _check_stability(recipe: Recipe, fail) -> None:
    st = recipe.stability
    for key in ("inject_spike_steps", "inject_nonfinite_steps"):
        steps = getattr(st, key)
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in steps):
            fail(f"stability.{key}", f"must be a list of step numbers >= 1, got {steps}")
    if st.min_history > st.window:
        fail("stability.min_history", f"= {st.min_history} must be at most stability.window = {st.window}")
    if "rollback" in (st.on_spike, st.on_nonfinite) and not recipe.checkpoint.dir:
        key = "stability.on_spike" if st.on_spike == "rollback" else "stability.on_nonfinite"
        fail(key, "= rollback needs checkpoints to roll back to: set checkpoint.dir (and checkpoint.interval)")


def _check_environment(recipe: Recipe, fail) -> None:
    """What depends on this machine: Transformer Engine, files."""
    from periln_megatron.model.specs import HAVE_TE

    if recipe.model.backend == "te" and not HAVE_TE:
        key = "precision.preset" if recipe.precision.preset == "fp8" else "model.backend"
        fail(key, f"= {recipe.precision.preset if key == 'precision.preset' else 'te'} needs Transformer Engine, "
             "which is not importable here (use model.backend: local and a non-fp8 preset)")
    if recipe.checkpoint.load and not Path(recipe.checkpoint.load).exists():
        fail("checkpoint.load", f"not found: {recipe.checkpoint.load}")
    log = recipe.logging
    if log.wandb_project and log.wandb_mode != "disabled" and importlib.util.find_spec("wandb") is None:
        fail("logging.wandb_project", "is set but wandb is not installed here: pip install wandb "
             "(or leave logging.wandb_project out to train without W&B)")
