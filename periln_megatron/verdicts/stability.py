"""Stability that can be measured at CPU scale, where nothing diverges: per run, the steps after warm-up
whose training loss is above the run's initial loss, the peak of that excursion and the step the loss is
back below the initial value; the grad-norm spikes' size (the largest ratio to the running median, not
only a count); whether max|act| would overflow fp16. Then Peri-LN's runs against Pre-LN's at each
learning rate with an exact rank test over seeds."""

from __future__ import annotations

import math
import statistics
from collections import deque

from periln_megatron.verdicts import CONTRADICTED, NOT_SHOWN, SHOWN, Verdict
from periln_megatron.verdicts.stats import LEVEL, rank_test_greater

FP16_MAX = 65504.0
SPIKE_WINDOW = 50       # the running median of the previous 50 grad norms, as the trainer's detector
SPIKE_MIN_HISTORY = 5


def largest_spike(values: list[float], window: int = SPIKE_WINDOW) -> tuple[float, int | None]:
    """(the largest value / running median of the previous `window` finite values, the index of that
    value); (0.0, None) before SPIKE_MIN_HISTORY values."""
    past: deque = deque(maxlen=window)
    best, where = 0.0, None
    for i, v in enumerate(values):
        if v is None or not math.isfinite(v):
            continue
        if len(past) >= SPIKE_MIN_HISTORY:
            median = statistics.median(past)
            if median > 0 and v / median > best:
                best, where = v / median, i
        past.append(v)
    return best, where


def run_stability(steps: list[int], losses: list[float], grad_norms: list[float | None], warmup: int,
                  max_act: float | None, diverged: bool = False) -> dict:
    """One run's stability figures from its per-step training loss and grad norm (every logged step;
    the demo logs every step). `above` is math.inf for a diverged run (it ranks last); `spike` is None
    without enough grad norms for a running median."""
    if not steps:
        return {"above": math.inf if diverged else 0, "initial": None, "peak": None, "recovered": None,
                "spike": None, "spike_step": None, "fp16": bool(max_act and max_act > FP16_MAX), "max_act": max_act,
                "diverged": diverged, "after": 0}
    initial = losses[0]
    after = [(s, l) for s, l in zip(steps, losses) if s > warmup]
    above = [(s, l) for s, l in after if l > initial]
    peak_step, peak = max(after, key=lambda sl: sl[1]) if after else (None, None)
    recovered = None
    if above:
        recovered = next((s for s, l in after if s > peak_step and l < initial), None)
    ratio, at = largest_spike(grad_norms)
    return {"above": math.inf if diverged else len(above), "initial": initial, "peak": peak, "peak_step": peak_step,
            "recovered": recovered, "excursion": bool(above), "spike": ratio if at is not None else None,
            "spike_step": steps[at] if at is not None else None, "fp16": bool(max_act and max_act > FP16_MAX),
            "max_act": max_act, "diverged": diverged, "after": len(after)}


def _smallest_p(n_a: int, n_b: int) -> float:
    return 1 / math.comb(n_a + n_b, n_a) if n_a and n_b else 1.0


def _fmt(values, spec) -> str:
    return ", ".join("n/a" if v is None else ("diverged" if isinstance(v, float) and math.isinf(v) else format(v, spec))
                     for v in values)


def _group_text(lr: float, peri: list[dict], pre: list[dict], p_shown: float, p_contra: float) -> str:
    def side(name, runs):
        rec = ["never" if r["excursion"] and r["recovered"] is None else r["recovered"] for r in runs]
        return (f"{name}: steps above the initial loss after warm-up {_fmt([r['above'] for r in runs], 'g')}; "
                f"peak loss {_fmt([r['peak'] for r in runs], '.3g')}; back below the initial loss by step "
                f"{_fmt([x if r['excursion'] else '-' for x, r in zip(rec, runs)], '')}; largest grad norm / "
                f"running median {_fmt([r['spike'] for r in runs], '.3g')}; max|act| above fp16's 65504 in "
                f"{sum(r['fp16'] for r in runs)} of {len(runs)} runs")
    return (f"lr {lr:g}, {len(peri)} / {len(pre)} seeds: {side('Peri-LN', peri)}; {side('Pre-LN', pre)}; exact rank "
            f"test of the steps above, one-sided p = {p_shown:.3g} (Pre-LN less stable) / {p_contra:.3g} (Peri-LN)")


def stability(groups: dict[float, tuple[list[dict], list[dict]]], level: float = LEVEL) -> Verdict:
    """"Pre-LN is less stable than Peri-LN": at each learning rate, Pre-LN's run_stability() `above`
    counts against Peri-LN's by an exact one-sided rank test over seeds. A learning rate whose seeds can
    reach p <= level takes part, at level / (the number of those learning rates) (Bonferroni). Shown:
    some learning rate shows Pre-LN less stable and none the reverse; contradicted: the reverse; else
    not shown. Every learning rate's figures are printed, testable or not."""
    parts, testable, shown, contra = [], [], [], []
    for lr in sorted(groups):
        peri, pre = groups[lr]
        if not peri or not pre:
            continue
        p_shown = rank_test_greater([r["above"] for r in pre], [r["above"] for r in peri])
        p_contra = rank_test_greater([r["above"] for r in peri], [r["above"] for r in pre])
        parts.append(_group_text(lr, peri, pre, p_shown, p_contra))
        if _smallest_p(len(peri), len(pre)) <= level:
            testable.append((lr, p_shown, p_contra))
    per_test = level / len(testable) if testable else level
    for lr, p_shown, p_contra in testable:
        if p_shown <= per_test:
            shown.append(lr)
        elif p_contra <= per_test:
            contra.append(lr)
    status = SHOWN if shown and not contra else CONTRADICTED if contra and not shown else NOT_SHOWN
    if not testable:
        note = (f"No learning rate has seeds enough for a rank test to reach p <= {level:g} (3 per model are "
                "the fewest), so no verdict either way.")
    else:
        note = (f"Tested at lr {', '.join(f'{x:g}' for x, _, _ in testable)}, each at p <= {per_test:.3g}"
                + (f": Pre-LN less stable at lr {', '.join(f'{x:g}' for x in shown)}" if shown else "")
                + (f": Peri-LN less stable at lr {', '.join(f'{x:g}' for x in contra)}" if contra else "")
                + ("" if shown or contra else ": no difference beyond that") + ".")
    text = "; ".join(parts) + ". " + note if parts else "no runs of both models at one learning rate"
    return Verdict(status, text, {"tested": [x for x, _, _ in testable], "shown": shown, "contradicted": contra})

