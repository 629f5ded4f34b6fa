"""One run directory's numbers (recipe.yaml, metrics.jsonl through the package's one reader,
demo_outcome.json): what the findings and the report need."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from periln_megatron.demo.console import log
from periln_megatron.training.metrics import MetricsError, read_metrics, rollback_counts

PLACEMENTS = (("peri", "Peri-LN"), ("pre", "Pre-LN"))
LABEL = dict(PLACEMENTS)
OUTCOME = "demo_outcome.json"  # written by the demo when a training process ends: status, message, time


def finished(run_dir: Path) -> dict | None:
    path = run_dir / OUTCOME
    return json.loads(path.read_text()) if path.is_file() else None


def run_metrics(run_dir: Path) -> dict[int, dict]:
    """step -> record of the run's metrics.jsonl (none yet: empty); damage is a one-line exit."""
    if not (run_dir / "metrics.jsonl").is_file():
        return {}
    try:
        return read_metrics(run_dir, warn=lambda message: log(f"warning: {message}"))
    except MetricsError as e:
        raise SystemExit(f"demo: {e}") from None


@dataclass
class RunSummary:
    """What the report and the classifier need from one run directory (metrics.jsonl, recipe.yaml,
    demo_outcome.json)."""
    run_dir: Path
    placement: str
    lr: float
    seed: int
    steps: int
    hidden: int
    status: str                      # finished | diverged
    message: str
    steps_done: int
    train_loss: float | None         # mean of the last logged training losses (up to 5)
    valid_loss: float | None         # the final validation loss
    valid_curve: list                # [(step, valid_loss)]
    train_curve: list                # [(step, loss)]
    spikes: list                     # [(step, message)]
    measured_step: int | None
    layers: dict                     # the last measured step's per-layer lists
    wall_s: float | None = None      # the training process's wall and CPU time (demo_outcome.json)
    cpu_s: float | None = None
    grad_curve: list = None          # [(step, grad_norm)] at the steps of train_curve (None where not logged)
    warmup: int = 0                  # the learning-rate warm-up's steps (recipe optim.warmup_steps)
    peak_act: float | None = None    # the largest max|act| of any layer at any measured step
    rollbacks: int = 0               # stability.on_spike: rollback events and the global batches they skipped
    skipped_batches: int = 0

    @property
    def label(self) -> str:
        return LABEL.get(self.placement, self.placement)

    def layer(self, key: str) -> list:
        return self.layers.get(key) or []


def summarise_run(run_dir: Path) -> RunSummary:
    import yaml

    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    outcome = finished(run_dir) or {"status": "finished", "message": ""}
    records = run_metrics(run_dir)
    train_curve = [(s, r["loss"]) for s, r in records.items() if isinstance(r.get("loss"), (int, float))]
    valid_curve = [(s, r["valid_loss"]) for s, r in records.items() if "valid_loss" in r]
    finals = [r["final_valid_loss"] for r in records.values() if "final_valid_loss" in r]
    measured = [s for s, r in records.items() if r.get("layer_variance")]
    tail = [l for _, l in train_curve[-5:]]
    grads = [records[s].get("grad_norm") for s, _ in train_curve]
    rollbacks, skipped = rollback_counts(run_dir)
    maxes = [m for r in records.values() for m in (r.get("layer_max_abs") or []) if isinstance(m, (int, float))]
    return RunSummary(
        run_dir=run_dir, placement=recipe["model"]["placement"], lr=float(recipe["optim"]["lr"]),
        seed=int(recipe["train"]["seed"]), steps=int(recipe["train"]["steps"]),
        hidden=int(recipe["model"]["hidden_size"]), status=outcome["status"],
        message=outcome.get("message", ""), steps_done=max(records) if records else 0,
        train_loss=statistics.mean(tail) if tail else None,
        valid_loss=finals[-1] if finals and outcome["status"] == "finished" else None,
        valid_curve=valid_curve, train_curve=train_curve,
        spikes=[(s, r["spike"]) for s, r in records.items() if r.get("spike")],
        measured_step=measured[-1] if measured else None,
        layers={k: v for k, v in records[measured[-1]].items() if isinstance(v, list)} if measured else {},
        wall_s=outcome.get("wall_s"), cpu_s=outcome.get("cpu_s"),
        grad_curve=[(s, g if isinstance(g, (int, float)) else None) for (s, _), g in zip(train_curve, grads)],
        warmup=int(recipe["optim"].get("warmup_steps") or 0), peak_act=max(maxes) if maxes else None,
        rollbacks=rollbacks, skipped_batches=skipped,
    )

