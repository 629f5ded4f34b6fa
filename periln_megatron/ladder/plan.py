"""`periln-ladder plan`: each run's layout, per-GPU memory (model/memory.py), tokens and GPU-hours
(model/flops.py at an assumed MFU), and the totals. A layout whose estimate does not fit is refused."""

from __future__ import annotations

from dataclasses import dataclass

from periln_megatron.ladder.grid import OWNED, Grid, Run, run_recipe
from periln_megatron.model import flops
from periln_megatron.model.memory import GIB, H100_GIB, estimate


@dataclass
class PlanRow:
    run: Run
    layout: str
    memory_gib: float
    tokens: int
    gpu_hours: float

    @property
    def shown_overrides(self) -> str:
        """The grid's `set`: the coordinates are in the run's name."""
        return " ".join(o for o in self.run.overrides if o.split("=", 1)[0] not in OWNED) or "-"


class PlanError(ValueError):
    pass


def plan(grid: Grid, mfu: float = flops.ASSUMED_MFU, gpu: str = flops.PLAN_GPU,
         gpu_gib: float = H100_GIB) -> list[PlanRow]:
    if not 0 < mfu <= 1:
        raise PlanError(f"--mfu {mfu}: must be in (0, 1]")
    rows = []
    memo: dict[tuple, tuple] = {}
    for run in grid.runs:
        recipe = run_recipe(run)
        key = (run.recipe, run.placement)
        if key not in memo:
            est = estimate(recipe, run.gpus)
            p = recipe.parallel
            layout = f"tp{p.tp} pp{p.pp} cp{p.cp} dp{est.dp}"
            peak = est.peak.total / GIB
            if peak > gpu_gib:
                raise PlanError(f"{grid.path}: run {run.name}: {layout} on {run.gpus} GPUs needs an estimated "
                                f"{peak:.1f} GiB per GPU, over {gpu_gib:g} GiB (raise `nodes`, or set a smaller "
                                "train.micro_batch_size or recompute in `set`)")
            memo[key] = (layout, peak)
        layout, peak = memo[key]
        tokens = recipe.train.steps * recipe.train.global_batch_size * recipe.model.seq_length
        try:
            hours = flops.gpu_hours(recipe, tokens, mfu, gpu)
        except ValueError:
            known = ", ".join(label for _, label, _ in flops.PEAK_TFLOPS)
            raise PlanError(f"--gpu {gpu!r}: no {recipe.precision.preset} peak for it in model/flops.py "
                            f"PEAK_TFLOPS (known: {known})") from None
        rows.append(PlanRow(run, layout, peak, tokens, hours))
    return rows


def _tokens(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,.0f}"


def totals(rows: list[PlanRow]) -> dict:
    return {"runs": len(rows), "tokens": sum(r.tokens for r in rows), "gpu_hours": sum(r.gpu_hours for r in rows)}


def format_plan(grid: Grid, rows: list[PlanRow], mfu: float, gpu: str, gpu_gib: float) -> str:
    header = ("run", "recipe", "overrides", "layout", "nodes", "GiB/GPU", "tokens", "GPU-h")
    table = [header] + [(r.run.name, r.run.recipe, r.shown_overrides, r.layout, str(r.run.nodes),
                         f"{r.memory_gib:.1f} ({r.memory_gib / gpu_gib:.0%})", _tokens(r.tokens),
                         f"{r.gpu_hours:,.1f}") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.append("")
    by_size: dict[str, list[PlanRow]] = {}
    for r in rows:
        by_size.setdefault(r.run.size, []).append(r)
    for size, group in by_size.items():
        t = totals(group)
        lines.append(f"{size}: {t['runs']} runs, {_tokens(t['tokens'])} tokens, {t['gpu_hours']:,.0f} GPU-hours")
    t = totals(rows)
    lines.append(f"total ({grid.name}): {t['runs']} runs, {_tokens(t['tokens'])} tokens, "
                 f"{t['gpu_hours']:,.0f} GPU-hours at {mfu:.0%} MFU of {gpu} ({gpu_gib:g} GiB/GPU for the memory check)")
    return "\n".join(lines)
