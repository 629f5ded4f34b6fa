"""Training-step time (forward + backward + optimizer step) of Peri-LN vs Pre-LN, same model size.

Both models are built by periln_megatron.model.build.build_gpt_model and trained through megatron-core's
DDP, optimizer and (no-pipelining) schedule, single process. Steps alternate between the two
models (the order flips every repetition) and the median of each is reported, with the ratio.

CPU (default): hidden 1024, 8 layers, seq 512, micro batch 1, local backend, fp32.
GPU (when CUDA is present): paper-size layers (hidden 2048, 16 layers, seq 2048), te backend, bf16.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_periln_step.py [--reps 7] [--warmup 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from periln_megatron.distributed import runtime

REPO = Path(__file__).resolve().parents[1]


def main():
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048 if gpu else 1024)
    p.add_argument("--layers", type=int, default=16 if gpu else 8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--groups", type=int, default=None, help="query groups (GQA); default = heads")
    p.add_argument("--ffn", type=int, default=None, help="default: SwiGLU 8/3 * hidden, rounded to 256")
    p.add_argument("--seq", type=int, default=2048 if gpu else 512)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--backend", default="te" if gpu else "local")
    p.add_argument("--normalization", default="RMSNorm")
    p.add_argument("--placements", default="peri,pre")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args()
    ffn = args.ffn or -(-8 * args.hidden // 3 // 256) * 256

    if args.threads:
        torch.set_num_threads(args.threads)
    runtime.initialize(runtime.ParallelLayout(), seed=0, dist_env=runtime.SINGLE_PROCESS)
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from periln_megatron.config import load_recipe
    from periln_megatron.model.build import build_gpt_model, transformer_config

    recipe = load_recipe(REPO / "recipes/tiny/peri_ln.yaml", [
        f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}", f"model.num_attention_heads={args.heads}",
        f"model.num_query_groups={args.groups or args.heads}", f"model.ffn_hidden_size={ffn}",
        f"model.normalization={args.normalization}", f"precision.preset={'bf16' if gpu else 'fp32'}"],
        check_environment=False)
    config = transformer_config(recipe)
    device = runtime.device()
    data = torch.randint(0, args.vocab, (args.micro_batch, args.seq + 1), device=device)
    positions = torch.arange(args.seq, device=device).expand(args.micro_batch, args.seq)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        out = model(batch[:, :-1], positions, None, labels=batch[:, 1:])
        return out, lambda per_token: (per_token.float().mean(), {})

    steppers = {}
    for placement in args.placements.split(","):
        runtime.seed_everything(0)
        model = build_gpt_model(config, placement=placement, backend=args.backend, embedding_norm=False,
                                vocab_size=args.vocab, max_sequence_length=args.seq).to(device)
        ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-4, weight_decay=0.1, bf16=gpu,
                                                     params_dtype=config.params_dtype), [ddp])

        def step(ddp=ddp, opt=opt):
            ddp.zero_grad_buffer()
            opt.zero_grad()
            get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter([data]), model=[ddp], num_microbatches=1,
                seq_length=args.seq, micro_batch_size=args.micro_batch, forward_only=False)
            opt.step()
            if gpu:
                torch.cuda.synchronize()

        steppers[placement] = step

    # Wall time, and (on CPU) this process's CPU time, which other jobs on a shared machine
    # disturb less. Ratios are also taken per repetition (adjacent steps), then the median.
    times = {name: [] for name in steppers}
    cpu_times = {name: [] for name in steppers}
    order = list(steppers)
    for rep in range(args.warmup + args.reps):
        for name in order if rep % 2 == 0 else order[::-1]:
            start, cpu_start = time.perf_counter(), time.process_time()
            steppers[name]()
            if rep >= args.warmup:
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu_start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "device": torch.cuda.get_device_name() if gpu else f"cpu ({torch.get_num_threads()} threads)",
        "backend": args.backend, "hidden": args.hidden, "layers": args.layers, "seq": args.seq,
        "ffn": ffn, "vocab": args.vocab, "micro_batch": args.micro_batch, "reps": args.reps,
        "median_s": {k: round(v, 4) for k, v in medians.items()},
        "min_s": {k: round(min(v), 4) for k, v in times.items()},
        "all_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
    }
    if not gpu:
        result["median_cpu_s"] = {k: round(statistics.median(v), 4) for k, v in cpu_times.items()}
    if {"peri", "pre"} <= medians.keys():
        result["ratio_peri_over_pre"] = round(medians["peri"] / medians["pre"], 4)
        result["min_ratio"] = round(min(times["peri"]) / min(times["pre"]), 4)
        result["median_paired_ratio"] = round(statistics.median(
            a / b for a, b in zip(times["peri"], times["pre"])), 4)
        if not gpu:
            result["cpu_time_ratio"] = round(statistics.median(cpu_times["peri"]) / statistics.median(cpu_times["pre"]), 4)
    print(json.dumps(result, indent=1))
    runtime.shutdown()


if __name__ == "__main__":
    main()
