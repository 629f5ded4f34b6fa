"""Verdicts on validation losses, with tolerances from the measured seed-to-seed spread: the loss at one
learning rate, each model at its best learning rate, the sensitivity to the learning rate, and whether
Peri-LN's loss varies less from seed to seed (an F-test with its p-value and the seeds it would need).

Losses are given per model as {lr: [final validation loss per seed]}, math.inf for a run that diverged.
The tolerance of a comparison is TOLERANCE_SDS standard deviations of the compared quantity: a mean of
n seeds has the pooled seed SD / sqrt(n), and the SDs of the terms of a difference add in quadrature.
With one seed per model the spread, hence the tolerance, is unknown and a finite difference is "not shown".
"""

from __future__ import annotations

import math
import statistics

from periln_megatron.verdicts import CONTRADICTED, NOT_SHOWN, SHOWN, Verdict
from periln_megatron.verdicts.stats import LEVEL, POWER, f_sf, pooled_sd, seeds_for_power

TOLERANCE_SDS = 2.0
UNKNOWN = ("the tolerance is unknown: with one seed per model the seed-to-seed spread is not measured "
           "(give --seeds 2 or more)")


def _loss(x: float) -> str:
    return "diverged" if math.isinf(x) else f"{x:.4f}"


def seed_sd(*groups: list[float]) -> tuple[float | None, int]:
    """The pooled seed-to-seed SD of finite losses, over every group (a model at a learning rate) with
    at least 2 seeds, and its degrees of freedom."""
    return pooled_sd([[x for x in g if math.isfinite(x)] for g in groups])


def tolerance(sd: float | None, counts: list[int]) -> float | None:
    """TOLERANCE_SDS x the SD of a sum or difference of means over `counts` seeds each."""
    if sd is None:
        return None
    return TOLERANCE_SDS * sd * math.sqrt(sum(1 / n for n in counts))


def _judge(lower_is_claimed: float, other: float, tol: float | None) -> str:
    """SHOWN when `lower_is_claimed` is lower than `other` by more than `tol`, CONTRADICTED when higher by
    more; an infinite value (a divergence) decides without a tolerance."""
    if math.isinf(lower_is_claimed) or math.isinf(other):
        if math.isinf(lower_is_claimed) and math.isinf(other):
            return NOT_SHOWN
        return CONTRADICTED if math.isinf(lower_is_claimed) else SHOWN
    if tol is None:
        return NOT_SHOWN
    diff = lower_is_claimed - other
    return SHOWN if diff < -tol else CONTRADICTED if diff > tol else NOT_SHOWN


def _mean(values: list[float]) -> float:
    return math.inf if any(math.isinf(v) for v in values) else statistics.mean(values)


def _tolerance_text(sd, df, tol) -> str:
    if tol is None:
        return UNKNOWN
    return (f"tolerance {tol:.3f} nats ({TOLERANCE_SDS:g} x the difference's SD from the pooled seed SD "
            f"{sd:.4f}, {df} degree{'s' if df != 1 else ''} of freedom)")


def loss_difference(peri: list[float], pre: list[float], sd: float | None = None, df: int = 0) -> Verdict:
    """"Peri-LN reaches a lower validation loss": the means over seeds, within the tolerance from `sd`
    (default: the spread of these losses). Equal within the tolerance is "not shown"."""
    if sd is None:
        sd, df = seed_sd(peri, pre)
    mp, mq = _mean(peri), _mean(pre)
    tol = tolerance(sd, [len(peri), len(pre)])
    status = _judge(mp, mq, tol)
    seeds = f" (means of {len(peri)} / {len(pre)} seeds)" if max(len(peri), len(pre)) > 1 else ""
    diff = "" if math.isinf(mp) or math.isinf(mq) else f": Peri-LN {mp - mq:+.4f} nats"
    text = f"Peri-LN {_loss(mp)}, Pre-LN {_loss(mq)}{seeds}{diff}; {_tolerance_text(sd, df, tol)}."
    return Verdict(status, text, {"peri": mp, "pre": mq, "tolerance": tol, "seed_sd": sd})


def _means(by_lr: dict[float, list[float]]) -> dict[float, float]:
    return {lr: _mean(v) for lr, v in by_lr.items() if v}


