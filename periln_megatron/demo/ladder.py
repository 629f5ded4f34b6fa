"""The demo as a miniature ladder: its runs (main pair, more seeds, the learning-rate sweep) described
as a ladder Grid, so that its report is the ladder's report (periln_megatron/ladder/report.py: the
loss table per learning rate with seed means and spreads, the best learning rate, the per-run
numbers, the LR-sensitivity and variance-by-depth plots, summary.csv) with the demo's own sections
added. One aggregation of the runs' metrics.jsonl for both.

The demo's plan is not a full product of seeds x learning rates (the sweep runs one seed), so the grid
holds the demo's runs as they are; a cell without runs shows "-".
"""

from __future__ import annotations

import os
from pathlib import Path

from periln_megatron.demo.runner import BASE_RECIPE, Job, recipe_overrides
from periln_megatron.ladder.grid import Grid, Run
from periln_megatron.ladder.report import RunResult, run_result
from periln_megatron.ladder.state import run_state

PLACEMENT_ORDER = ("peri", "pre")


def demo_grid(args, out: Path, jobs: list[Job], prefix: Path, tokenizer: Path) -> Grid:
    size = f"{args.layers}x{args.hidden}"
    recipe = os.path.relpath(BASE_RECIPE)  # as the report names it; the working directory stays the demo's
    runs = [Run(name=job.key, recipe=recipe, size=size, placement=job.placement, seed=job.seed, lr=job.lr,
                overrides=tuple(recipe_overrides(args, job, out / "runs" / job.key, prefix, tokenizer)),
                dir=out / "runs" / job.key, nodes=1, gpus_per_node=1) for job in jobs]
    return Grid(path=Path("python -m periln_megatron.demo"), name=f"demo-{size}", recipes=[recipe],
                placements=[p for p in PLACEMENT_ORDER if any(r.placement == p for r in runs)],
                seeds=sorted({r.seed for r in runs}), lrs=sorted({r.lr for r in runs}), sets=[], dir=out, nodes=1,
                gpus_per_node=1, runs=runs)


def demo_results(grid: Grid, jobs: list[Job]) -> list[RunResult]:
    """Each run's result from its own directory (the exit status the demo's trainer recorded there)."""
    steps = {job.key: job.steps for job in jobs}
    return [run_result(run, run_state(run.dir, steps[run.name])) for run in grid.runs]
