"""The training loop: one loop for CPU and GPU, built from megatron-core's parts.

Exit status (the Slurm templates rely on it):
    0   training finished
    75  stopped by a signal or --exit-after-minutes after saving a checkpoint: requeue me
    3   loss or grad norm became NaN/Inf (no checkpoint of that state is written)
    2   invalid recipe or command line, or checkpoint.dir / the run dir is in use by another run
    130 a second SIGINT (Ctrl-C): stopped at once, without saving
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from functools import partial
from pathlib import Path

import torch

from periln_megatron import checkpoint, run_lock, runtime, schedule
from periln_megatron.config import Recipe, RecipeError
from periln_megatron.launch import record_status

EXIT_FINISHED, EXIT_REQUEUE, EXIT_NONFINITE = 0, 75, 3


class NonFiniteError(RuntimeError):
    pass


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process that Ctrl-C ended
SIGINT_REPEAT_S = 0.5


class StopFlag:
    """Set by a signal handler; ranks agree on it at the next step boundary.

    SIGINT (Ctrl-C) is a request to stop too, whatever train.exit_signals says: save, exit 75. A
    second SIGINT exits at once (130) without saving; the last complete checkpoint stays the one
    to resume from. A repeat within SIGINT_REPEAT_S is the same press delivered twice (a launcher
    that forwards the terminal's SIGINT to ranks that got it already) and counts once.
    """

    def __init__(self, signals: list[str], exit_after_minutes: float | None, rank: int = 0):
        self.reason: str | None = None
        self.rank = rank
        self.first_sigint: float | None = None
        self.deadline = time.monotonic() + 60 * exit_after_minutes if exit_after_minutes else None
        for name in {*signals, "SIGINT"}:
            signal.signal(getattr(signal, name), self._handle)

    def _handle(self, signum, frame):
        # os.write, not print: the handler may interrupt a print to the same stream
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self.first_sigint is None:
                self.first_sigint = now
                if self.rank == 0:
                    os.write(2, b"periln-train: SIGINT: saving a checkpoint at the end of this step, then exit 75; "
                                b"press Ctrl-C again to exit at once without saving\n")
            elif now - self.first_sigint >= SIGINT_REPEAT_S:
                os.write(2, f"periln-train: second SIGINT: rank {self.rank} exits at once without saving "
                            f"(exit {EXIT_INTERRUPTED})\n".encode())
                record_status(EXIT_INTERRUPTED)
                os._exit(EXIT_INTERRUPTED)
        if self.reason is None:
            self.reason = signal.Signals(signum).name

    def local(self) -> bool:
        if self.deadline is not None and time.monotonic() >= self.deadline and self.reason is None:
            self.reason = "--exit-after-minutes"
        return self.reason is not None


def fusion_kernels() -> dict[str, bool]:
    """What this process can fuse with: `cuda`; `have_te`, Transformer Engine (fused RoPE, its
    cross-entropy kernel, fused weight-gradient accumulation in its linears); `have_apex`, apex's
    CUDA extensions: fused_weight_gradient_mlp_cuda, which megatron's own linears need for
    gradient-accumulation fusion (the LM head is one under either backend), and the masked-softmax
    kernels of the local backend's attention. Megatron-LM turns all of these on by default."""
    import importlib

    def importable(*names: str) -> bool:
        try:
            for name in names:
                importlib.import_module(name)
            return True
        except Exception:  # noqa: BLE001 - ImportError, or an extension built for another CUDA/torch
            return False

    from periln_megatron.specs import HAVE_TE

    return {"cuda": torch.cuda.is_available(), "have_te": HAVE_TE, "te_version": te_version() if HAVE_TE else None,
            "have_apex": importable("fused_weight_gradient_mlp_cuda", "scaled_upper_triang_masked_softmax_cuda",
                                    "scaled_masked_softmax_cuda")}


def te_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("transformer_engine", "transformer-engine", "transformer_engine_torch"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


# TE's fused cross-entropy before 2.18 computes the logits' gradient in the bf16 logits buffer
# (TransformerEngine#3193); Megatron-LM refuses --cross-entropy-fusion-impl te since #5115.
TE_CROSS_ENTROPY_MIN_VERSION = (2, 18)


def _version_tuple(text: str) -> tuple[int, ...]:
    import re

    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


def cross_entropy_choice(recipe: Recipe, *, cuda: bool, have_te: bool, te_version: str | None) -> tuple[bool, str]:
    """(cross_entropy_loss_fusion, cross_entropy_fusion_impl) for TransformerConfig.

    Every choice computes the softmax and the logits' gradient in FP32. megatron-core's native fused
    kernel casts that gradient to bf16 whatever the logits' dtype (fused_cross_entropy.py), so it is
    used only where the logits are bf16; fp32/fp16 runs take the unfused loss."""
    m = recipe.model
    key = "model.cross_entropy_fusion_impl"
    if m.cross_entropy_fusion_impl == "te" and cuda and m.cross_entropy_fusion:
        need = ".".join(map(str, TE_CROSS_ENTROPY_MIN_VERSION))
        if not have_te:
            raise RecipeError(f"{recipe.source}: `{key}` = te needs Transformer Engine >= {need}, which is not "
                              f"importable; use native")
        if te_version is None or _version_tuple(te_version) < TE_CROSS_ENTROPY_MIN_VERSION:
            raise RecipeError(f"{recipe.source}: `{key}` = te needs Transformer Engine >= {need} (FP32 gradient); "
                              f"found {te_version or 'an unknown version'}; use native")
        return True, "te"
    bf16_logits = recipe.precision.preset in ("bf16", "fp8")
    return cuda and m.cross_entropy_fusion and bf16_logits, "native"


def transformer_config_kwargs(recipe: Recipe, *, cuda: bool | None = None, have_te: bool | None = None,
                              have_apex: bool | None = None, te_version: str | None = None) -> dict:
    """TransformerConfig's arguments for `recipe`; capabilities not given are this process's
    (fusion_kernels()), so a test can ask for the config a CUDA run builds without a GPU.

    On CUDA, as Megatron-LM: bias-dropout-add, SwiGLU and persistent-LN fusions; RoPE fusion and
    megatron-core's native fused cross-entropy in bf16 (cross_entropy_choice), both
    placement-independent (rotary acts on q/k before the core attention; the loss on the last
    stage's logits); gradient-accumulation fusion and the masked-softmax kernel with apex. The
    output norm of RowParallelLinearWithOutNorm (peri/output) is a plain autograd module after the
    linear's fused-wgrad GEMM, and the post-LN NormAfterAdd calls megatron's (fused)
    bias-dropout-add first, so every placement runs with every fusion. On CPU every fusion is off."""
    found = fusion_kernels() if None in (cuda, have_te, have_apex) else {}
    cuda = found["cuda"] if cuda is None else cuda
    have_te = found["have_te"] if have_te is None else have_te
    have_apex = found["have_apex"] if have_apex is None else have_apex
    te_version = found.get("te_version") if te_version is None else te_version
    ce_fusion, ce_impl = cross_entropy_choice(recipe, cuda=cuda, have_te=have_te, te_version=te_version)
    m, p, prec = recipe.model, recipe.parallel, recipe.precision
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}.get(prec.preset, torch.float32)
    kwargs = dict(
        num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups, ffn_hidden_size=m.ffn_size,
        normalization=m.normalization, layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
        hidden_dropout=m.hidden_dropout, attention_dropout=m.attention_dropout, init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tp, pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp, context_parallel_size=p.cp,
        sequence_parallel=p.sequence_parallel, pipeline_dtype=dtype, params_dtype=dtype,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=not cuda, gradient_accumulation_fusion=cuda and have_apex,
        bias_dropout_fusion=cuda, bias_activation_fusion=cuda, apply_rope_fusion=cuda and have_te,
        masked_softmax_fusion=cuda and have_apex, persist_layer_norm=cuda,
        cross_entropy_loss_fusion=ce_fusion, cross_entropy_fusion_impl=ce_impl,
        # as Megatron-LM's core_transformer_config_from_args: a stage's output tensor is freed once
        # sent, keeping only its autograd graph (pipeline stages > 1)
        deallocate_pipeline_outputs=True,
    )
    if m.recompute != "none":
        kwargs.update(recompute_granularity=m.recompute)
        if m.recompute == "full":
            kwargs.update(recompute_method="uniform", recompute_num_layers=m.recompute_num_layers)
    if prec.preset == "fp8":
        kwargs.update(fp8=prec.fp8_format, fp8_recipe=prec.fp8_recipe,
                      first_last_layers_bf16=prec.fp8_bf16_first_last_layers > 0,
                      num_layers_at_start_in_bf16=prec.fp8_bf16_first_last_layers,
                      num_layers_at_end_in_bf16=prec.fp8_bf16_first_last_layers)
    return kwargs


def transformer_config(recipe: Recipe, **capabilities):
    """megatron-core's TransformerConfig for `recipe` (capabilities: see transformer_config_kwargs)."""
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(**transformer_config_kwargs(recipe, **capabilities))


def build_model_chunks(recipe: Recipe, config, vocab_size: int) -> list:
    """One GPTModel per virtual pipeline stage of this rank, cast for mixed precision."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.module import Float16Module

    from periln_megatron.model import build_gpt_model

    m = recipe.model
    chunks = []
    for vp_stage in range(recipe.parallel.vpp or 1):
        vp = vp_stage if recipe.parallel.vpp else None
        chunk = build_gpt_model(
            config, placement=m.placement, backend=m.backend, embedding_norm=m.embedding_norm,
            vocab_size=vocab_size, max_sequence_length=m.seq_length, rotary_base=m.rotary_base,
            share_embeddings_and_output_weights=not m.untie_embeddings,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp), vp_stage=vp,
        )
        if torch.cuda.is_available():
            chunk.cuda(torch.cuda.current_device())
        if config.bf16 or config.fp16:
            chunk = Float16Module(config, chunk)
        chunks.append(chunk)
    return chunks


def build_optimizer(recipe: Recipe, config, chunks):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    p, o, prec, t = recipe.parallel, recipe.optim, recipe.precision, recipe.train
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=p.distributed_optimizer,
        overlap_grad_reduce=p.overlap_grad_reduce, overlap_param_gather=p.overlap_param_gather,
        bucket_size=p.ddp_bucket_size,
    )
    ddp_chunks = [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    # Norm gains and biases are 1-D: megatron-core puts them in the no-weight-decay group.
    opt_config = OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad,
        bf16=config.bf16, fp16=config.fp16, params_dtype=config.params_dtype,
        use_distributed_optimizer=p.distributed_optimizer,
        initial_loss_scale=prec.initial_loss_scale if config.fp16 else None,
        min_loss_scale=prec.min_loss_scale, loss_scale_window=prec.loss_scale_window, hysteresis=prec.hysteresis,
        overlap_param_gather_with_optimizer_step=False,
    )
    optimizer = get_megatron_optimizer(opt_config, ddp_chunks)
    # Called by the schedule: DP grad reduction + SP norm-grad all-reduce after the backward; fp16 loss scaling.
    from megatron.core.distributed import finalize_model_grads

    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    _set_overlap_hooks(config, ddp_chunks, p)
    decay_steps = max(schedule.decay_steps(recipe) * t.global_batch_size, 1)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if o.warmup_steps else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps * t.global_batch_size, lr_decay_steps=decay_steps,
        lr_decay_style=o.decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=decay_steps, wd_incr_style="constant",
        wsd_decay_steps=decay_steps // 10 if o.decay_style == "WSD" else None,
        lr_wsd_decay_style="linear" if o.decay_style == "WSD" else None, **schedule.scheduler_flags(recipe),
    )
    return ddp_chunks, optimizer, scheduler


def _set_overlap_hooks(config, ddp_chunks, p) -> None:
    """As Megatron-LM does: with overlapped communication the schedule must hold back the DP grad
    reduce until the last microbatch, launch it per chunk, and gather params per chunk."""
    def per_chunk(method: str):
        funcs = [getattr(chunk, method) for chunk in ddp_chunks]
        return funcs[0] if len(funcs) == 1 else funcs

    if p.overlap_grad_reduce:
        config.no_sync_func = per_chunk("no_sync")
        config.grad_sync_func = per_chunk("start_grad_sync")
    if p.overlap_param_gather:  # validation requires the distributed optimizer
        config.param_sync_func = per_chunk("start_param_sync")


class ParamGather:
    """With `overlap_param_gather` the distributed optimizer's step updates only this rank's shard;
    the all-gather of the rest is deferred to the next forward's pre-hooks. Before a save or an
    evaluation the parameters must be gathered now, or they mix this step's shard with stale
    values. Megatron-LM does the same (`force_param_sync`, `disable_forward_pre_hook`)."""

    def __init__(self, ddp_chunks, parallel):
        self.chunks = ddp_chunks
        self.deferred = parallel.distributed_optimizer and parallel.overlap_param_gather

    def sync_now(self) -> None:
        if self.deferred:
            for chunk in self.chunks:
                chunk.start_param_sync(force_sync=True)

    @contextlib.contextmanager
    def hooks_disabled(self):
        """Gathered parameters and no pre-hooks (evaluation); the hooks come back afterwards."""
        if not self.deferred:
            yield
            return
        for chunk in self.chunks:
            chunk.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            for chunk in self.chunks:
                chunk.enable_forward_pre_hook()


def _forward_step(data_iterator, model, diagnostics=None):
    from megatron.core.utils import unwrap_model

    batch = next(data_iterator)
    chunk = unwrap_model(model)
    if not (chunk.pre_process or chunk.post_process):  # a middle pipeline stage reads its input from the previous one
        return model(None, None, None), None
    dev = runtime.device()
    batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
    output = model(batch["tokens"] if chunk.pre_process else None, batch["position_ids"] if chunk.pre_process else None,
                   None, labels=batch["labels"] if chunk.post_process else None)

    def loss_func(per_token_loss):
        mask = batch["loss_mask"].float()
        loss = (per_token_loss.float() * mask).sum() / mask.sum().clamp(min=1)
        return loss, {"loss": loss.detach().clone()}  # the schedule divides `loss` in place

    return output, loss_func


def _agree(values: list[float]):
    """Sum small per-rank values over the world (one all-reduce per step)."""
    t = torch.tensor(values, dtype=torch.float64, device=runtime.device())
    torch.distributed.all_reduce(t)
    return t.tolist()


def run_schedule(chunks, batches, iteration, recipe, forward_only: bool):
    """One global batch through megatron-core's (possibly interleaved) pipeline schedule."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    micro = batches.get(iteration, prefetch_next=not forward_only)
    if len(chunks) == 1:
        data_iterator = iter(micro)
    else:  # the interleaved schedule draws from one iterator per chunk
        data_iterator = [iter(micro) for _ in chunks]
    outputs = get_forward_backward_func()(
        forward_step_func=_forward_step, data_iterator=data_iterator,
        model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=len(micro),
        seq_length=recipe.model.seq_length, micro_batch_size=recipe.train.micro_batch_size,
        forward_only=forward_only,
    )
    if ps.is_pipeline_last_stage(ignore_virtual=True) and outputs:
        return torch.stack([o["loss"] for o in outputs]).mean().item(), 1.0
    return 0.0, 0.0


def model_flops_per_token(recipe: Recipe, vocab: int) -> float:
    """Training FLOPs per token as Megatron-LM counts them (periln_megatron/flops.py)."""
    from periln_megatron import flops

    return flops.training_flops_per_token(recipe, vocab)


def train(recipe: Recipe, tokenizer, exit_after_minutes: float | None = None) -> int:
    from megatron.core import parallel_state as ps

    from megatron.core.utils import unwrap_model

    from periln_megatron.data import BatchPrefetcher, MicroBatches, build_datasets
    from periln_megatron.metrics import MetricsLog

    p, t = recipe.parallel, recipe.train
    layout = runtime.ParallelLayout(tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, sequence_parallel=p.sequence_parallel)
    env = runtime.initialize(layout, seed=t.seed, distributed_timeout_minutes=t.distributed_timeout_minutes)
    stop = StopFlag(t.exit_signals, exit_after_minutes, rank=env.rank)
    rank0 = env.rank == 0
    run_dir = recipe.run_dir
    # One run per directory: rank 0 locks checkpoint.dir and the run dir before anything is written
    # there (periln_megatron/run_lock.py); every rank learns the outcome. The lock is held until the
    # process ends (cli.train_main releases it).
    refused = None
    if rank0:
        try:
            run_lock.acquire(run_lock.targets(recipe))
        except run_lock.RunLockError as e:
            refused = e
    if _agree([float(refused is not None)])[0]:
        raise refused or run_lock.RunLockError("")  # only rank 0 has the message
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        print(f"periln-train: {env.world_size} ranks ({env.launcher}), tp={p.tp} pp={p.pp} vpp={p.vpp} "
              f"cp={p.cp} dp={layout.data_parallel(env.world_size)}, device={runtime.device().type}\n"
              f"--- resolved recipe ({recipe.source}) ---\n{recipe.to_yaml()}---", flush=True)
        (run_dir / "recipe.yaml").write_text(recipe.to_yaml())

    vocab = recipe.padded_vocab_size()
    config = transformer_config(recipe)
    chunks = build_model_chunks(recipe, config, vocab)
    chunks, optimizer, scheduler = build_optimizer(recipe, config, chunks)

    train_ds, valid_ds = build_datasets(recipe, tokenizer, run_dir)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    true_vocab = recipe.data_vocab_size()
    needs_data = any(unwrap_model(c).pre_process or unwrap_model(c).post_process for c in chunks)
    pin = torch.cuda.is_available()
    train_batches = BatchPrefetcher(MicroBatches(train_ds, t.global_batch_size, t.micro_batch_size, dp_rank, dp_size,
                                                 true_vocab), needs_data, pin)
    valid_batches = (BatchPrefetcher(MicroBatches(valid_ds, t.global_batch_size, t.micro_batch_size, dp_rank, dp_size,
                                                  true_vocab), needs_data, pin) if valid_ds else None)

    ckpt_root = Path(recipe.checkpoint.dir) if recipe.checkpoint.dir else None
    iteration = 0
    latest = checkpoint.resume_iteration(ckpt_root, recipe.checkpoint.on_corrupt, log=print if rank0 else lambda m: None)
    weights_from = Path(recipe.checkpoint.load) if recipe.checkpoint.load else None
    if latest is not None:
        path = checkpoint.iteration_dir(ckpt_root, latest)
        if checkpoint.has_optimizer_state(path):
            recipe_groups = schedule.group_hyperparameters(optimizer)
            iteration = checkpoint.load(path, chunks, optimizer, scheduler, fmt=recipe.checkpoint.format)
            schedule.restore_after_load(optimizer, scheduler, recipe, recipe_groups, iteration)
            weights_from = None
            if rank0:
                print(f"resumed from iteration {iteration} ({path})", flush=True)
        else:  # e.g. written by convert_from_hf.py: weights only
            weights_from = path
    if weights_from is not None:
        checkpoint.load_weights_only(weights_from, chunks)
        for chunk in chunks:  # the optimizer's fp32 copies must pick up the loaded weights
            chunk.broadcast_params()
        optimizer.reload_model_params()
        if rank0:
            print(f"initial weights from {weights_from} (fresh optimizer state, iteration 0)", flush=True)

    async_queue = None
    if recipe.checkpoint.async_save:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        async_queue = AsyncCallsQueue()

    param_gather = ParamGather(chunks, recipe.parallel)

    def save(it, blocking=False):
        if ckpt_root is None:
            return
        param_gather.sync_now()
        checkpoint.save(ckpt_root, it, chunks, optimizer, scheduler, recipe.to_yaml(), recipe.checkpoint.keep,
                        async_queue=async_queue, fmt=recipe.checkpoint.format)
        if async_queue is not None and blocking:
            async_queue.maybe_finalize_async_calls(blocking=True)

    metrics = MetricsLog(run_dir, enabled=rank0, tensorboard=recipe.logging.tensorboard, total_steps=t.steps,
                         recipe=recipe, start_step=iteration)
    diagnostics = None
    if recipe.diagnostics.interval:
        from periln_megatron.diagnostics import Diagnostics

        diagnostics = Diagnostics(chunks, recipe.diagnostics, config, optimizer)
    from periln_megatron import flops

    flops_per_token = model_flops_per_token(recipe, vocab)
    tokens_per_step = t.global_batch_size * recipe.model.seq_length
    peak, peak_source = flops.this_device_peak(recipe)
    if rank0:
        print(f"model FLOPs {flops_per_token / 1e9:.4g} GFLOP/token (Megatron-LM's count); "
              f"MFU {'against the ' + peak_source if peak else 'not reported: ' + peak_source}", flush=True)
    for chunk in chunks:
        chunk.train()
    try:
        while iteration < t.steps:
            started = time.perf_counter()
            measure = diagnostics is not None and (iteration + 1) % recipe.diagnostics.interval == 0
            if measure:
                diagnostics.start()
            for chunk in chunks:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()
            loss_sum, loss_count = run_schedule(chunks, train_batches, iteration, recipe, forward_only=False)
            layer_grads = diagnostics.layer_grad_norms() if measure else None
            updated, grad_norm, _ = optimizer.step()
            scheduler.step(increment=t.global_batch_size)
            iteration += 1
            loss_sum, loss_count, stopping = _agree([loss_sum, loss_count, float(stop.local())])
            loss = loss_sum / max(loss_count, 1)
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            if not math.isfinite(loss) or (updated and not math.isfinite(grad_norm)):
                raise NonFiniteError(f"step {iteration}: loss={loss} grad_norm={grad_norm}; stopping without saving "
                                     f"(last checkpoint: {checkpoint.latest_iteration(ckpt_root)})")
            elapsed = time.perf_counter() - started
            record = {"step": iteration, "loss": loss, "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                      "tokens_per_s": tokens_per_step / elapsed, "ms_per_step": 1000 * elapsed,
                      "skipped": not updated}
            record.update(flops.throughput(flops_per_token, tokens_per_step, elapsed, env.world_size, peak))
            if torch.cuda.is_available():  # this rank's peak, for periln-params --memory (tools/gpu_smoke.py)
                record["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            if diagnostics is not None:  # spike check every step (scalars); per-layer stats on measured steps
                record.update(diagnostics.observe(loss, grad_norm if updated else None))
            if measure:
                record.update(diagnostics.finish(layer_grads))
            if t.eval_interval and iteration % t.eval_interval == 0:
                with param_gather.hooks_disabled():
                    record["valid_loss"] = evaluate(chunks, valid_batches, recipe, iteration)
            if (iteration % recipe.logging.interval == 0 or iteration == t.steps or "valid_loss" in record
                    or measure or "spike" in record):
                metrics.log(record)
            if async_queue is not None:
                async_queue.maybe_finalize_async_calls(blocking=False)
            if stopping:
                save(iteration, blocking=True)
                if rank0:
                    print(f"stopping at step {iteration} ({stop.reason or 'another rank was signalled'}); "
                          f"exit {EXIT_REQUEUE} to requeue", flush=True)
                return EXIT_REQUEUE
            interval = recipe.checkpoint.interval
            if interval and iteration % interval == 0 and iteration < t.steps:
                save(iteration)
        if recipe.checkpoint.save_at_end and checkpoint.latest_iteration(ckpt_root) != iteration:
            save(iteration, blocking=True)
        elif async_queue is not None:
            async_queue.maybe_finalize_async_calls(blocking=True)
        if t.eval_interval and valid_batches is not None:
            with param_gather.hooks_disabled():
                final = evaluate(chunks, valid_batches, recipe, iteration)
            metrics.log({"step": iteration, "final_valid_loss": final})
        return EXIT_FINISHED
    finally:
        metrics.close()
        for prefetcher in (train_batches, valid_batches):
            if prefetcher is not None:
                prefetcher.close()
        if async_queue is not None:
            async_queue.close()


def evaluate(chunks, batches, recipe, iteration) -> float:
    """Mean loss over train.eval_iters validation batches; all ranks return the same value."""
    for chunk in chunks:
        chunk.eval()
    total = count = 0.0
    with torch.no_grad():
        for i in range(recipe.train.eval_iters):
            s, c = run_schedule(chunks, batches, i, recipe, forward_only=True)
            total, count = total + s, count + c
    for chunk in chunks:
        chunk.train()
    total, count = _agree([total, count])
    return total / max(count, 1)


if __name__ == "__main__":
    from periln_megatron.cli import train_main

    sys.exit(train_main())
