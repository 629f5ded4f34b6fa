"""The recipe schema: typed sections loaded from YAML, `--set` overrides, validation.

A recipe may start with `base: other.yaml` (relative to itself); its keys are merged over the
base's. Every error names the file and the dotted key. Each field's comment is its meaning in the
reference generated from this schema (periln_megatron/config/reference.py, docs/recipes.md).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from periln_megatron.config import choices
from periln_megatron.config.checks import check_data, check_numbers


class RecipeError(ValueError):
    pass


@dataclass
class ModelConfig:
    num_layers: int = 2  # transformer layers
    hidden_size: int = 64  # width of the residual stream
    num_attention_heads: int = 4  # query heads; divides hidden_size
    num_query_groups: int | None = None  # key/value heads (grouped-query attention); null: multi-head attention
    ffn_hidden_size: int | None = None  # SwiGLU MLP width; null: 8/3 * hidden_size, rounded up to 64
    placement: str = "peri"  # where the norms sit: peri (around each sublayer), pre, post, output (after the add)
    backend: str = "local"  # layer implementation: local (megatron-core, runs on CPU) or te (Transformer Engine, GPU)
    normalization: str = "RMSNorm"  # the norm every placement uses
    norm_epsilon: float = 1e-5  # epsilon of every norm
    embedding_norm: bool = False  # also normalise the embedding output (Peri-LN's optional input norm)
    seq_length: int = 128  # tokens per training sequence (and the RoPE length)
    rotary_base: int = 10000  # RoPE base
    untie_embeddings: bool = True  # separate output-layer weights; false: share the input embedding
    init_method_std: float = 0.02  # std of the normal weight init
    vocab_size: int | None = None  # embedding rows (padded); null: the tokenizer's size, or data.synthetic_vocab_size
    make_vocab_size_divisible_by: int = 128  # the vocabulary is padded up to a multiple of lcm(this, parallel.tp)
    hidden_dropout: float = 0.0  # dropout on each sublayer's output
    attention_dropout: float = 0.0  # dropout on the attention probabilities
    recompute: str = "none"  # activation recomputation: none, selective (core attention) or full (whole layers)
    recompute_num_layers: int = 1  # layers per recomputed chunk with recompute: full
    # On a GPU in bf16/fp8: megatron-core's fused cross-entropy (same FP32 softmax and gradient as the
    # unfused loss, fewer kernels). fp32/fp16 runs and CPU use the unfused loss (the native kernel
    # rounds its gradient to bf16). false: megatron's unfused loss everywhere (deterministic).
    cross_entropy_fusion: bool = True
    # native | te. te: Transformer Engine's kernel (logits' gradient kept in the bf16 logits buffer:
    # one fp32 softmax copy less), allowed only with TE >= 2.18, whose backward is FP32; older TE
    # rounds the target token's gradient through bf16, and Megatron-LM disabled it for stability.
    cross_entropy_fusion_impl: str = "native"

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        return -(-int(8 * self.hidden_size / 3) // 64) * 64


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel size
    pp: int = 1  # pipeline-parallel size
    vpp: int | None = None  # virtual pipeline stages per rank (interleaved schedule); null: none
    cp: int = 1  # context-parallel size
    sequence_parallel: bool = False  # shard norms and dropout along the sequence over the TP group
    distributed_optimizer: bool = True  # shard the fp32 params and Adam moments over data-parallel ranks
    overlap_grad_reduce: bool = False  # overlap the gradient reduce with the backward pass
    overlap_param_gather: bool = False  # overlap the parameter all-gather with the forward pass
    ddp_bucket_size: int | None = None  # parameters per DDP bucket; null: megatron's (max(40M, 1M x DP) with overlap)


@dataclass
class PrecisionConfig:
    preset: str = "fp32"  # compute precision (fp8 needs backend: te)
    fp8_format: str = "hybrid"  # fp8 format: hybrid (E4M3 forward, E5M2 backward) or e4m3
    fp8_recipe: str = "tensorwise"  # fp8 scaling recipe
    fp8_bf16_first_last_layers: int = 0  # keep this many layers at each end in BF16
    initial_loss_scale: float = 4294967296.0  # fp16: initial dynamic loss scale
    min_loss_scale: float = 1.0  # fp16: the loss scale never drops below this
    loss_scale_window: int = 1000  # fp16: steps without overflow before the scale grows
    hysteresis: int = 2  # fp16: overflows tolerated before the scale shrinks


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate (Adam)
    min_lr: float = 1e-4  # learning rate at the end of the decay
    weight_decay: float = 0.1  # AdamW weight decay
    adam_beta1: float = 0.9  # Adam beta1
    adam_beta2: float = 0.95  # Adam beta2
    adam_eps: float = 1e-8  # Adam epsilon
    clip_grad: float = 1.0  # clip the global gradient norm to this
    warmup_steps: int = 0  # linear warmup steps; below train.steps
    decay_style: str = "cosine"  # learning-rate decay after warmup, down to min_lr
    decay_steps: int | None = None  # steps the lr decays over, then stays at min_lr; null: train.steps


@dataclass
class TrainConfig:
    steps: int = 20  # optimizer steps of the whole run
    global_batch_size: int = 8  # sequences per step, all ranks together
    micro_batch_size: int = 2  # sequences per forward pass on one rank
    seed: int = 1234  # initialisation and data-order seed
    eval_interval: int = 0  # validate every this many steps; 0: no periodic validation
    eval_iters: int = 2  # validation batches per evaluation
    exit_signals: list = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])  # save and exit 75 on these (and SIGINT)
    # Minutes a collective (or the rendezvous) waits for a missing rank before it raises: the
    # process-group timeout (Megatron-LM's --distributed-timeout-minutes). Bounds how long a hung
    # rank stalls the others. Must exceed the longest wait at one collective: a checkpoint save or
    # load, or rank 0 building the dataset index on a first run over new data. Fractions allowed.
    distributed_timeout_minutes: float = 10.0


@dataclass
class DataConfig:
    # indexed .bin/.idx paths without the suffix: [prefix, ...] or [weight, prefix, weight, prefix, ...]
    prefixes: list = field(default_factory=list)
    split: str = "98,2,0"  # train,valid,test shares of each prefix's documents
    synthetic: bool = False  # megatron-core's mock data (counting token ids) instead of data.prefixes
    synthetic_vocab_size: int = 256  # synthetic data's vocabulary when no tokenizer or model.vocab_size gives one
    cache_dir: str | None = None  # GPTDataset index cache; None: <run_dir>/data_cache


@dataclass
class TokenizerConfig:
    type: str | None = None  # the tokenizer library; null: no tokenizer (synthetic data or a fixed model.vocab_size)
    model: str | None = None  # path to the SentencePiece .model, HF tokenizer dir, or .tiktoken file
    vocab_size: int | None = None  # the tokenizer's own size: read from tokenizer.model; if also given, must match it


@dataclass
class CheckpointConfig:
    dir: str | None = None  # where checkpoints are saved and resumed from; null: no checkpoints
    interval: int = 0  # save every this many steps; 0: only at the end and on preemption
    keep: int = 2  # newest checkpoints kept; older ones are deleted
    async_save: bool = False  # save in the background while training goes on (a writer process; megatron's AsyncCallsQueue)
    load: str | None = None  # initial weights (e.g. converted from HF) when `dir` has none
    save_at_end: bool = True  # save after the last step
    on_corrupt: str = "fail"  # the marker's iteration is damaged: fail | previous (newest intact one, with a warning)
    # A resume whose schedule (optim.*, train.steps, train.global_batch_size) differs from the checkpoint's:
    # refuse | checkpoint (continue its schedule; its values are recorded) | recipe (re-plan from this iteration)
    on_schedule_change: str = "refuse"
    # How checkpoints are written and read; both load under any TP/PP/DP and read each other's.
    # fully_parallel: every rank writes its own optimizer shard and a share of the model tensors, no
    # gather. gathered: megatron-core's fully_reshardable path (each DP rank gathers the full fp32
    # params and Adam moments; DP rank 0 writes everything): far more memory, kept for comparison.
    format: str = choices.DEFAULT_CHECKPOINT_FORMAT


@dataclass
class LoggingConfig:
    interval: int = 1  # log every this many steps
    run_dir: str | None = None  # metrics.jsonl, recipe.yaml and TensorBoard; null: checkpoint.dir, else runs/<name>
    tensorboard: bool = True  # also write TensorBoard events (when tensorboard is installed)
    # Dense peak TFLOP/s of one GPU at the recipe's precision, for MFU; None: from the table of known
    # GPUs (periln_megatron/model/flops.py). Throughput (tokens/s/GPU, TFLOP/s/GPU) is logged either way.
    peak_tflops: float | None = None
    # Weights & Biases (Megatron-LM's --wandb-project / --wandb-entity / --wandb-exp-name /
    # --wandb-save-dir), from rank 0 only. On when wandb_project is set (needs `pip install wandb`).
    wandb_project: str | None = None
    wandb_entity: str | None = None  # W&B team or user; None: the logged-in user's default entity
    wandb_name: str | None = None  # the run's display name; None: the recipe's `name`
    wandb_mode: str | None = None  # null: $WANDB_MODE, else online
    wandb_dir: str | None = None  # where wandb writes its wandb/ folder; None: the run dir


@dataclass
class DiagnosticsConfig:
    interval: int = 0  # record per-layer variance, max |activation| and grad norms every this many steps; 0: off
    spike_window: int = 50  # steps of the running median a loss/grad-norm spike is measured against
    spike_factor: float = 3.0  # a value above this times the running median is a spike


@dataclass
class Recipe:
    name: str = "run"  # the run's name (runs/<name>, W&B run name)
    nominal_size: str | None = None  # e.g. "400M", "3.2B": periln-params checks the total is within 10%
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    source: str = field(default="<recipe>", repr=False, compare=False)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("source")
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def nominal_params(self) -> float:
        number, unit = self.nominal_size[:-1], self.nominal_size[-1].upper()
        return float(number) * {"M": 1e6, "B": 1e9}[unit]

    @property
    def run_dir(self) -> Path:
        return Path(self.logging.run_dir or self.checkpoint.dir or f"runs/{self.name}")

    def data_vocab_size(self) -> int | None:
        """The token ids' range: the tokenizer's size, else model.vocab_size, else (synthetic data, no
        tokenizer) data.synthetic_vocab_size."""
        synthetic = self.data.synthetic_vocab_size if self.data.synthetic and not self.tokenizer.model else None
        return self.tokenizer.vocab_size or self.model.vocab_size or synthetic

    def padded_vocab_size(self) -> int:
        """Padded to lcm(make_vocab_size_divisible_by, tp), not their product as Megatron-LM does, so
        the embedding's shape does not depend on the layout and checkpoints reshard across TP."""
        size = self.model.vocab_size or self.data_vocab_size()
        multiple = math.lcm(self.model.make_vocab_size_divisible_by, self.parallel.tp)
        return -(-size // multiple) * multiple


# ------------------------------------------------------------------------------- loading

def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class _DuplicateKeyError(yaml.MarkedYAMLError):
    pass


class _RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping, at any depth (plain YAML keeps
    the last and silently drops the first block)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges; later keys override it
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in first:
                        raise _DuplicateKeyError(problem=f"duplicate key `{key}` (first at line {first[key]})",
                                                 problem_mark=key_node.start_mark)
                except TypeError:  # an unhashable key: SafeLoader reports it
                    continue
                first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    if path.resolve() in seen:
        raise RecipeError(f"{path}: `base` chain loops back to itself")
    try:
        raw = yaml.load(path.read_text(), Loader=_RecipeLoader) or {}
    except _DuplicateKeyError as e:
        raise RecipeError(f"{path}:{e.problem_mark.line + 1}: {e.problem}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = "; ".join(str(x) for x in (e.context, e.problem) if x)
        raise RecipeError(f"{where}: invalid YAML: {what}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    return _deep_merge(_read_yaml(path.parent / base, seen + (path.resolve(),)), raw)


def _type_ok(value, annotation) -> tuple[bool, object]:
    """Check (and gently coerce: int -> float) a YAML value against a field annotation."""
    args = typing.get_args(annotation)
    if type(None) in args:
        if value is None:
            return True, None
        annotation = next(a for a in args if a is not type(None))
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return True, float(value)
    if annotation is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return True, float(value)
        except ValueError:
            return False, value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is bool:
        return isinstance(value, bool), value
    origin = typing.get_origin(annotation) or annotation
    return isinstance(value, origin), value


def _build(cls, data: dict, source: str, prefix: str):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in hints or key == "source":
            known = ", ".join(f.name for f in dataclasses.fields(cls) if f.name != "source")
            raise RecipeError(f"{source}: unknown key `{dotted}` (known here: {known})")
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise RecipeError(f"{source}: `{dotted}` must be a section (mapping), got {value!r}")
            kwargs[key] = _build(hints[key], value, source, dotted + ".")
            continue
        ok, coerced = _type_ok(value, hints[key])
        if not ok:
            expected = getattr(hints[key], "__name__", str(hints[key]))
            raise RecipeError(f"{source}: `{dotted}` must be {expected}, got {value!r} ({type(value).__name__})")
        kwargs[key] = coerced
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict:
    """['model.num_layers=4', 'parallel.tp=2'] -> nested dict; values parsed as YAML. A key given
    twice (or a key and a section holding it) is an error, as a duplicate key in a recipe file is."""
    nested: dict = {}
    given: dict[tuple, str] = {}
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected key=value, e.g. model.num_layers=4")
        key, raw = item.split("=", 1)
        path = tuple(key.strip().split("."))
        for other, first in given.items():
            if other[:len(path)] == path or path[:len(other)] == other:
                what = (f"given twice ({first!r}, then {item!r})" if other == path else
                        f"overlaps {first!r} (a section and a key inside it)")
                raise RecipeError(f"--set {key.strip()}: {what}; give each key once")
        given[path] = item
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise RecipeError(f"--set {key}: cannot parse value {raw!r}: {e}") from None
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--set {key}: `{part}` is not a section")
        node[parts[-1]] = value
    return nested


def combine_overrides(*groups: list[str]) -> list[str]:
    """Override lists composed by a caller (defaults, then the caller's own): a key of a later group
    replaces the same key of an earlier one, so the result passes parse_overrides' duplicate check."""
    out: dict[str, str] = {}
    for group in groups:
        for item in group:
            key = item.split("=", 1)[0].strip()
            out.pop(key, None)
            out[key] = item
    return list(out.values())


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None, world_size: int | None = None,
                check_environment: bool = True) -> Recipe:
    path = Path(path)
    data = _read_yaml(path)
    source = str(path)
    if overrides:
        data = _deep_merge(data, parse_overrides(overrides))
        source = f"{path} (with --set {' '.join(overrides)})"
    recipe = _build(Recipe, data, source, "")
    recipe.source = source
    validate(recipe, world_size, check_environment)
    return recipe


# ------------------------------------------------------------------------------ validation

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
    from periln_megatron.distributed.runtime import LayoutError, ParallelLayout, check_layout

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


def _check_environment(recipe: Recipe, fail) -> None:
    """What depends on this machine: Transformer Engine, a GPU, files."""
    import torch

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
