"""Spike scoring, rollback bookkeeping and fault injection (the recipe's `stability:` section;
the design and its trade-offs: docs/stability.md).

State, and where it lives:

    score      the running windows of loss and grad norm, the spike total and the recent-spike
               flags: saved in each checkpoint (common state "stability"), and restored from the
               checkpoint a rollback reloads (the spiked steps never happened in the kept run)
    timeline   the skipped batch windows, the rollback count and the end of the lowered-lr
               stretch: saved in each checkpoint, and on a rollback also written to
               <checkpoint>/iter_C/rollbacks.json of the checkpoint rolled back to, so a run
               killed before its next save resumes from C with the rollback already applied

Batch ids: step s of a run without skips trains on batch s - 1. With skipped windows, iteration i
(0-based) trains on the i-th batch id outside every window; the windows always start at the
position of the checkpoint rolled back to, so the batches of the steps kept are unchanged.
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from pathlib import Path

INJECT_SCALE = 1000.0  # stability.inject_spike_steps: that batch's loss (and gradients) times this
ROLLBACKS_FILE = "rollbacks.json"
QUANTITIES = ("loss", "grad_norm")


class SpikeScore:
    """Per quantity, a window of recent values (non-finite and flagged ones left out, so one spike
    does not hide the next behind a wide standard deviation); per step a spike flag for the rate."""

    def __init__(self, window: int, min_history: int, zscore: float, ratio: float):
        self.window, self.min_history, self.zscore, self.ratio = window, min_history, zscore, ratio
        self.history = {q: deque(maxlen=window) for q in QUANTITIES}
        self.flags: deque = deque(maxlen=window)
        self.total = 0

    def observe(self, **values: float | None) -> tuple[dict, list[str], list[str]]:
        """(record fields, names of the quantities that spiked, one message per spike)."""
        fields, spiked, messages = {}, [], []
        for name in QUANTITIES:
            value = values.get(name)
            if value is None or not math.isfinite(value):
                continue
            past = self.history[name]
            if len(past) >= self.min_history:
                mean = sum(past) / len(past)
                std = math.sqrt(sum((x - mean) ** 2 for x in past) / len(past))
                z = (value - mean) / max(std, 1e-12 * abs(mean), 1e-30)
                fields[f"{name}_zscore"] = z
                if z > self.zscore and value > self.ratio * mean:
                    spiked.append(name)
                    messages.append(f"{name} {value:.4g}: z {z:.3g} over the mean {mean:.4g} of {len(past)} steps "
                                    f"({value / mean:.3g}x)")
                    continue
            past.append(float(value))
        self.flags.append(1 if spiked else 0)
        self.total += bool(spiked)
        fields["spike_total"] = self.total
        fields["spike_rate"] = sum(self.flags) / len(self.flags)
        return fields, spiked, messages

    def state_dict(self) -> dict:
        return {"history": {q: list(v) for q, v in self.history.items()}, "flags": list(self.flags),
                "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        for q in QUANTITIES:
            self.history[q] = deque(state["history"].get(q, []), maxlen=self.window)
        self.flags = deque(state["flags"], maxlen=self.window)
        self.total = int(state["total"])


def merged(windows: list) -> list[list[int]]:
    out: list[list[int]] = []
    for first, last in sorted(windows):
        if out and first <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], last)
        else:
            out.append([first, last])
    return out


def batch_id(iteration: int, windows: list) -> int:
    """The batch iteration `iteration` (0-based) trains on: the iteration-th id outside every window."""
    b = iteration
    for first, last in merged(windows):
        if first > b:
            break
        b += last - first + 1
    return b


def reserve_batches(recipe) -> int:
    """Extra global batches of training data for the windows rollbacks may skip (each at most
    checkpoint.interval + skip_margin); past them the data wraps around to its start."""
    st = recipe.stability
    if "rollback" not in (st.on_spike, st.on_nonfinite):
        return 0
    return st.max_rollbacks * ((recipe.checkpoint.interval or recipe.train.steps) + st.skip_margin)


def warnings(recipe) -> list[str]:
    """Configurations where rollback is expensive (printed at start)."""
    st, steps = recipe.stability, recipe.train.steps
    if "rollback" not in (st.on_spike, st.on_nonfinite):
        return []
    interval = recipe.checkpoint.interval
    lost = (interval or steps) + st.skip_margin
    if lost / steps > st.max_lost_fraction:
        what = f"checkpoint.interval={interval}" if interval else "checkpoint.interval=0 (no periodic checkpoints)"
        return [f"{what}: one rollback may redo up to {interval or steps} steps and skip up to {lost} batches, "
                f"{lost / steps:.0%} of train.steps={steps} (more than stability.max_lost_fraction="
                f"{st.max_lost_fraction:g}); save checkpoints more often for cheaper rollbacks"]
    return []


class Stability:
    """The run's stability state (every rank holds the same: it is computed from rank-agreed numbers)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.score = SpikeScore(cfg.window, cfg.min_history, cfg.zscore, cfg.ratio)
        self.skips: list[list[int]] = []
        self.rollbacks = 0
        self.lr_until = 0  # steps up to this one train at lr x cfg.lr_factor
        self.spike_batches = {s - 1 for s in cfg.inject_spike_steps}
        self.nan_batches = {s - 1 for s in cfg.inject_nonfinite_steps}

    # --------------------------------------------------------------- per step

    def batch_id(self, iteration: int) -> int:
        return batch_id(iteration, self.skips)

    def loss_scale(self, batch: int) -> float:
        """Fault injection, keyed by the batch: a skipped batch is never met again."""
        if batch in self.nan_batches:
            return float("nan")
        return INJECT_SCALE if batch in self.spike_batches else 1.0

    def lr_multiplier(self, step: int) -> float:
        return self.cfg.lr_factor if step <= self.lr_until else 1.0

    def observe(self, loss: float, grad_norm: float | None) -> tuple[dict, str | None, str]:
        """(record fields, "spike" / "nonfinite" / None: what on_spike / on_nonfinite should act on, message)."""
        fields, spiked, messages = self.score.observe(loss=loss, grad_norm=grad_norm)
        fields["rollbacks"] = self.rollbacks
        if messages:
            fields["stability_spike"] = "; ".join(messages)
        if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
            return fields, "nonfinite", f"loss={loss} grad_norm={grad_norm}"
        acts = "loss" in spiked or (self.cfg.act_on == "any" and spiked)
        return fields, ("spike" if acts else None), "; ".join(messages)

    # --------------------------------------------------------------- rollback

    def plan_rollback(self, step: int, to_step: int, reason: str) -> dict:
        """Record a rollback from spiked step `step` to checkpoint `to_step`; the event record."""
        first, last = self.batch_id(to_step), self.batch_id(step - 1) + self.cfg.skip_margin
        self.skips = merged(self.skips + [[first, last]])
        self.rollbacks += 1
        if self.cfg.lr_factor != 1.0 and self.cfg.lr_factor_steps:
            self.lr_until = to_step + self.cfg.lr_factor_steps
        # "step" first: metrics.jsonl's cut-line rule knows records by how they begin
        return {"step": step, "event": "rollback", "to_step": to_step, "skip": [first, last],
                "skipped_batches": last - first + 1, "rollbacks": self.rollbacks, "reason": reason,
                "lr_factor": self.cfg.lr_factor, "lr_factor_until": self.lr_until}

    def timeline(self) -> dict:
        return {"skips": [list(w) for w in self.skips], "rollbacks": self.rollbacks, "lr_until": self.lr_until}

    def state_dict(self) -> dict:
        return {"score": self.score.state_dict(), **self.timeline()}

    def load(self, state: dict | None, iter_dir: Path | None) -> None:
        """The state saved with a checkpoint, then the rollbacks to it made after it was saved."""
        if state:
            self.score.load_state_dict(state["score"])
            self._set_timeline(state)
        extra = read_rollbacks(iter_dir) if iter_dir is not None else None
        if extra:
            self._set_timeline(extra)

    def load_score(self, state: dict | None) -> None:
        """A rollback: the score as the checkpoint had it, the timeline kept."""
        if state:
            self.score.load_state_dict(state["score"])
        else:
            self.score = SpikeScore(self.cfg.window, self.cfg.min_history, self.cfg.zscore, self.cfg.ratio)

    def _set_timeline(self, state: dict) -> None:
        self.skips = merged(state["skips"])
        self.rollbacks = int(state["rollbacks"])
        self.lr_until = int(state["lr_until"])


def read_rollbacks(iter_dir: Path) -> dict | None:
    path = Path(iter_dir) / ROLLBACKS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def persist_rollback(iter_dir: Path, timeline: dict, rank0: bool) -> None:
    """Rank 0 writes the timeline next to the checkpoint rolled back to (atomically); all ranks call
    it, and it returns once the file is in place everywhere."""
    import torch

    if rank0:
        path = Path(iter_dir) / ROLLBACKS_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(timeline) + "\n")
        with open(tmp) as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
