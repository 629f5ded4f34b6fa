"""The training loop: one loop for CPU and GPU, built from megatron-core's parts. Its exit statuses
(the Slurm templates rely on them) are listed once, in periln_megatron/exit_codes.py."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch

from periln_megatron import checkpoint
from periln_megatron.config import Recipe
from periln_megatron.distributed import runtime
from periln_megatron.exit_codes import EXIT_FINISHED, EXIT_REQUEUE, EXIT_ROLLBACKS, EXIT_SPIKE
from periln_megatron.model.build import build_model_chunks, model_flops_per_token, transformer_config
from periln_megatron.training import run_lock, schedule, stability
from periln_megatron.training.optimizer import ParamGather, build_optimizer
from periln_megatron.training.stop import StopFlag


class NonFiniteError(RuntimeError):
    pass


class StabilityStop(RuntimeError):
    """A spike with stability.on_spike=stop, or one rollback too many: exit `exit_code`, nothing saved."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _forward_step(data_iterator, model, diagnostics=None, loss_scale: float = 1.0):
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
        if loss_scale != 1.0:  # fault injection (stability.inject_*): this batch's loss and gradients
            loss = loss * loss_scale
        return loss, {"loss": loss.detach().clone()}  # the schedule divides `loss` in place

    return output, loss_func


def _agree(values: list[float]):
    """Sum small per-rank values over the world (one all-reduce per step)."""
    t = torch.tensor(values, dtype=torch.float64, device=runtime.device())
    torch.distributed.all_reduce(t)
    return t.tolist()


