"""`periln-ladder plan|submit|status|report GRID`: the paper's comparison as a grid of runs
(periln_megatron/ladder/; the grid file: ladder/grid.py; docs/ladder.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from periln_megatron.config import RecipeError

EPILOG = """exit status: 0 done; 1 submit: some --local run failed or diverged; 2 invalid grid file, arguments,
a layout that does not fit (plan), or sbatch refused."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="periln-ladder", epilog=EPILOG,
                                     description="Plan, run, watch and report a grid of training runs: recipes "
                                                 "(sizes) x placements x seeds x learning rates.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="one row per run: layout, per-GPU memory, tokens, GPU-hours; the totals")
    p.add_argument("grid")
    from periln_megatron.model.flops import ASSUMED_MFU, PLAN_GPU
    from periln_megatron.model.memory import H100_GIB

    p.add_argument("--mfu", type=float, default=ASSUMED_MFU,
                   help=f"model FLOPs utilisation assumed for GPU-hours (default {ASSUMED_MFU}: model/flops.py)")
    p.add_argument("--gpu", default=PLAN_GPU, help=f"GPU whose dense peak prices the plan (default {PLAN_GPU!r})")
    p.add_argument("--gpu-gib", type=float, default=H100_GIB, help=f"memory of one GPU (default {H100_GIB})")
    s = sub.add_parser("submit", help="submit the unfinished runs: one Slurm job array per size, or --local",
                       description="Finished and diverged runs are skipped, queued ones left alone, the rest "
                                   "(new, failed, stopped) submitted; a run with a checkpoint resumes from it. "
                                   "Everything after `--` goes to every sbatch, e.g. -- -A acct -p batch -t 12:00:00.")
    s.add_argument("grid")
    s.add_argument("--local", action="store_true", help="run on this machine instead of Slurm")
    s.add_argument("--jobs", type=int, default=1, help="--local: runs at a time (default 1)")
    s.add_argument("--max-concurrent", type=int, default=None, metavar="N", help="Slurm: the array's %%N")
    st = sub.add_parser("status", help="per run: state, Slurm job, last step and loss")
    st.add_argument("grid")
    r = sub.add_parser("report", help="<dir>/report.md, <dir>/summary.csv and the plots")
    r.add_argument("grid")
    r.add_argument("--eval", action="store_true",
                   help="also export each finished run to Hugging Face (<dir>/hf/<run>) and score it with "
                        "tools/evaluate.py (kept in <run dir>/eval.json): the paper's task group when its datasets "
                        "load, else --eval-text's documents; the report adds the mean and seed spread")
    r.add_argument("--eval-tasks", default="periln_paper", metavar="NAMES",
                   help="lm-eval task or group for --eval (default periln_paper); '' for --eval-text only")
    r.add_argument("--eval-text", type=Path, metavar="FILE",
                   help="local documents (.jsonl or text) scored by token-level NLL when the tasks' datasets cannot "
                        "be loaded (no network) or --eval-tasks ''")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1:]
    args = _parser().parse_args(argv)
    if extra and (args.command != "submit" or args.local):
        print("periln-ladder: error: options after `--` go to sbatch: only `submit` without --local takes them",
              file=sys.stderr)
        return 2
    from periln_megatron.ladder.grid import GridError, load_grid

    try:
        grid = load_grid(args.grid)
    except (GridError, RecipeError) as e:
        print(f"periln-ladder: error: {e}", file=sys.stderr)
        return 2
    return globals()[f"_{args.command}"](grid, args, extra)


def _plan(grid, args, extra) -> int:
    from periln_megatron.ladder.plan import PlanError, format_plan, plan

    try:
        rows = plan(grid, args.mfu, args.gpu, args.gpu_gib)
    except PlanError as e:
        print(f"periln-ladder: error: {e}", file=sys.stderr)
        return 2
    print(format_plan(grid, rows, args.mfu, args.gpu, args.gpu_gib))
    return 0