def best_lr_loss(peri: dict[float, list[float]], pre: dict[float, list[float]]) -> Verdict:
    """Each model at its best learning rate (lowest mean loss): Peri-LN lower beyond the tolerance."""
    sd, df = seed_sd(*peri.values(), *pre.values())
    mp, mq = _means(peri), _means(pre)
    bp, bq = min(mp, key=mp.get), min(mq, key=mq.get)
    tol = tolerance(sd, [len(peri[bp]), len(pre[bq])])
    status = _judge(mp[bp], mq[bq], tol)
    diff = "" if math.isinf(mp[bp]) or math.isinf(mq[bq]) else f": Peri-LN {mp[bp] - mq[bq]:+.4f} nats"
    text = (f"Peri-LN {_loss(mp[bp])} (lr {bp:g}), Pre-LN {_loss(mq[bq])} (lr {bq:g}){diff}; "
            f"{_tolerance_text(sd, df, tol)}.")
    return Verdict(status, text, {"peri": mp[bp], "pre": mq[bq], "peri_lr": bp, "pre_lr": bq, "tolerance": tol})


def lr_sensitivity(peri: dict[float, list[float]], pre: dict[float, list[float]]) -> Verdict:
    """"Peri-LN is less sensitive to the learning rate": the range (max - min) of each model's mean loss
    over the learning rates both have; Peri-LN's smaller beyond the tolerance of a difference of ranges."""
    lrs = sorted(set(peri) & set(pre))
    if len(lrs) < 2:
        return Verdict(NOT_SHOWN, "fewer than 2 learning rates with runs of both models")
    sd, df = seed_sd(*peri.values(), *pre.values())
    mp, mq = _means({x: peri[x] for x in lrs}), _means({x: pre[x] for x in lrs})
    ranges, counts = {}, []
    for name, means, runs in (("peri", mp, peri), ("pre", mq, pre)):
        hi, lo = max(means, key=means.get), min(means, key=means.get)
        ranges[name] = means[hi] - means[lo]
        counts += [len(runs[hi]), len(runs[lo])]
    tol = tolerance(sd, counts)
    status = _judge(ranges["peri"], ranges["pre"], tol)
    cells = "; ".join(f"{name} " + ", ".join(_loss(m[x]) for x in lrs) for name, m in (("Peri-LN", mp), ("Pre-LN", mq)))
    span = lambda r: "unbounded (a run diverged)" if math.isinf(r) else f"{r:.4f} nats"  # noqa: E731
    text = (f"Loss at lr {', '.join(f'{x:g}' for x in lrs)}: {cells}. Range: Peri-LN {span(ranges['peri'])}, "
            f"Pre-LN {span(ranges['pre'])}; {_tolerance_text(sd, df, tol)}.")
    return Verdict(status, text, {"ranges": ranges, "tolerance": tol})


def seed_variance(peri: list[float], pre: list[float], level: float = LEVEL) -> Verdict:
    """"Peri-LN's loss varies less from seed to seed": F = Pre-LN's seed variance / Peri-LN's, one-sided
    p-values for either direction from the F distribution; shown (contradicted) at p <= `level` in
    Pre-LN's (Peri-LN's) direction. Also the seeds per model an F-test at `level` would need to find the
    measured ratio with POWER."""
    peri = [x for x in peri if math.isfinite(x)]
    pre = [x for x in pre if math.isfinite(x)]
    if len(peri) < 2 or len(pre) < 2:
        return Verdict(NOT_SHOWN, f"{len(peri)} / {len(pre)} finite seeds: an F-test needs 2 or more per model")
    vp, vq = statistics.variance(peri), statistics.variance(pre)
    d_peri, d_pre = len(peri) - 1, len(pre) - 1
    if vp == 0 and vq == 0:
        return Verdict(NOT_SHOWN, "both models' losses are identical across seeds")
    ratio = vq / vp if vp > 0 else math.inf
    p_shown = f_sf(ratio, d_pre, d_peri)
    p_contra = f_sf(1 / ratio, d_peri, d_pre) if ratio > 0 else 0.0
    status = SHOWN if p_shown <= level else CONTRADICTED if p_contra <= level else NOT_SHOWN
    effect = max(ratio, 1 / ratio) if ratio > 0 else math.inf
    need = seeds_for_power(effect, POWER, level)
    text = (f"SD over {len(peri)} / {len(pre)} seeds: Peri-LN {math.sqrt(vp):.4f}, Pre-LN {math.sqrt(vq):.4f} nats; "
            f"F = {ratio:.3g} on ({d_pre}, {d_peri}) degrees of freedom, one-sided p = {p_shown:.3g} "
            f"(Peri-LN varies less) / {p_contra:.3g} (more); a verdict needs p <= {level:g}. ")
    text += (f"At the measured ratio {effect:.3g}, {need} seeds per model would find it with {POWER:.0%} power."
             if need else f"At the measured ratio {effect:.3g}, no number of seeds up to 1000 gives {POWER:.0%} power.")
    return Verdict(status, text, {"f": ratio, "p": p_shown, "p_other_way": p_contra, "seeds_needed": need})
