"""python -m periln_megatron.demo (`make demo`): the command line, the plan of runs, and the stages in
order. The package docstring (periln_megatron/demo/__init__.py) is the --help text."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import periln_megatron.demo as package
from periln_megatron.demo.console import fmt_time, log
from periln_megatron.demo.corpus import (build_corpus, corpus_note, corpus_stats, heldout_document, near_duplicates,
                                         sample_prompt, tokenize)
from periln_megatron.demo.findings import classify
from periln_megatron.demo.ladder import demo_grid, demo_results
from periln_megatron.demo.machine import matmul_gflops
from periln_megatron.demo.report import _g, write_report
from periln_megatron.demo.runner import Job, Trainer, cpu_seconds, parallel_check, run_module
from periln_megatron.demo.sample import export_and_sample
from periln_megatron.demo.summary import PLACEMENTS, summarise_run

PRESETS = {
    # The search behind these: docs/demo_search.md. default: 7m41s measured on 2 idle AVX2 cores (no AVX-512,
    # 90 GFLOP/s fp32 GEMM), the slower of the machines measured: batch 8 halves batch 16's compute (issue #24)
    "default": dict(layers=24, hidden=64, ffn=176, heads=4, groups=2, seq_length=128, batch=8, steps=150,
                    lr=1e-2, vocab_size=2000, sweep="0.03", sweep_steps=None, seeds=2),
    # the smallest configuration measured whose Peri-LN export samples a non-degenerate greedy
    # continuation (finding c); Peri-LN also ends lower, with Pre-LN overfitting (8.4 epochs)
    "long": dict(layers=12, hidden=96, ffn=264, heads=4, groups=2, seq_length=128, batch=8, steps=3000,
                 lr=1e-2, vocab_size=2000, sweep=None, sweep_steps=None, seeds=1),
    # the stability signal of issue #24 (12 x 64, fp32, no gradient clipping, lr 1.0, 100 steps of 8 x 128,
    # 3 seeds): Pre-LN's loss climbs above its initial value for longer and its max|act| passes fp16's range.
    # Its timing on 2 idle cores is not yet in docs/demo_search.md.
    "noclip": dict(layers=12, hidden=64, ffn=176, heads=4, groups=2, seq_length=128, batch=8, steps=100,
                   lr=1.0, vocab_size=2000, sweep=None, sweep_steps=None, seeds=3, clip_grad=0.0),
    # the reduced demo of tests/test_demo.py: minutes
    "quick": dict(layers=4, hidden=64, ffn=128, heads=4, groups=2, seq_length=64, batch=8, steps=6,
                  lr=1e-2, vocab_size=500, sweep=None, sweep_steps=None, seeds=1),
}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="make demo", description=package.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="a configuration (default: default); the options below override it. long: 12 x 96 "
                             "for 3000 steps, the smallest measured whose Peri-LN sample is not degenerate "
                             "(docs/demo_search.md); noclip: 12 x 64 at lr 1.0 without gradient clipping, 3 "
                             "seeds (the stability comparison); quick: the test suite's minutes-long run")
    parser.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    parser.add_argument("--input", nargs="+", help="your own .jsonl (text field) or .txt files instead")
    d = PRESETS["default"]
    parser.add_argument("--steps", type=int, help=f"training steps per model (default preset: {d['steps']})")
    parser.add_argument("--layers", type=int, help=f"model depth ({d['layers']})")
    parser.add_argument("--hidden", type=int, help=f"hidden size ({d['hidden']}; the FFN keeps the preset's ratio to it)")
    parser.add_argument("--lr", type=float, help=f"peak learning rate of both models ({d['lr']:g})")
    parser.add_argument("--seeds", type=int, help=f"seeds per model at --lr, each a separate run ({d['seeds']})")
    parser.add_argument("--seed", type=int, default=1234, help="the first seed (default 1234)")
    parser.add_argument("--sweep", help="more learning rates, LR,LR,...: both models are trained at each "
                                        "(the default preset sweeps 0.03; --sweep '' for none)")
    parser.add_argument("--sweep-steps", type=int, help="steps of the sweep's runs (default: --steps)")
    parser.add_argument("--clip-grad", type=float, help="clip the global grad norm to this; 0: no clipping "
                                                        "(default 1.0; the noclip preset: 0)")
    parser.add_argument("--on-spike", choices=("log", "rollback"), default="log",
                        help="stability.on_spike (and on_nonfinite) of every run: rollback reloads the last "
                             "checkpoint and skips the batches that led to a spike (docs/stability.md); the report "
                             "counts rollbacks per model (default: log)")
    parser.add_argument("--vocab-size", type=int, help=f"tokenizer vocabulary ({d['vocab_size']})")
    parser.add_argument("--seq-length", type=int, help=f"tokens per sequence ({d['seq_length']})")
    parser.add_argument("--batch", type=int, help=f"sequences per step ({d['batch']})")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="training processes at a time (default: one per core, at most 2)")
    parser.add_argument("--fresh", action="store_true", help="delete --out first instead of resuming")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.hidden != preset["hidden"] and "ffn" in preset:
        args.ffn = -(-int(args.hidden * preset["ffn"] / preset["hidden"]) // 8) * 8
    if args.clip_grad is None:
        args.clip_grad = preset.get("clip_grad", 1.0)
    args.sweep = [float(x) for x in str(args.sweep).split(",") if x.strip()] if args.sweep else []
    args.sweep_steps = args.sweep_steps or args.steps
    args.split = "95,5,0"
    for name in ("steps", "layers", "hidden", "seeds", "jobs", "batch", "seq_length", "vocab_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.clip_grad < 0:
        parser.error("--clip-grad must be >= 0 (0: no clipping)")
    if args.lr <= 0 or any(x <= 0 for x in args.sweep):
        parser.error("learning rates must be > 0")
    if args.hidden % args.heads:
        parser.error(f"--hidden must be a multiple of {args.heads} (the attention heads)")
    return args


CONFIG_KEYS = ("input", "vocab_size", "layers", "hidden", "ffn", "heads", "groups", "seq_length", "batch",
               "clip_grad", "on_spike")
BEFORE_DEFAULTS = {"clip_grad": 1.0, "on_spike": "log"}  # what an --out made before the key was recorded used


def check_config(out: Path, args) -> None:
    """An --out directory holds one configuration: a run with another shape or data cannot reuse it."""
    path = out / "demo_config.json"
    now = {k: getattr(args, k) for k in CONFIG_KEYS}
    if path.is_file():
        before = json.loads(path.read_text())
        changed = [f"--{k.replace('_', '-')} {before.get(k, BEFORE_DEFAULTS.get(k))} -> {now[k]}" for k in CONFIG_KEYS
                   if before.get(k, BEFORE_DEFAULTS.get(k)) != now[k]]
        if changed:
            raise SystemExit(f"demo: {out} was made with other settings ({'; '.join(changed)}): add --fresh to start "
                             "over there, or give another --out")
    else:
        path.write_text(json.dumps(now, indent=1))


def plan(args) -> list[Job]:
    jobs = [Job(p, p, args.lr, args.seed, args.steps, "main") for p, _ in PLACEMENTS]
    for s in range(1, args.seeds):
        jobs += [Job(f"{p}_seed{args.seed + s}", p, args.lr, args.seed + s, args.steps, "seed") for p, _ in PLACEMENTS]
    for x in args.sweep:
        if math.isclose(x, args.lr) and args.sweep_steps == args.steps:
            continue
        jobs += [Job(f"{p}_lr{x:g}", p, x, args.seed, args.sweep_steps, "sweep") for p, _ in PLACEMENTS]
    return jobs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    check_config(out, args)
    started, cpu_started = time.monotonic(), cpu_seconds()
    stages = {}

    def stage(name: str, since: float) -> float:
        now = time.monotonic()
        stages[name] = round(now - since, 1)
        return now

    args.corpus_note = corpus_note(args.input)
    corpus, heldout = build_corpus(out, args.input)
    tokenizer, prefix = tokenize(out, corpus, args.vocab_size)
    t = stage("data", started)
    stats = corpus_stats(prefix, [float(x) for x in args.split.split(",")], args.vocab_size + 16)
    # validation: the same batches at every evaluation, at most the validation split once over
    args.eval_iters = max(1, min(8, stats.valid_tokens // (args.batch * args.seq_length)))
    seen = args.steps * args.batch * args.seq_length
    log(f"training split: {stats.train_tokens:,} tokens; {args.steps} steps see {seen:,} tokens = "
        f"{seen / max(stats.train_tokens, 1):.2f} epochs")

    jobs = plan(args)
    Trainer(args, out, prefix, tokenizer).run(jobs)
    t = stage("training", t)
    runs = [summarise_run(j.run_dir) for j in jobs]
    main_runs = {r.placement: r for r in runs if r.run_dir.name == r.placement}
    for r in runs:
        log(f"{r.label} (lr {r.lr:g}, seed {r.seed}): {r.status}, validation loss {_g(r.valid_loss, '.4f')}")

    check = None
    if main_runs["peri"].status == "finished":
        check = parallel_check(args, out, main_runs["peri"].run_dir, args.steps)
        log(f"{check['layout']} evaluation: {check['valid_loss']:.6f} (single process: "
            f"{main_runs['peri'].valid_loss:.6f})")

    t = stage("parallelism check", t)
    others = [r.run_dir for r in runs if r.run_dir.name != r.placement]
    run_module("plot_diagnostics", [main_runs["peri"].run_dir, main_runs["pre"].run_dir, "--out", out / "plots",
                                    *(["--curves-also", *others] if others else [])], "plotting diagnostics")
    t = stage("plots", t)
    plots = sorted((out / "plots").glob("*.png"))
    findings = classify(runs, args.lr)
    sample = None
    if main_runs["peri"].status == "finished":
        prompt, truth, doc = sample_prompt(heldout)
        sample = export_and_sample(out, main_runs["peri"].run_dir, prompt)
        sample.update(truth=truth, doc=doc, near_duplicate=near_duplicates(heldout_document(heldout, doc), corpus))
    stage("export and sample", t)
    timing = {"wall_s": round(time.monotonic() - started, 1), "cpu_s": round(cpu_seconds() - cpu_started, 1),
              "stages_s": stages, "load_average": round(os.getloadavg()[1], 1), "cores": os.cpu_count(),
              "gemm_gflops": round(matmul_gflops(), 1)}
    grid = demo_grid(args, out, jobs, prefix, tokenizer)
    report = write_report(out, args, runs, findings, stats, sample, check, plots, timing, grid,
                          demo_results(grid, jobs))
    for f in findings:
        log(f"{f.name}: {f.status}")
    log(f"done in {fmt_time(timing['wall_s'])} (CPU {fmt_time(timing['cpu_s'])}): {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