def _states(grid, use_queue: bool):
    from periln_megatron.ladder.grid import run_recipe
    from periln_megatron.ladder.state import load_jobs, queue_states, run_state

    jobs = load_jobs(grid.dir)
    queued = queue_states(list(jobs.values())) if use_queue else {}
    return {run.name: run_state(run.dir, run_recipe(run).train.steps, jobs.get(run.name, "-"),
                                (queued or {}).get(jobs.get(run.name, ""))) for run in grid.runs}, queued


def _submit(grid, args, extra) -> int:
    from periln_megatron.ladder.state import load_jobs, save_jobs

    if args.jobs < 1 or (args.max_concurrent is not None and args.max_concurrent < 1):
        print("periln-ladder: error: --jobs and --max-concurrent must be >= 1", file=sys.stderr)
        return 2
    states, queued = _states(grid, use_queue=not args.local)
    if queued is None:
        print(f"periln-ladder: error: squeue failed or is missing, and {grid.dir}/.ladder-jobs.json names jobs: "
              "cannot tell queued runs from stopped ones, so nothing is submitted", file=sys.stderr)
        return 2
    todo = [run for run in grid.runs if states[run.name].state in ("unsubmitted", "failed")]
    counts: dict[str, int] = {}
    for s in states.values():
        counts[s.state] = counts.get(s.state, 0) + 1
    resumed = sum(states[r.name].state == "failed" for r in todo)
    print(f"{grid.name}: {len(grid.runs)} runs ({', '.join(f'{n} {s}' for s, n in counts.items())}); "
          f"submitting {len(todo)}" + (f" ({resumed} again, resuming from their checkpoints)" if resumed else ""))
    if not todo:
        return 0
    if args.local:
        from periln_megatron.ladder.local import run_local

        try:
            codes = run_local(todo, args.jobs)
        except ValueError as e:
            print(f"periln-ladder: error: {e}", file=sys.stderr)
            return 2
        return 0 if all(c == 0 for c in codes.values()) else 1
    from periln_megatron.ladder.slurm import SubmitError, submit_arrays

    try:
        new = submit_arrays(grid, {r.name for r in todo}, args.max_concurrent, extra)
    except SubmitError as e:
        print(f"periln-ladder: error: {e}", file=sys.stderr)
        return 2
    save_jobs(grid.dir, {**load_jobs(grid.dir), **new})
    return 0


def _status(grid, args, extra) -> int:
    states, queued = _states(grid, use_queue=True)
    if queued is None:
        print("periln-ladder: warning: squeue failed or is missing: states are from the run directories only "
              "(a queued or running Slurm job shows as failed or unsubmitted)", file=sys.stderr)
    header = ("run", "state", "job", "step", "loss", "note")
    table = [header] + [(name, s.state, s.job, "-" if s.step is None else str(s.step),
                         "-" if s.loss is None else f"{s.loss:.4f}", s.note) for name, s in states.items()]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    counts: dict[str, int] = {}
    for s in states.values():
        counts[s.state] = counts.get(s.state, 0) + 1
    print(f"{grid.name}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return 0


def _report(grid, args, extra) -> int:
    from periln_megatron.ladder.report import collect, write_report
    from periln_megatron.ladder.state import load_jobs, queue_states

    results = collect(grid, queue_states(list(load_jobs(grid.dir).values())) or {})
    if args.eval:
        from periln_megatron.ladder.evaluate import LadderEvalError, evaluate_runs

        if args.eval_text is not None and not args.eval_text.is_file():
            print(f"periln-ladder: error: --eval-text {args.eval_text}: no such file", file=sys.stderr)
            return 2
        try:
            scores = evaluate_runs([r.run for r in results if r.finished], args.eval_tasks, args.eval_text)
        except LadderEvalError as e:
            print(f"periln-ladder: error: {e}", file=sys.stderr)
            return 2
        for r in results:
            r.score = scores.get(r.run.name, r.score)
    path = write_report(grid, results)
    print(f"wrote {path}, {path.parent / 'summary.csv'} and the plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
