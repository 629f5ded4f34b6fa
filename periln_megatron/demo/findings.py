"""Which of the paper's findings a demo's runs reproduce: one function per finding, each returning a
Finding (or None where the runs cannot speak to it), all computed from the run summaries."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from periln_megatron.demo.summary import LABEL, PLACEMENTS, RunSummary

# What "far more", "equal" and "unstable" mean in the findings.
FAR_MORE = 10.0          # Pre-LN's figure at least 10x Peri-LN's
LOSS_TOLERANCE = 0.02    # nats: validation losses closer than this are called equal (one seed)
NO_LAYERS = "no per-layer measurement of both models (a run diverged?)"


@dataclass
class Finding:
    name: str
    status: str       # reproduced | not reproduced | partly | not shown
    evidence: str     # a sentence of measured numbers

    def line(self) -> str:
        return f"- **{self.name}: {self.status}.** {self.evidence}"


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf


def peak(run: RunSummary) -> dict | None:
    """Where the largest activation of the residual stream sits (layers 1..L): layer, value, the hidden
    dimension holding it and the top dimensions by energy share; the layer where the residual max first
    reaches half the peak; the largest single sublayer output (layer, attention or MLP, value)."""
    maxes = run.layer("layer_max_abs")
    if len(maxes) < 2 or None in maxes[1:]:
        return None
    layer = max(range(1, len(maxes)), key=lambda i: maxes[i])
    half = next(i for i in range(len(maxes)) if maxes[i] is not None and maxes[i] >= maxes[layer] / 2)
    writes = [(v, i, name) for key, name in (("attn_out_max_abs", "attention"), ("mlp_out_max_abs", "MLP"))
              for i, v in enumerate(run.layer(key)) if v is not None]
    write = max(writes) if writes else None
    top = run.layer("layer_top_dims")
    dims = run.layer("layer_max_abs_dim")
    return {"layer": layer, "value": maxes[layer], "half_layer": half,
            "write": {"value": write[0], "layer": write[1], "sublayer": write[2]} if write else None,
            "dim": dims[layer] if dims else None, "top_dims": top[layer] if top else None}


def _curves(peri: RunSummary | None, pre: RunSummary | None) -> str:
    """How the two validation curves compare over training (first seed): which model was lower when."""
    if peri is None or pre is None:
        return ""
    theirs = dict(pre.valid_curve)
    both = [(s, v, theirs[s]) for s, v in peri.valid_curve if s in theirs]
    if len(both) < 2:
        return ""
    lower = [s for s, vp, vq in both if vp < vq]
    return (f" Along training (seed {peri.seed}), Peri-LN's validation loss was the lower one at {len(lower)} of "
            f"{len(both)} evaluations" + (f" (steps {', '.join(map(str, lower))})." if lower else "."))


def _other_lrs(runs: list[RunSummary], lr: float, what: str) -> str:
    """The same comparison at the other learning rates tried (first seed), for the evidence; the verdict
    is the main learning rate's."""
    parts = []
    for x in sorted({r.lr for r in runs if not math.isclose(r.lr, lr)}):
        pair = {p: min((r for r in runs if r.placement == p and math.isclose(r.lr, x)), key=lambda r: r.seed,
                       default=None) for p, _ in PLACEMENTS}
        if None in pair.values():
            continue
        if what == "variance":
            vp, vq = pair["peri"].layer("layer_variance"), pair["pre"].layer("layer_variance")
            if vp and vq and vp[-1] and vq[-1]:
                parts.append(f"lr {x:g}: {vq[-1]:.3g} against {vp[-1]:.3g} ({_ratio(vq[-1], vp[-1]):.3g}x)")
        else:
            kp, kq = peak(pair["peri"]), peak(pair["pre"])
            if kp and kq:
                parts.append(f"lr {x:g}: Pre-LN {kq['value']:.4g}, Peri-LN {kp['value']:.4g} "
                             f"({_ratio(kq['value'], kp['value']):.3g}x)")
    if not parts:
        return ""
    return f" At the other learning rates (the verdict is lr {lr:g}'s): {'; '.join(parts)}."


