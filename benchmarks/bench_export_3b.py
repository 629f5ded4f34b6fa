#!/usr/bin/env python
"""Export benchmark at the 3.2B recipe's shapes: wall time and peak RSS of tools/convert_to_hf.py.

    python benchmarks/bench_export_3b.py [--workdir /tmp/bench_export_3b] [--keep]

1. Writes a random-weight bf16 checkpoint of recipes/peri_ln/3.2b.yaml (model.backend=local) under
   TP=2 x PP=2: 4 CPU processes under torchrun, each building its shard with build_gpt_model
   (no init kernels: parameters are filled with randn) and saving with dist_checkpointing.
2. Runs `/usr/bin/time -v python tools/convert_to_hf.py CKPT OUT --skip-tokenizer` (the recipe's
   tokenizer is tiktoken cl100k, which is not part of this benchmark) and records the figures in
   benchmarks/RESULTS_export.md. Goal: peak RSS <= 1.5 x largest output shard + 1 GiB.
3. Deletes the checkpoint and the export (unless --keep).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = ["model.backend=local", "precision.preset=bf16", "data.synthetic=true", "data.prefixes=[]",
             "checkpoint.dir=null"]


def write_rank(ckpt: Path) -> None:
    """One torchrun rank: build this (tp, pp) shard, fill it, save it."""
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from periln_megatron import checkpoint
    from periln_megatron.distributed import runtime
    from periln_megatron.config import load_recipe
    from periln_megatron.model.build import build_gpt_model
    from periln_megatron.model.build import transformer_config

    recipe = load_recipe(REPO / "recipes/peri_ln/3.2b.yaml", OVERRIDES, world_size=4, check_environment=False)
    p = recipe.parallel
    runtime.initialize(runtime.ParallelLayout(tp=p.tp, pp=p.pp, sequence_parallel=p.sequence_parallel), seed=1)
    config = transformer_config(recipe)
    config.perform_initialization = False
    m = recipe.model
    model = build_gpt_model(config, placement=m.placement, backend=m.backend, embedding_norm=m.embedding_norm,
                            vocab_size=recipe.padded_vocab_size(), max_sequence_length=m.seq_length,
                            rotary_base=m.rotary_base, share_embeddings_and_output_weights=not m.untie_embeddings)
    torch.manual_seed(1000 + torch.distributed.get_rank())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.copy_(1 + 0.1 * torch.randn(param.shape))
            else:
                for row in range(0, param.shape[0], 4096):  # bounded fp32 scratch
                    param[row:row + 4096].copy_(0.02 * torch.randn(param[row:row + 4096].shape))
    rank = torch.distributed.get_rank()
    target = checkpoint.iteration_dir(ckpt, 1)
    if rank == 0:
        target.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    t = time.time()
    dist_checkpointing.save({"model": model.sharded_state_dict(), "iteration": 1}, str(target))
    torch.distributed.barrier()
    if rank == 0:
        (target / "recipe.yaml").write_text(recipe.to_yaml())
        (ckpt / checkpoint.MARKER).write_text("1\n")
        print(f"saved {target} in {time.time() - t:.0f}s (tp={p.tp} pp={p.pp}, stage params "
              f"{sum(x.numel() for x in model.parameters()) / 1e9:.2f}B on rank 0)", flush=True)
    runtime.shutdown()


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_export_3b"))
    ap.add_argument("--max-shard-size", default="2GB")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the export")
    ap.add_argument("--write-rank", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write_rank:
        write_rank(args.write_rank)
        return 0

    free = shutil.disk_usage(args.workdir.parent).free
    if free < 20e9:
        sys.exit(f"need ~15 GB free under {args.workdir.parent}, have {free / 1e9:.1f} GB")
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    ckpt, out = args.workdir / "ckpt", args.workdir / "hf"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    try:
        t = time.time()
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", "--master_addr=127.0.0.1",
                        "--master_port=29733", __file__, "--write-rank", str(ckpt)], env=env, check=True, cwd=REPO)
        write_s = time.time() - t
        cmd = ["/usr/bin/time", "-v", sys.executable, "tools/convert_to_hf.py", str(ckpt), str(out),
               "--skip-tokenizer", "--quiet", "--max-shard-size", args.max_shard_size]
        print("$", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, env={**env, "OMP_NUM_THREADS": "2"}, cwd=REPO, capture_output=True, text=True)
        print(proc.stdout[-3000:], proc.stderr[-1500:])
        if proc.returncode:
            return proc.returncode
        rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
        wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", proc.stderr).group(1)
        shards = sorted(out.glob("*.safetensors"))
        largest = max(f.stat().st_size for f in shards)
        goal = 1.5 * largest + 2**30
        rss = rss_kb * 1024
        result = "\n".join([
            "# HF export benchmark (3.2B Peri-LN shapes)", "",
            "Command: `python benchmarks/bench_export_3b.py` (writes the checkpoint, then measures:)", "",
            "```", " ".join(cmd[:3] + ["tools/convert_to_hf.py", "CKPT", "OUT", *cmd[6:]]), "```", "",
            f"- model: recipes/peri_ln/3.2b.yaml with {' '.join(OVERRIDES[:2])}; random weights; "
            f"written under TP=2 x PP=2 by 4 CPU processes ({write_s:.0f}s)",
            f"- checkpoint on disk: {_du(ckpt) / 1e9:.2f} GB; export: {_du(out) / 1e9:.2f} GB in {len(shards)} shards",
            f"- machine: {os.cpu_count()} CPU cores, no GPU",
            f"- **wall time: {wall}** (h:mm:ss / m:ss)",
            f"- **peak RSS: {rss / 2**30:.2f} GiB**",
            f"- largest output shard: {largest / 2**30:.2f} GiB; goal 1.5 x shard + 1 GiB = {goal / 2**30:.2f} GiB: "
            f"**{'met' if rss <= goal else 'NOT met'}**", "",
            "Peak RSS does not grow with the shard size: tensors are read chunk by chunk from the",
            "torch_dist files and written into the shard file as they are produced (the safetensors",
            "header is planned from shapes first), so at most one layer's fused tensor is in memory.", ""])
        (REPO / "benchmarks/RESULTS_export.md").write_text(result)
        print(result)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
