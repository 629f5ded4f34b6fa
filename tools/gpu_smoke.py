#!/usr/bin/env python3
"""GPU smoke check of the paths CPU tests cannot run: the Transformer Engine backend, bf16 and FP8,
TP/SP on two GPUs, te <-> local checkpoints, and checkpoint -> Hugging Face. A few steps each.

    python tools/gpu_smoke.py [--out runs/gpu_smoke] [--record benchmarks/RESULTS_gpu_smoke.md]
    make gpu-check

Every check prints PASS, FAIL or SKIP with the reason (no GPU, no Transformer Engine, FP8 not
supported by this GPU or TE, one GPU only). Exit status 1 if any check failed, else 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The paper recipe's flags (bf16, distributed optimizer, both overlaps); a small shape.
BASE = ["model.num_layers=4", "model.hidden_size=256", "model.num_attention_heads=8", "model.ffn_hidden_size=704",
        "model.seq_length=256", "train.steps=6", "train.global_batch_size=8", "train.micro_batch_size=2",
        "train.eval_interval=0", "optim.warmup_steps=1", "data.prefixes=[]", "data.synthetic=true",
        "tokenizer.type=null", "tokenizer.model=null", "tokenizer.vocab_size=null", "model.vocab_size=4096",
        "checkpoint.interval=3", "diagnostics.interval=3", "logging.tensorboard=false", "parallel.tp=1", "parallel.pp=1",
        "parallel.sequence_parallel=false"]
RECIPES = {"peri": "recipes/peri_ln/400m.yaml", "pre": "recipes/pre_ln/400m.yaml", "post": "recipes/post_ln/400m.yaml"}
# The 400M recipe's width at 4 layers: big enough (~4 GiB) that the estimate's terms dominate.
MEMORY_SHAPE = ["model.num_layers=4", "model.hidden_size=1024", "model.num_attention_heads=16",
                "model.ffn_hidden_size=2816", "model.seq_length=2048", "train.micro_batch_size=4",
                "train.global_batch_size=8", "model.vocab_size=32768", "train.steps=3", "diagnostics.interval=0"]
MEMORY_TOLERANCE = 0.15  # |estimate / measured - 1|; CPU runs agree to 3% (tests/test_efficiency.py)


class Smoke:
    def __init__(self, out: Path):
        self.out, self.results = out, []

    def record(self, name: str, status: str, detail: str) -> None:
        self.results.append((name, status, detail))
        print(f"{status:4}  {name}: {detail}", flush=True)

    def train(self, name: str, recipe: str, sets: list[str], nproc: int = 1) -> tuple[int, list[float], str]:
        run_dir = self.out / name
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "periln_megatron.train", "--recipe", recipe, "--set", *BASE, f"checkpoint.dir={run_dir}", *sets]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        (self.out / f"{name}.log").write_text(proc.stdout + proc.stderr)
        metrics = run_dir / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        losses = [json.loads(line)["loss"] for line in lines if '"loss"' in line]
        return proc.returncode, losses, proc.stdout + proc.stderr

    def check_training(self, name: str, recipe: str, sets: list[str], nproc: int = 1) -> list[float] | None:
        started = time.monotonic()
        code, losses, log = self.train(name, recipe, sets, nproc)
        if code != 0 or not losses or not all(math.isfinite(v) for v in losses):
            self.record(name, "FAIL", f"exit {code}, losses {losses}; log {self.out / (name + '.log')}: {log[-400:]!r}")
            return None
        self.record(name, "PASS", f"{len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
                                  f"{time.monotonic() - started:.0f} s")
        return losses


def check_memory_estimate(smoke: Smoke) -> None:
    """periln-params --memory's estimate (periln_megatron/memory.py, device gpu) against the trainer's
    logged torch.cuda.max_memory_allocated (tensors only, as the estimate) for the te and local backends."""
    from periln_megatron.config import load_recipe
    from periln_megatron.memory import estimate
    from periln_megatron.specs import HAVE_TE
    from periln_megatron.train import fusion_kernels

    for backend in ("te", "local"):
        name = f"memory-estimate-{backend}"
        sets = [f"model.backend={backend}", *MEMORY_SHAPE]
        code, _, log = smoke.train(name, RECIPES["peri"], sets)
        metrics = smoke.out / name / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        measured = max((r.get("max_memory_allocated_gib", 0.0) for r in rows), default=0.0)
        if code != 0 or not measured:
            smoke.record(name, "FAIL", f"exit {code}, no max_memory_allocated_gib logged: {log[-400:]!r}")
            continue
        recipe = load_recipe(REPO / RECIPES["peri"], [*BASE, f"checkpoint.dir={smoke.out / name}", *sets],
                             check_environment=False)
        est = estimate(recipe, 1, device="gpu", have_te=HAVE_TE, have_apex=fusion_kernels()["have_apex"]).peak.total
        ratio = est / (measured * 2**30)
        smoke.record(name, "PASS" if abs(ratio - 1) <= MEMORY_TOLERANCE else "FAIL",
                     f"estimate {est / 2**30:.2f} GiB, max_memory_allocated {measured:.2f} GiB "
                     f"(ratio {ratio:.2f}, tolerance {MEMORY_TOLERANCE:.0%})")


def fp8_support() -> tuple[bool, str]:
    try:
        from transformer_engine.pytorch.fp8 import check_fp8_support
    except ImportError as e:
        return False, f"Transformer Engine has no FP8 support check ({e})"
    ok, reason = check_fp8_support()
    return ok, reason or "supported"


def run_checks(smoke: Smoke) -> None:
    import torch

    from periln_megatron.specs import HAVE_TE

    if not torch.cuda.is_available():
        smoke.record("all", "SKIP", "no CUDA GPU")
        return
    if not HAVE_TE:
        smoke.record("all", "SKIP", "Transformer Engine is not importable")
        return
    gpus = torch.cuda.device_count()
    smoke.record("device", "PASS", f"{gpus} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}")

    for placement, recipe in RECIPES.items():
        smoke.check_training(f"{placement}-te-bf16", recipe, ["model.backend=te"])
    ok, reason = fp8_support()
    for placement, recipe in RECIPES.items():
        for fp8_recipe in ("delayed", "tensorwise"):
            name = f"{placement}-te-fp8-{fp8_recipe}"
            if not ok:
                smoke.record(name, "SKIP", f"FP8 not supported here: {reason}")
                continue
            smoke.check_training(name, recipe, ["model.backend=te", "precision.preset=fp8",
                                                f"precision.fp8_recipe={fp8_recipe}"])

    check_memory_estimate(smoke)

    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_specs.py", "-k",
                            "te or fp8 or checkpoint_keys"], cwd=REPO, capture_output=True, text=True)
    summary = (tests.stdout.strip().splitlines() or ["no output"])[-1]
    smoke.record("gpu-only tests", "PASS" if tests.returncode == 0 else "FAIL", summary)

    # te <-> local checkpoints: the same keys; resume across backends.
    for first, second in (("local", "te"), ("te", "local")):
        name = f"resume-{first}-to-{second}"
        code, _, log = smoke.train(name, RECIPES["peri"], [f"model.backend={first}", "train.steps=3"])
        if code == 0:
            code, losses, log = smoke.train(name, RECIPES["peri"], [f"model.backend={second}",
                                                                    "checkpoint.on_schedule_change=checkpoint"])
            ok_resume = code == 0 and "resumed from iteration 3" in log and all(map(math.isfinite, losses))
        else:
            ok_resume = False
        smoke.record(name, "PASS" if ok_resume else "FAIL", "resumed across backends" if ok_resume else log[-400:])

    if gpus >= 2:
        ref = smoke.check_training("peri-te-fp32-tp1", RECIPES["peri"], ["model.backend=te", "precision.preset=fp32",
                                                                         "parallel.distributed_optimizer=false",
                                                                         "parallel.overlap_grad_reduce=false",
                                                                         "parallel.overlap_param_gather=false",
                                                                         "train.global_batch_size=4"])
        tp = smoke.check_training("peri-te-fp32-tp2-sp", RECIPES["peri"], [
            "model.backend=te", "precision.preset=fp32", "parallel.tp=2", "parallel.sequence_parallel=true",
            "parallel.distributed_optimizer=false", "parallel.overlap_grad_reduce=false",
            "parallel.overlap_param_gather=false", "train.global_batch_size=4"], nproc=2)
        if ref and tp:
            worst = max(abs(a - b) for a, b in zip(ref, tp))
            smoke.record("tp-sp-invariance", "PASS" if worst <= 2e-3 else "FAIL", f"max |loss TP1 - TP2+SP| = {worst:.2e}")
    else:
        smoke.record("tp-sp-invariance", "SKIP", "needs 2 GPUs")

    # checkpoint (te, bf16) -> HF -> transformers, against megatron in fp32 (local backend, same keys)
    run_dir = smoke.out / "peri-te-bf16"
    hf_dir = smoke.out / "peri-te-bf16-hf"
    export = subprocess.run([sys.executable, "tools/convert_to_hf.py", str(run_dir), str(hf_dir), "--overwrite"],
                            cwd=REPO, capture_output=True, text=True)
    if export.returncode != 0:
        smoke.record("checkpoint-to-hf", "FAIL", export.stdout[-300:] + export.stderr[-300:])
        return
    result_file = smoke.out / "parity.json"
    latest = int((run_dir / "latest_checkpointed_iteration.txt").read_text())
    parity = subprocess.run([sys.executable, "tests/workers/hf_parity.py", str(run_dir / f"iter_{latest:07d}"),
                             str(hf_dir), str(result_file)], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""})
    if parity.returncode != 0:
        smoke.record("checkpoint-to-hf", "FAIL", parity.stderr[-400:])
        return
    r = json.loads(result_file.read_text())
    good = r["max_abs_diff"] <= 1e-4 and r["megatron_greedy"] == r["hf_greedy"]
    smoke.record("checkpoint-to-hf", "PASS" if good else "FAIL",
                 f"{r['arch']}: max |logit diff| {r['max_abs_diff']:.2e}, greedy equal: {r['megatron_greedy'] == r['hf_greedy']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_smoke", help="run directories and logs")
    parser.add_argument("--record", type=Path, help="also write the results as a Markdown table to this file")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    smoke = Smoke(args.out)
    run_checks(smoke)
    failed = [name for name, status, _ in smoke.results if status == "FAIL"]
    print(f"{len(smoke.results) - len(failed)} checks passed or skipped, {len(failed)} failed", flush=True)
    if args.record:
        rows = "\n".join(f"| {n} | {s} | {d.replace('|', '/')} |" for n, s, d in smoke.results)
        args.record.write_text(f"# GPU smoke ({time.strftime('%Y-%m-%d')}, `python tools/gpu_smoke.py`)\n\n"
                               f"| check | status | detail |\n|---|---|---|\n{rows}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