def _loss_verdict(peri: float, pre: float, tol: float) -> tuple[str, str]:
    """(status, sentence end) for "Peri-LN's loss is equal or lower", within `tol` nats."""
    if peri < pre - tol:
        return "reproduced", f", lower by more than the tolerance {tol:.3f}."
    if peri <= pre + tol:
        return "reproduced", f", equal within the tolerance {tol:.3f} (not lower)."
    return "not reproduced", f", higher by more than the tolerance {tol:.3f}."


def loss_tolerance(peri: list[RunSummary], pre: list[RunSummary]) -> float:
    """LOSS_TOLERANCE, or with several seeds twice the larger seed-to-seed standard deviation if that is more."""
    spreads = [statistics.stdev(x) for x in ([r.valid_loss for r in peri if r.valid_loss is not None],
                                             [r.valid_loss for r in pre if r.valid_loss is not None]) if len(x) >= 2]
    return max([LOSS_TOLERANCE] + [2 * s for s in spreads])


def _loss(x: float) -> str:
    return "diverged" if x == math.inf else f"{x:.4f}"



def main_runs(runs: list[RunSummary], lr: float) -> tuple[dict, dict]:
    """({placement: its runs at `lr`, all seeds}, {placement: the first seed's run at `lr` or None})."""
    at = {p: [r for r in runs if r.placement == p and math.isclose(r.lr, lr)] for p, _ in PLACEMENTS}
    return at, {p: min(at[p], key=lambda r: r.seed) if at[p] else None for p, _ in PLACEMENTS}


def variance_finding(runs: list[RunSummary], lr: float) -> Finding:
    """Variance growth with depth (first seed at `lr`)."""
    peri, pre = main_runs(runs, lr)[1].values()
    name = "Pre-LN's hidden-state variance grows far more with depth than Peri-LN's"
    vp, vq = (peri.layer("layer_variance") if peri else []), (pre.layer("layer_variance") if pre else [])
    if len(vp) < 2 or len(vq) < 2 or None in (vp[0], vp[-1], vq[0], vq[-1]):
        return Finding(name, "not shown", NO_LAYERS)
    last = _ratio(vq[-1], vp[-1])
    growth_pre, growth_peri = _ratio(vq[-1], vq[0]), _ratio(vp[-1], vp[0])
    growth = _ratio(growth_pre, growth_peri)
    evidence = (f"At layer {len(vq) - 1} Pre-LN's variance is {vq[-1]:.3g} against Peri-LN's {vp[-1]:.3g} "
                f"({last:.3g}x); from layer 0 (the embedding output) it grows {growth_pre:.3g}x against "
                f"{growth_peri:.3g}x ({growth:.3g}x).")
    if last >= FAR_MORE and growth >= FAR_MORE:
        status = "reproduced"
    elif last <= 1 or growth <= 1:
        status = "not reproduced"
    else:
        status = "partly"
        evidence += f" Same direction, but not {FAR_MORE:g}x in both."
    return Finding(name, status, evidence + _other_lrs(runs, lr, "variance"))


def massive_activation_finding(runs: list[RunSummary], lr: float) -> Finding:
    """The largest activation of the residual stream (first seed at `lr`)."""
    peri, pre = main_runs(runs, lr)[1].values()
    name = "Pre-LN develops massive activations, Peri-LN keeps them bounded"
    kp, kq = (peak(peri) if peri else None), (peak(pre) if pre else None)
    if kp is None or kq is None:
        return Finding(name, "not shown", NO_LAYERS)
    ratio = _ratio(kq["value"], kp["value"])
    evidence = (f"Largest |activation|: Pre-LN {kq['value']:.4g} (layer {kq['layer']}), Peri-LN {kp['value']:.4g} "
                f"(layer {kp['layer']}), {ratio:.3g}x.")
    if ratio >= FAR_MORE:
        status = "reproduced"
    elif ratio <= 1:
        status = "not reproduced"
    else:
        status = "partly"
        evidence += f" Same direction, but less than {FAR_MORE:g}x."
    return Finding(name, status, evidence + _other_lrs(runs, lr, "max_abs"))


