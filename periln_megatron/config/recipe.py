"""The recipe schema: typed sections with their defaults (loading: load.py, validation: validate.py).

Each field's comment is its meaning in the reference generated from this schema
(periln_megatron/config/reference.py, docs/recipes.md).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from periln_megatron.config import choices



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
class StabilityConfig:
    # A spike: a value whose z-score against the last `window` steps' finite, unflagged values is above
    # `zscore` AND which exceeds `ratio` times their mean. Loss and grad norm are scored every step;
    # every record gets loss_zscore, grad_norm_zscore, spike_total and spike_rate (docs/stability.md).
    window: int = 50  # steps of the running mean and standard deviation
    min_history: int = 10  # values in the window before any verdict
    zscore: float = 6.0  # a spike is above this many standard deviations over the running mean ...
    ratio: float = 2.0  # ... and above this times the running mean
    act_on: str = "loss"  # which spikes trigger on_spike: loss (loss spikes only) | any (loss or grad norm)
    # What a spike does: log (record it, train on) | rollback (reload the newest checkpoint before it,
    # skip the batches from there to the spike plus skip_margin, go on) | stop (exit 4, nothing saved).
    # Rollback costs up to checkpoint.interval steps of work and interval + skip_margin batches of data
    # each: the trade-off against save time is in docs/stability.md.
    on_spike: str = "log"
    on_nonfinite: str = "stop"  # a NaN/Inf loss or grad norm: stop (exit 3, nothing saved) | rollback | log
    max_rollbacks: int = 3  # rollbacks allowed in the whole run; one more exits 5 without saving the spiked state
    skip_margin: int = 0  # batches skipped after the spiked step's own batch
    lr_factor: float = 1.0  # after a rollback, multiply the lr by this ...
    lr_factor_steps: int = 0  # ... for this many steps from the checkpoint rolled back to
    # Warn at start when a rollback could lose more than this share of train.steps (checkpoint.interval
    # plus skip_margin steps of work and data): checkpoints too rare for rollback to be cheap.
    max_lost_fraction: float = 0.05
    # Testing only: the steps (of the run without skips: batch id = step - 1) whose loss, and so
    # gradients, are multiplied by 1000. Keyed by the batch, so a rolled-back run that skips that batch
    # does not meet the spike again.
    inject_spike_steps: list = field(default_factory=list)
    inject_nonfinite_steps: list = field(default_factory=list)  # testing only: the same, multiplied by NaN


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
    stability: StabilityConfig = field(default_factory=StabilityConfig)
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
