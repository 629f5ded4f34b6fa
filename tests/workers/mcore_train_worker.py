"""Trains megatron-core's own GPTModel (local layer spec) for a few steps under torchrun.

Uses megatron-core's DDP, distributed optimizer and pipeline schedule through periln_megatron.runtime.
Prints `RESULT {"losses": [...]}` from the last pipeline stage of data-parallel rank 0.
"""

import argparse
import json

import torch

from periln_megatron import runtime


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--save-init", help="save the initial weights here (dist_checkpointing) and exit")
    p.add_argument("--load-init", help="load initial weights from here before training")
    args = p.parse_args()

    runtime.initialize(runtime.ParallelLayout(tp=args.tp, pp=args.pp), seed=7)
    from megatron.core import dist_checkpointing, parallel_state as ps  # noqa: E402
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig  # noqa: E402
    from megatron.core.models.gpt import GPTModel  # noqa: E402
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
    from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
    from megatron.core.transformer import TransformerConfig  # noqa: E402

    SEQ, VOCAB, MICRO, NUM_MICRO = 32, 256, 2, 4
    config = TransformerConfig(
        num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
        tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
        pipeline_dtype=torch.float32, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
        gradient_accumulation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        masked_softmax_fusion=False,
    )
    model = GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
    )
    if args.save_init:
        import os

        os.makedirs(args.save_init, exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), args.save_init)
        runtime.shutdown()
        return
    if args.load_init:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), args.load_init))

    ddp_model = DistributedDataParallel(
        config, DistributedDataParallelConfig(use_distributed_optimizer=True, overlap_grad_reduce=False), model
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=args.lr, weight_decay=0.01, use_distributed_optimizer=True,
                        clip_grad=1.0, params_dtype=torch.float32),
        [ddp_model],
    )

    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    batch = torch.randint(0, VOCAB, (NUM_MICRO * MICRO, SEQ + 1), generator=torch.Generator().manual_seed(0))
    # Learnable data: the second half of each sequence repeats the first half.
    batch[:, SEQ // 2 + 1:] = batch[:, 1:SEQ // 2 + 1]
    positions = torch.arange(SEQ).unsqueeze(0).expand(MICRO, SEQ)


    def forward_step(data_iterator, model):
        tokens = next(data_iterator)
        output = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:])

        def loss_func(per_token_loss):
            loss = per_token_loss.float().mean()
            return loss, {"loss": loss.detach()}

        return output, loss_func


    forward_backward = get_forward_backward_func()
    num_micro_local = NUM_MICRO // dp_size
    losses = []
    for step in range(args.steps):
        ddp_model.zero_grad_buffer()
        optimizer.zero_grad()
        mine = batch.view(NUM_MICRO, MICRO, SEQ + 1)[dp_rank * num_micro_local:(dp_rank + 1) * num_micro_local]
        outputs = forward_backward(
            forward_step_func=forward_step, data_iterator=iter(mine), model=[ddp_model],
            num_microbatches=num_micro_local, seq_length=SEQ, micro_batch_size=MICRO, forward_only=False,
        )
        ok, grad_norm, _ = optimizer.step()
        assert ok, "optimizer step skipped"
        if ps.is_pipeline_last_stage():
            loss = torch.stack([o["loss"] for o in outputs]).mean()
            torch.distributed.all_reduce(loss, group=ps.get_data_parallel_group())
            losses.append(loss.item() / dp_size)

    if ps.is_pipeline_last_stage() and dp_rank == 0 and ps.get_tensor_model_parallel_rank() == 0:
        print("RESULT " + json.dumps({"losses": losses, "world": torch.distributed.get_world_size()}), flush=True)
    runtime.shutdown()


if __name__ == "__main__":
    main()