def loss_finding(runs: list[RunSummary], lr: float) -> Finding:
    """The final validation loss at the same learning rate (the mean over seeds)."""
    at, main = main_runs(runs, lr)
    name = f"Peri-LN reaches an equal or lower validation loss (lr {lr:g})"
    lp = [r.valid_loss for r in at["peri"] if r.valid_loss is not None]
    lq = [r.valid_loss for r in at["pre"] if r.valid_loss is not None]
    if not lp or not lq:
        diverged = [LABEL[p] for p, _ in PLACEMENTS if any(r.status == "diverged" for r in at[p])]
        return Finding(name, "not shown", f"no final validation loss from {' and '.join(diverged) or 'a run'} "
                                          "(diverged)")
    tol = loss_tolerance(at["peri"], at["pre"])
    mp, mq = statistics.mean(lp), statistics.mean(lq)
    seeds = f" (mean of {len(lp)} / {len(lq)} seeds)" if max(len(lp), len(lq)) > 1 else ""
    evidence = f"Peri-LN {mp:.4f}, Pre-LN {mq:.4f}{seeds}: Peri-LN is {mp - mq:+.4f} nats"
    status, verdict = _loss_verdict(mp, mq, tol)
    return Finding(name, status, evidence + verdict + _curves(main["peri"], main["pre"]))


def stability_finding(runs: list[RunSummary], lr: float) -> Finding:
    """Divergence and loss spikes over every learning rate tried."""
    name = "Pre-LN is less stable (divergence, loss spikes) where Peri-LN trains fine"
    lrs = sorted({r.lr for r in runs})
    worse, better = [], []  # learning rates where only Pre-LN / only Peri-LN was unstable
    for x in lrs:
        p = [r for r in runs if r.placement == "peri" and math.isclose(r.lr, x)]
        q = [r for r in runs if r.placement == "pre" and math.isclose(r.lr, x)]
        if not p or not q:
            continue
        if any(r.unstable for r in q) and not any(r.unstable for r in p):
            worse.append(x)
        if any(r.unstable for r in p) and not any(r.unstable for r in q):
            better.append(x)

    def events(p):
        rs = [r for r in runs if r.placement == p]
        return (f"{LABEL[p]}: {sum(r.status == 'diverged' for r in rs)} diverged, "
                f"{sum(len(r.loss_spikes) for r in rs)} loss spikes, {sum(len(r.grad_spikes) for r in rs)} "
                f"grad-norm spikes")

    evidence = f"Over {len(runs)} runs at lr {', '.join(f'{x:g}' for x in lrs)}: {events('peri')}; {events('pre')}."
    if worse and not better:
        status = "reproduced"
        evidence += f" Only Pre-LN was unstable at lr {', '.join(f'{x:g}' for x in worse)}."
    elif better and not worse:
        status = "not reproduced"
        evidence += f" Only Peri-LN was unstable at lr {', '.join(f'{x:g}' for x in better)}."
    elif worse and better:
        status = "not reproduced"
        evidence += (f" Mixed: only Pre-LN unstable at lr {', '.join(f'{x:g}' for x in worse)}, only Peri-LN at "
                     f"{', '.join(f'{x:g}' for x in better)}.")
    else:
        status = "not shown"
        evidence += " Neither model diverged or spiked where the other did not" + (
            "; try a learning-rate sweep (--sweep)." if len(lrs) == 1 else ".")
    return Finding(name, status, evidence)


def _sweep(runs: list[RunSummary], lr: float) -> tuple[str, list[float], dict] | None:
    """With runs at more than one learning rate (same steps, first seed): (where, the learning rates both
    models have, {placement: {lr: validation loss, inf where diverged}}), else None."""
    others = [r for r in runs if not math.isclose(r.lr, lr)]
    if not others:
        return None
    steps, seed = others[0].steps, min(r.seed for r in runs)
    pool = [r for r in runs if r.steps == steps and r.seed == seed]
    lrs = sorted({r.lr for r in pool})
    loss = {p: {r.lr: (r.valid_loss if r.valid_loss is not None else math.inf) for r in pool if r.placement == p}
            for p, _ in PLACEMENTS}
    lrs = [x for x in lrs if x in loss["peri"] and x in loss["pre"]]
    if len(lrs) < 2:
        return None
    return f"{steps}-step runs at lr {', '.join(f'{x:g}' for x in lrs)}", lrs, loss


