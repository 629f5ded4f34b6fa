"""One forward/backward of a Peri-LN GPT (local spec) under a given parallel layout, from weights
that are the same whatever the layout: every full tensor is drawn from a seed derived from its
global name and then sharded the way megatron shards it. Writes, per rank, the loss (last stage)
and the gradients of the norm parameters under global names to OUT/rank{r}.pt.

usage: torchrun --nproc_per_node N spec_parallel_worker.py TP PP SP OUT
"""

import re
import sys
import zlib
from pathlib import Path

import torch

from periln_megatron.distributed import runtime

SEQ, VOCAB, MICRO, NUM_MICRO = 32, 128, 2, 2


def global_name(model, name):
    m = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
    if not m:
        return name
    layer = model.decoder.layers[int(m.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}.{m.group(2)}"  # layer_number is global, 1-based


@torch.no_grad()
def load_layout_free_weights(model, tp, tp_rank):
    for name, p in model.named_parameters():
        gname = global_name(model, name)
        g = torch.Generator().manual_seed(zlib.crc32(gname.encode()))
        dim = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
        shape = list(p.shape)
        if dim is not None:
            shape[dim] *= tp
        full = torch.randn(shape, generator=g)
        full = 1.0 + 0.1 * full if "norm" in name and name.endswith("weight") else 0.05 * full
        if dim is None:
            p.copy_(full)
        elif name.endswith("linear_fc1.weight"):  # SwiGLU: each rank holds [its gate rows; its up rows]
            gate, up = full.chunk(2, dim=0)
            p.copy_(torch.cat([gate.chunk(tp, 0)[tp_rank], up.chunk(tp, 0)[tp_rank]]))
        else:  # fused QKV is laid out per query group, so a plain split gives each rank its groups
            p.copy_(full.chunk(tp, dim)[tp_rank])


def main():
    tp, pp, sp, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", Path(sys.argv[4])
    runtime.initialize(runtime.ParallelLayout(tp=tp, pp=pp, sequence_parallel=sp), seed=0)
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: model_config
    from model_config import transformer_config

    from periln_megatron.model.build import build_gpt_model

    config = transformer_config(
        num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sp,
        params_dtype=torch.float32, pipeline_dtype=torch.float32,
    )
    model = build_gpt_model(config, placement="peri", backend="local", embedding_norm=True,
                            vocab_size=VOCAB, max_sequence_length=SEQ)
    load_layout_free_weights(model, tp, ps.get_tensor_model_parallel_rank())
    for name, p in model.named_parameters():
        if "norm" in name:
            assert p.sequence_parallel is sp, name
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    config.finalize_model_grads_func = finalize_model_grads

    data = torch.randint(0, VOCAB, (NUM_MICRO * MICRO, SEQ + 1), generator=torch.Generator().manual_seed(3))
    batches = iter(data.split(MICRO))

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        tokens, labels = batch[:, :-1], batch[:, 1:]
        output = model(tokens, torch.arange(SEQ).expand_as(tokens), None, labels=labels)

        def loss_func(per_token):
            loss = per_token.float().mean()
            return loss, {"loss": loss.detach()}

        return output, loss_func

    ddp.zero_grad_buffer()
    results = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=batches, model=[ddp], num_microbatches=NUM_MICRO,
        seq_length=SEQ, micro_batch_size=MICRO, forward_only=False,
    )
    record = {"grads": {global_name(model, n): p.main_grad.clone() for n, p in model.named_parameters()
                        if "norm" in n}}
    if ps.is_pipeline_last_stage():
        record["loss"] = float(torch.stack([r["loss"] for r in results]).mean())
    torch.save(record, out / f"rank{torch.distributed.get_rank()}.pt")
    runtime.shutdown()


if __name__ == "__main__":
    main()