def run_schedule(chunks, batches, iteration, recipe, forward_only: bool, next_iteration: int | None = None,
                 loss_scale: float = 1.0):
    """One global batch (batch id `iteration`) through megatron-core's (possibly interleaved) pipeline
    schedule; `next_iteration`: the batch id to prefetch."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    micro = batches.get(iteration, prefetch_next=not forward_only, next_iteration=next_iteration)
    if len(chunks) == 1:
        data_iterator = iter(micro)
    else:  # the interleaved schedule draws from one iterator per chunk
        data_iterator = [iter(micro) for _ in chunks]
    outputs = get_forward_backward_func()(
        forward_step_func=functools.partial(_forward_step, loss_scale=loss_scale), data_iterator=data_iterator,
        model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=len(micro),
        seq_length=recipe.model.seq_length, micro_batch_size=recipe.train.micro_batch_size,
        forward_only=forward_only,
    )
    if ps.is_pipeline_last_stage(ignore_virtual=True) and outputs:
        return torch.stack([o["loss"] for o in outputs]).mean().item(), 1.0
    return 0.0, 0.0


def train(recipe: Recipe, tokenizer, exit_after_minutes: float | None = None) -> int:
    from megatron.core import parallel_state as ps

    from megatron.core.utils import unwrap_model

    from periln_megatron.data.datasets import BatchPrefetcher, MicroBatches, build_datasets
    from periln_megatron.training.metrics import MetricsLog

    p, t = recipe.parallel, recipe.train
    layout = runtime.ParallelLayout(tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, sequence_parallel=p.sequence_parallel)
    env = runtime.initialize(layout, seed=t.seed, distributed_timeout_minutes=t.distributed_timeout_minutes)
    stop = StopFlag(t.exit_signals, exit_after_minutes, rank=env.rank)
    rank0 = env.rank == 0
    run_dir = recipe.run_dir
    # One run per directory: rank 0 locks checkpoint.dir and the run dir before anything is written
    # there (periln_megatron/training/run_lock.py); every rank learns the outcome. The lock is held until the
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

    stab = stability.Stability(recipe.stability)
    train_ds, valid_ds = build_datasets(recipe, tokenizer, run_dir, extra_batches=stability.reserve_batches(recipe))
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
            stab.load(checkpoint.read_common(path).get("stability"), path)
            weights_from = None
            if rank0:
                print(f"resumed from iteration {iteration} ({path})"
                      + (f"; {stab.rollbacks} rollbacks so far, skipping batches {stab.skips}" if stab.skips else ""),
                      flush=True)
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
                        async_queue=async_queue, fmt=recipe.checkpoint.format, extra={"stability": stab.state_dict()})
        if async_queue is not None and blocking:
            async_queue.maybe_finalize_async_calls(blocking=True)

    metrics = MetricsLog(run_dir, enabled=rank0, tensorboard=recipe.logging.tensorboard, total_steps=t.steps,
                         recipe=recipe, start_step=iteration)
    diagnostics = None
    if recipe.diagnostics.interval:
        from periln_megatron.training.diagnostics import Diagnostics

        diagnostics = Diagnostics(chunks, recipe.diagnostics, config, optimizer)
    from periln_megatron.model import flops

    flops_per_token = model_flops_per_token(recipe, vocab)
    tokens_per_step = t.global_batch_size * recipe.model.seq_length
    peak, peak_source = flops.this_device_peak(recipe)
    if rank0:
        for warning in stability.warnings(recipe):
            print(f"periln-train: warning: {warning}", flush=True)
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
            batch = stab.batch_id(iteration)
            lr_factor = stab.lr_multiplier(iteration + 1)
            if lr_factor != 1.0:  # the scheduler sets each step's lr afresh after optimizer.step()
                for group in optimizer.param_groups:
                    group["lr"] *= lr_factor
            loss_sum, loss_count = run_schedule(chunks, train_batches, batch, recipe, forward_only=False,
                                                next_iteration=stab.batch_id(iteration + 1),
                                                loss_scale=stab.loss_scale(batch))
            layer_grads = diagnostics.layer_grad_norms() if measure else None
            updated, grad_norm, _ = optimizer.step()
            scheduler.step(increment=t.global_batch_size)
            iteration += 1
            loss_sum, loss_count, stopping = _agree([loss_sum, loss_count, float(stop.local())])
            loss = loss_sum / max(loss_count, 1)
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            scores, verdict, why = stab.observe(loss, grad_norm if updated else None)
            # every rank must take the same branch (a rollback is collective)
            spike, nonfinite = _agree([float(verdict == "spike"), float(verdict == "nonfinite")])
            verdict = "nonfinite" if nonfinite else "spike" if spike else None
            if verdict is not None:
                if async_queue is not None:  # an in-flight save: the marker names it once finalized
                    async_queue.maybe_finalize_async_calls(blocking=True)
                if _act(verdict, iteration, why, stab, ckpt_root, rank0) == "rollback":
                    iteration = _rollback(iteration, why, stab, ckpt_root, recipe, chunks, optimizer, scheduler,
                                          param_gather, metrics, rank0)
                    continue
            elapsed = time.perf_counter() - started
            record = {"step": iteration, "loss": loss, "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                      "tokens_per_s": tokens_per_step / elapsed, "ms_per_step": 1000 * elapsed,
                      "skipped": not updated, "batch": batch}
            record.update(scores)
            if lr_factor != 1.0:
                record["lr_factor"] = lr_factor
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
                    or measure or "spike" in record or "stability_spike" in record):
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
        stop.settle()
        metrics.close()
        for prefetcher in (train_batches, valid_batches):
            if prefetcher is not None:
                prefetcher.close()
        if async_queue is not None:
            async_queue.close()


def _act(verdict: str, step: int, why: str, stab, ckpt_root, rank0: bool) -> str:
    """What stability.on_spike / on_nonfinite does with this step: "log" (train on), "rollback", or raise."""
    cfg = stab.cfg
    action = cfg.on_spike if verdict == "spike" else cfg.on_nonfinite
    last = checkpoint.latest_iteration(ckpt_root)
    what = f"step {step}: {'spike: ' if verdict == 'spike' else ''}{why}"
    if action == "stop":
        if verdict == "nonfinite":
            raise NonFiniteError(f"{what}; stopping without saving (last checkpoint: {last})")
        raise StabilityStop(f"{what} (stability.on_spike=stop); stopping without saving (last checkpoint: {last})",
                            EXIT_SPIKE)
    if action == "rollback":
        if last is None or not checkpoint.has_optimizer_state(checkpoint.iteration_dir(ckpt_root, last)):
            if verdict == "nonfinite":
                raise NonFiniteError(f"{what}; no checkpoint to roll back to: stopping without saving")
            if rank0:
                print(f"periln-train: warning: {what}: no checkpoint to roll back to yet; training on", flush=True)
            return "log"
        if stab.rollbacks >= cfg.max_rollbacks:
            raise StabilityStop(f"{what}: it would be rollback {stab.rollbacks + 1}, past stability.max_rollbacks="
                                f"{cfg.max_rollbacks}; stopping without saving (last checkpoint: {last})",
                                EXIT_ROLLBACKS)
        return "rollback"
    if rank0 and verdict == "nonfinite":
        print(f"periln-train: warning: {what} (stability.on_nonfinite=log): training on", flush=True)
    return "log"


def _rollback(step: int, why: str, stab, ckpt_root, recipe, chunks, optimizer, scheduler, param_gather, metrics,
              rank0: bool) -> int:
    """Reload the newest checkpoint, skip the batches from it to the spike (and stability.skip_margin more),
    record it; returns the iteration to continue from."""
    target = checkpoint.latest_iteration(ckpt_root)
    path = checkpoint.iteration_dir(ckpt_root, target)
    metrics.event(stab.plan_rollback(step, target, why))
    # a deferred all-gather of the spiked step's shards must not land on the loaded weights
    param_gather.sync_now()
    groups = schedule.group_hyperparameters(optimizer)
    scheduler.num_steps = 0  # its load_state_dict adds the checkpoint's count to the current one
    iteration = checkpoint.load(path, chunks, optimizer, scheduler, fmt=recipe.checkpoint.format)
    schedule.restore_after_load(optimizer, scheduler, recipe, groups, iteration)
    stab.load_score(checkpoint.read_common(path).get("stability"))
    stability.persist_rollback(path, stab.timeline(), rank0)
    if rank0:
        print(f"rolled back from step {step} to iteration {iteration} (rollback {stab.rollbacks} of at most "
              f"{stab.cfg.max_rollbacks}); skipping batches {stab.skips}", flush=True)
    return iteration


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