def best_lr_finding(runs: list[RunSummary], lr: float) -> Finding | None:
    """The validation loss of each model at its best learning rate of the sweep."""
    sweep = _sweep(runs, lr)
    if sweep is None:
        return None
    where, lrs, loss = sweep
    best = {p: min(lrs, key=lambda x: loss[p][x]) for p, _ in PLACEMENTS}
    bp, bq = loss["peri"][best["peri"]], loss["pre"][best["pre"]]
    name = "Peri-LN reaches an equal or lower validation loss, each model at its best learning rate"
    evidence = (f"Over the {where}: Peri-LN {_loss(bp)} (lr {best['peri']:g}), Pre-LN {_loss(bq)} "
                f"(lr {best['pre']:g}): Peri-LN is {bp - bq:+.4f} nats")
    status, verdict = _loss_verdict(bp, bq, LOSS_TOLERANCE)
    return Finding(name, status, evidence + verdict)


def lr_sensitivity_finding(runs: list[RunSummary], lr: float) -> Finding | None:
    """The range of the validation loss over the sweep's learning rates (a diverged run: unbounded)."""
    sweep = _sweep(runs, lr)
    if sweep is None:
        return None
    where, lrs, loss = sweep
    spread = {p: max(loss[p][x] for x in lrs) - min(loss[p][x] for x in lrs) for p, _ in PLACEMENTS}
    name = "Peri-LN is less sensitive to the learning rate"
    cells = "; ".join(f"{LABEL[p]} " + ", ".join(f"{_loss(loss[p][x])}" for x in lrs) for p, _ in PLACEMENTS)
    evidence = (f"Validation loss over the {where}: {cells}. Range: Peri-LN {_loss(spread['peri'])}, "
                f"Pre-LN {_loss(spread['pre'])} nats.".replace("diverged nats", "unbounded (a run diverged)"))
    if spread["peri"] < spread["pre"] - LOSS_TOLERANCE:
        status = "reproduced"
    elif spread["peri"] > spread["pre"] + LOSS_TOLERANCE:
        status = "not reproduced"
    else:
        status = "not shown"
        evidence += f" The ranges are equal within {LOSS_TOLERANCE:g}."
    return Finding(name, status, evidence)


def seed_spread_finding(runs: list[RunSummary], lr: float) -> Finding | None:
    """With several seeds at the main learning rate: the seed-to-seed spread of the validation loss."""
    at = main_runs(runs, lr)[0]
    values = {p: [r.valid_loss for r in at[p] if r.valid_loss is not None] for p, _ in PLACEMENTS}
    if min(len(v) for v in values.values()) < 2:
        return None
    sd = {p: statistics.stdev(v) for p, v in values.items()}
    name = "Peri-LN's validation loss varies less from seed to seed"
    evidence = (f"Standard deviation over {len(values['peri'])} / {len(values['pre'])} seeds: Peri-LN "
                f"{sd['peri']:.4f}, Pre-LN {sd['pre']:.4f} nats (so few seeds make this a weak test).")
    status = "reproduced" if sd["peri"] < sd["pre"] else "not reproduced"
    return Finding(name, status, evidence)


FINDINGS = (variance_finding, massive_activation_finding, loss_finding, stability_finding, best_lr_finding,
            lr_sensitivity_finding, seed_spread_finding)


def classify(runs: list[RunSummary], lr: float) -> list[Finding]:
    """Which of the paper's findings the runs reproduce. `runs`: every run (main, seeds, sweep); the
    comparison at `lr` uses the runs at that learning rate (all their seeds)."""
    return [f for f in (finding(runs, lr) for finding in FINDINGS) if f is not None]
