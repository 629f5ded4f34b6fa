"""`periln-ladder report`: <dir>/summary.csv, <dir>/report.md and its plots, every number read from
the runs' own metrics.jsonl through read_metrics.

Per run (RunResult): the final validation loss (`final_valid_loss`, else the last `valid_loss`, else
none), the spike count (records whose `spike` is set), the last layer's variance and max|act| at the
last measured diagnostics step, and the tokens trained (last training step x batch x sequence).
A run is diverged when its state is (exit 3 or a non-finite logged value): it is counted in
n_diverged, never dropped. Per cell (recipe, placement, lr): the mean and the sample standard
deviation (n-1; empty with one seed) of the final loss over the seeds that finished.

The API for other reports (the demo): collect(grid) -> results, summarize(results) -> cells,
losses_by_lr(cells, recipe, placement) -> the verdicts' input, write_report(grid, results,
extra_sections) -> report.md path.
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from periln_megatron.config.choices import PLACEMENT_NAMES
from periln_megatron.ladder.evaluate import Score, read_score
from periln_megatron.ladder.grid import Grid, Run, lr_text, run_recipe
from periln_megatron.ladder.state import RunState, load_jobs, run_state
from periln_megatron.training.metrics import MetricsError, read_metrics, rollback_counts

CSV_COLUMNS = ("recipe", "placement", "lr", "n_seeds", "val_loss_mean", "val_loss_std", "n_diverged", "n_unfinished",
               "spikes", "rollbacks", "skipped_batches", "last_layer_variance", "last_layer_max_abs", "tokens",
               "eval_metric", "eval_n", "eval_mean", "eval_std")


@dataclass
class RunResult:
    run: Run
    state: RunState
    val_loss: float | None = None
    spikes: int = 0
    rollbacks: int = 0               # stability.on_spike: rollback events, and the global batches they skipped
    skipped_batches: int = 0
    last_layer_variance: float | None = None
    last_layer_max_abs: float | None = None
    tokens: int = 0
    variance_by_depth: list = field(default_factory=list)
    score: Score | None = None       # periln-ladder report --eval (ladder/evaluate.py), from <run dir>/eval.json

    @property
    def diverged(self) -> bool:
        return self.state.state == "diverged"

    @property
    def finished(self) -> bool:
        return self.state.state == "finished" and self.val_loss is not None


@dataclass
class Cell:
    recipe: str
    placement: str
    lr: float
    runs: list[RunResult]

    @property
    def losses(self) -> list[float]:
        return [r.val_loss for r in self.runs if r.finished]

    @property
    def n_diverged(self) -> int:
        return sum(r.diverged for r in self.runs)

    @property
    def n_unfinished(self) -> int:
        return sum(not r.finished and not r.diverged for r in self.runs)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.losses) if self.losses else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.losses) if len(self.losses) > 1 else None

    @property
    def scores(self) -> list[Score]:
        return [r.score for r in self.runs if r.finished and r.score is not None]

    def _mean_of(self, attr: str) -> float | None:
        values = [getattr(r, attr) for r in self.runs if r.finished and getattr(r, attr) is not None]
        return statistics.fmean(values) if values else None

    def row(self) -> dict:
        return {"recipe": self.recipe, "placement": self.placement, "lr": lr_text(self.lr), "n_seeds": len(self.losses),
                "val_loss_mean": self.mean, "val_loss_std": self.std, "n_diverged": self.n_diverged,
                "n_unfinished": self.n_unfinished, "spikes": sum(r.spikes for r in self.runs),
                "rollbacks": sum(r.rollbacks for r in self.runs),
                "skipped_batches": sum(r.skipped_batches for r in self.runs),
                "last_layer_variance": self._mean_of("last_layer_variance"),
                "last_layer_max_abs": self._mean_of("last_layer_max_abs"),
                "tokens": sum(r.tokens for r in self.runs), **self.eval_row()}

    def eval_row(self) -> dict:
        values = [s.value for s in self.scores]
        metrics = sorted({s.metric for s in self.scores})
        return {"eval_metric": " / ".join(metrics) or None, "eval_n": len(values) if values else None,
                "eval_mean": statistics.fmean(values) if values and len(metrics) == 1 else None,
                "eval_std": statistics.stdev(values) if len(values) > 1 and len(metrics) == 1 else None}


def run_result(run: Run, state: RunState) -> RunResult:
    out = RunResult(run, state)
    try:
        records = read_metrics(run.dir) if (run.dir / "metrics.jsonl").is_file() else {}
    except MetricsError:
        records = {}
    recipe = run_recipe(run)
    finals = [r["final_valid_loss"] for r in records.values() if "final_valid_loss" in r]
    valids = [r["valid_loss"] for r in records.values() if "valid_loss" in r]
    out.val_loss = finals[-1] if finals else valids[-1] if valids else None
    if out.val_loss is not None and not math.isfinite(out.val_loss):
        out.val_loss = None
    out.spikes = sum(1 for r in records.values() if r.get("spike"))
    out.rollbacks, out.skipped_batches = rollback_counts(run.dir)
    measured = [r for r in records.values() if isinstance(r.get("layer_variance"), list)]
    if measured:
        last = measured[-1]
        out.variance_by_depth = last["layer_variance"]
        out.last_layer_variance = last["layer_variance"][-1]
        max_abs = last.get("layer_max_abs") or [None]
        out.last_layer_max_abs = max_abs[-1]
    step = state.step or 0
    out.tokens = step * recipe.train.global_batch_size * recipe.model.seq_length
    out.score = read_score(run.dir)
    return out


def collect(grid: Grid, queued: dict[str, str] | None = None) -> list[RunResult]:
    jobs = load_jobs(grid.dir)
    out = []
    for run in grid.runs:
        steps = run_recipe(run).train.steps
        job = jobs.get(run.name, "-")
        out.append(run_result(run, run_state(run.dir, steps, job, (queued or {}).get(job))))
    return out


def summarize(results: list[RunResult]) -> list[Cell]:
    cells: dict[tuple, Cell] = {}
    for r in results:
        key = (r.run.recipe, r.run.placement, r.run.lr)
        cells.setdefault(key, Cell(*key, runs=[])).runs.append(r)
    return list(cells.values())


def losses_by_lr(cells: list[Cell], recipe: str, placement: str) -> dict[float, list[float]]:
    """lr -> the finished seeds' final losses of one placement: the input of the loss verdicts
    (periln_megatron/verdicts/losses.py: best_lr_loss, lr_sensitivity)."""
    return {c.lr: c.losses for c in cells if c.recipe == recipe and c.placement == placement}


def best_lrs(cells: list[Cell]) -> dict[tuple[str, str], Cell]:
    """(recipe, placement) -> the cell with the lowest mean final loss among those with a finished seed."""
    best: dict[tuple[str, str], Cell] = {}
    for c in cells:
        if c.mean is None:
            continue
        key = (c.recipe, c.placement)
        if key not in best or c.mean < best[key].mean:
            best[key] = c
    return best


def write_csv(cells: list[Cell], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for c in cells:
            w.writerow({k: ("" if v is None else v) for k, v in c.row().items()})


def _fmt(value, spec=".4f") -> str:
    return "-" if value is None else format(value, spec)


def _cell_text(c: Cell) -> str:
    text = _fmt(c.mean)
    if c.std is not None:
        text += f" ± {c.std:.4f}"
    text += f" (n={len(c.losses)}"
    if c.n_diverged:
        text += f", {c.n_diverged} diverged"
    if c.n_unfinished:
        text += f", {c.n_unfinished} unfinished"
    return text + ")"


def _plots(grid: Grid, results: list[RunResult], cells: list[Cell], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipes = list(dict.fromkeys(r.run.recipe for r in results))
    colours = {p: f"C{i}" for i, p in enumerate(grid.placements)}
    names = []
    fig, axes = plt.subplots(1, len(recipes), figsize=(5 * len(recipes), 4), squeeze=False)
    for ax, recipe in zip(axes[0], recipes):
        finite = [r.val_loss for r in results if r.run.recipe == recipe and r.finished]
        top = max(finite) if finite else 1.0
        for p in grid.placements:
            mine = [c for c in cells if c.recipe == recipe and c.placement == p]
            done = [c for c in mine if c.mean is not None]
            ax.plot([c.lr for c in done], [c.mean for c in done], "-", color=colours[p], label=PLACEMENT_NAMES[p])
            for c in mine:
                ax.plot([c.lr] * len(c.losses), c.losses, "o", color=colours[p], alpha=0.5, ms=4)
                if c.n_diverged:
                    ax.plot([c.lr], [top * 1.02], "x", color=colours[p], ms=9, mew=2)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final validation loss (x: diverged)")
        ax.set_title(recipe, fontsize=9)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "lr_sensitivity.png", dpi=110)
    plt.close(fig)
    names.append("lr_sensitivity.png")

    fig, axes = plt.subplots(1, len(recipes), figsize=(5 * len(recipes), 4), squeeze=False)
    for ax, recipe in zip(axes[0], recipes):
        seen = set()
        for r in results:
            if r.run.recipe != recipe or not r.variance_by_depth:
                continue
            ys = [(i, v) for i, v in enumerate(r.variance_by_depth) if v is not None and v > 0]
            label = PLACEMENT_NAMES[r.run.placement] if r.run.placement not in seen else None
            seen.add(r.run.placement)
            ax.plot([i for i, _ in ys], [v for _, v in ys], color=colours[r.run.placement], alpha=0.6, lw=1,
                    label=label)
        ax.set_yscale("log")
        ax.set_xlabel("layer (0: embedding output)")
        ax.set_ylabel("residual-stream variance (last measured step)")
        ax.set_title(recipe, fontsize=9)
        if seen:
            ax.legend()
    fig.tight_layout()
    fig.savefig(out / "variance_by_depth.png", dpi=110)
    plt.close(fig)
    names.append("variance_by_depth.png")
    return names


def _eval_section(grid: Grid, cells: list[Cell]) -> list[str]:
    """The downstream evaluation (report --eval), mean ± sample standard deviation over the seeds."""
    scores = [s for c in cells for s in c.scores]
    if not scores:
        return []
    metrics = sorted({s.metric for s in scores})
    better = "higher" if scores[0].higher_is_better else "lower"
    lines = ["## Downstream evaluation", "",
             f"{' / '.join(metrics)} of each finished run's Hugging Face export (tools/evaluate.py; {better} is "
             "better), mean ± sample standard deviation over the seeds (periln-ladder report --eval).", ""]
    if len(metrics) > 1:
        return lines + ["The runs were scored on different tasks (the paper's datasets were reachable for some "
                        "only): no means are formed. Delete the runs' eval.json and evaluate again.", ""]
    for recipe in dict.fromkeys(c.recipe for c in cells):
        mine = [c for c in cells if c.recipe == recipe]
        lines += [f"| {recipe}: lr | " + " | ".join(PLACEMENT_NAMES[p] for p in grid.placements) + " |",
                  "|---|" + "---|" * len(grid.placements)]
        for lr in grid.lrs:
            row = []
            for p in grid.placements:
                c = next((c for c in mine if c.placement == p and c.lr == lr), None)
                e = c.eval_row() if c else {}
                row.append("-" if e.get("eval_mean") is None else
                           f"{e['eval_mean']:.4f}" + (f" ± {e['eval_std']:.4f}" if e["eval_std"] is not None else "")
                           + f" (n={e['eval_n']})")
            lines.append(f"| {lr_text(lr)} | " + " | ".join(row) + " |")
        lines.append("")
    return lines


def write_report(grid: Grid, results: list[RunResult], extra_sections: list[str] = (), title: str | None = None,
                 intro: list[str] = ()) -> Path:
    """summary.csv, the plots and report.md in the grid's dir. `title` (default: Ladder <name>) and
    `intro` (markdown lines after it) head the report, `extra_sections` (markdown lines) end it: the
    demo's setup, and its findings."""
    out = grid.dir
    out.mkdir(parents=True, exist_ok=True)
    cells = summarize(results)
    write_csv(cells, out / "summary.csv")
    plots = _plots(grid, results, cells, out)
    states: dict[str, int] = {}
    for r in results:
        states[r.state.state] = states.get(r.state.state, 0) + 1
    lines = [f"# {title or f'Ladder {grid.name}'}", "", *intro,
             f"Grid `{grid.path}`: {len(results)} runs ({', '.join(f'{n} {s}' for s, n in states.items())}). "
             "Final validation loss, mean ± sample standard deviation over the seeds that finished; "
             "every number from the runs' metrics.jsonl (summary.csv has them all).", ""]
    for recipe in dict.fromkeys(c.recipe for c in cells):
        mine = [c for c in cells if c.recipe == recipe]
        lines += [f"## Final validation loss: {recipe}", "",
                  "| lr | " + " | ".join(PLACEMENT_NAMES[p] for p in grid.placements) + " |",
                  "|---|" + "---|" * len(grid.placements)]
        for lr in grid.lrs:
            row = [next((_cell_text(c) for c in mine if c.placement == p and c.lr == lr), "-") for p in grid.placements]
            lines.append(f"| {lr_text(lr)} | " + " | ".join(row) + " |")
        lines.append("")
        best = best_lrs(mine)
        for p in grid.placements:
            c = best.get((recipe, p))
            lines.append(f"- best LR for {PLACEMENT_NAMES[p]}: " + (
                f"{lr_text(c.lr)} ({_cell_text(c)})" if c else "none (no seed finished)"))
        div = sum(c.n_diverged for c in mine)
        lines += [f"- diverged runs: {div} of {sum(len(c.runs) for c in mine)}", ""]
    lines += _eval_section(grid, cells)
    lines += ["## Per-run numbers", "", "| run | state | final val loss | spikes | rollbacks (batches skipped) | "
              "last-layer variance | last-layer max\\|act\\| | tokens |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.run.name} | {r.state.state} | {_fmt(r.val_loss)} | {r.spikes} | "
                     f"{r.rollbacks} ({r.skipped_batches}) | "
                     f"{_fmt(r.last_layer_variance, '.4g')} | {_fmt(r.last_layer_max_abs, '.4g')} | {r.tokens:,} |")
    lines += ["", "## Plots across runs", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += list(extra_sections)
    path = out / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path
