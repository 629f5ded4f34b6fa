"""megatron-core's DDP, distributed optimizer and LR scheduler for a recipe, and the deferred
parameter all-gather of overlap_param_gather made explicit around saves and evaluations."""

from __future__ import annotations

import contextlib

from periln_megatron.config import Recipe
from periln_megatron.training import schedule

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
