"""What a demo's runs show of the paper's findings: one function per finding, each returning a Finding
(or None where the runs cannot speak to it). The judging is periln_megatron/verdicts/ (pure functions of
numbers, shared with any other report); here the runs are picked and the numbers handed over."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from periln_megatron.demo.summary import PLACEMENTS, RunSummary
from periln_megatron.verdicts import NOT_SHOWN
from periln_megatron.verdicts.depth import concentration, growth_shape, massive_activations, variance_growth
from periln_megatron.verdicts.losses import best_lr_loss, loss_difference, lr_sensitivity, seed_variance
from periln_megatron.verdicts.stability import run_stability, stability

NO_LAYERS = "no per-layer measurement of both models (a run diverged?)"


@dataclass
class Finding:
    name: str
    status: str       # shown | not shown | contradicted (periln_megatron/verdicts/)
    evidence: str     # the statistic the status follows from, in measured numbers
    values: dict = field(default_factory=dict)

    def line(self) -> str:
        return f"- **{self.name}: {self.status}.** {self.evidence}"


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


def main_runs(runs: list[RunSummary], lr: float) -> tuple[dict, dict]:
    """({placement: its runs at `lr`, all seeds}, {placement: the first seed's run at `lr` or None})."""
    at = {p: [r for r in runs if r.placement == p and math.isclose(r.lr, lr)] for p, _ in PLACEMENTS}
    return at, {p: min(at[p], key=lambda r: r.seed) if at[p] else None for p, _ in PLACEMENTS}


def _pairs(runs: list[RunSummary]) -> list[tuple[float, int, RunSummary, RunSummary]]:
    """(lr, seed, Peri-LN run, Pre-LN run) for every learning rate and seed both models have."""
    pre = {(round(r.lr, 12), r.seed): r for r in runs if r.placement == "pre"}
    return sorted(((r.lr, r.seed, r, pre[(round(r.lr, 12), r.seed)]) for r in runs
                   if r.placement == "peri" and (round(r.lr, 12), r.seed) in pre), key=lambda t: (t[0], t[1]))


def _shape(run: RunSummary) -> dict | None:
    return growth_shape(run.layer("layer_variance"), run.layer("attn_out_rms"), run.layer("mlp_out_rms"))


def _concentration(run: RunSummary) -> dict | None:
    return concentration(run.layer("layer_variance"), run.layer("layer_max_abs"), run.layer("layer_top_dims"))


def _others(runs: list[RunSummary], main: tuple[float, int], figure) -> str:
    """`figure(peri, pre)` (a short string or None) for every other (lr, seed) pair, reported, not judged."""
    parts = [f"lr {lr:g} seed {seed}: {text}" for lr, seed, p, q in _pairs(runs)
             if (lr, seed) != main and (text := figure(p, q))]
    return f" The other runs (not judged): {'; '.join(parts)}." if parts else ""


def _depth_finding(runs: list[RunSummary], lr: float, name: str, measure, judge, figure) -> Finding:
    """A per-layer finding of the first seed at `lr`: `measure(run)` gives its numbers (None without
    per-layer lists), `judge(pre, peri)` the verdict, `figure(peri, pre)` of two runs' numbers the short
    text shown for every other (lr, seed) pair."""
    peri, pre = main_runs(runs, lr)[1].values()
    mp, mq = (measure(peri) if peri else None), (measure(pre) if pre else None)
    if mp is None or mq is None:
        return Finding(name, NOT_SHOWN, NO_LAYERS)
    verdict = judge(mq, mp)

    def other(p, q):
        a, b = measure(p), measure(q)
        return figure(a, b) if a and b else None

    return Finding(name, verdict.status, f"Seed {peri.seed}, lr {lr:g}: {verdict.statistic}"
                   + _others(runs, (peri.lr, peri.seed), other), verdict.values)


def variance_finding(runs: list[RunSummary], lr: float) -> Finding:
    """The shape of the variance's growth with depth from layer 1 (first seed at `lr`)."""
    return _depth_finding(runs, lr, "Pre-LN's hidden-state variance grows far more (exponentially) with depth than "
                                    "Peri-LN's", _shape, variance_growth,
                          lambda a, b: f"growth from layer 1 Pre-LN {b['growth']:.3g}x, Peri-LN {a['growth']:.3g}x")


def massive_activation_finding(runs: list[RunSummary], lr: float) -> Finding:
    """Outlier concentration of the largest activations (first seed at `lr`)."""
    def figure(a, b):
        share = (f", top-dimension share {b['top_share']:.1%} / {a['top_share']:.1%}"
                 if a["top_share"] and b["top_share"] else "")
        return f"max|act|/std Pre-LN {b['max_over_std']:.3g}, Peri-LN {a['max_over_std']:.3g}{share}"

    return _depth_finding(runs, lr, "Pre-LN develops massive (concentrated outlier) activations, Peri-LN does not",
                          _concentration, massive_activations, figure)


def _loss(r: RunSummary) -> float | None:
    """The final validation loss; math.inf for a diverged run; None for one without either."""
    if r.status == "diverged":
        return math.inf
    return r.valid_loss


def loss_finding(runs: list[RunSummary], lr: float) -> Finding:
    """The final validation loss at `lr`, means over seeds, tolerance from their spread."""
    at, main = main_runs(runs, lr)
    name = f"Peri-LN reaches a lower validation loss (lr {lr:g})"
    lp = [x for x in map(_loss, at["peri"]) if x is not None]
    lq = [x for x in map(_loss, at["pre"]) if x is not None]
    if not lp or not lq:
        return Finding(name, NOT_SHOWN, "no final validation loss of both models")
    verdict = loss_difference(lp, lq)
    return Finding(name, verdict.status, verdict.statistic + _curves(main["peri"], main["pre"]), verdict.values)


def _by_lr(runs: list[RunSummary], lr: float) -> tuple[dict, dict] | None:
    """With runs at another learning rate than `lr`: ({lr: [loss per seed]} of Peri-LN, of Pre-LN) over
    the runs as long as the sweep's (--sweep-steps may differ from --steps)."""
    others = [r for r in runs if not math.isclose(r.lr, lr)]
    if not others:
        return None
    tables = tuple({} for _ in PLACEMENTS)
    for r in runs:
        if r.steps == others[0].steps and _loss(r) is not None:
            tables[0 if r.placement == "peri" else 1].setdefault(r.lr, []).append(_loss(r))
    return tables if len(set(tables[0]) & set(tables[1])) >= 2 else None


def best_lr_finding(runs: list[RunSummary], lr: float) -> Finding | None:
    """Each model's mean validation loss at its best learning rate."""
    tables = _by_lr(runs, lr)
    if tables is None:
        return None
    verdict = best_lr_loss(*tables)
    return Finding("Peri-LN reaches a lower validation loss, each model at its best learning rate", verdict.status,
                   verdict.statistic, verdict.values)


def lr_sensitivity_finding(runs: list[RunSummary], lr: float) -> Finding | None:
    """The range of each model's validation loss over the learning rates (a diverged run: unbounded)."""
    tables = _by_lr(runs, lr)
    if tables is None:
        return None
    verdict = lr_sensitivity(*tables)
    return Finding("Peri-LN is less sensitive to the learning rate", verdict.status, verdict.statistic, verdict.values)


def seed_spread_finding(runs: list[RunSummary], lr: float) -> Finding | None:
    """With several seeds at the main learning rate: an F-test of the seed-to-seed variance."""
    at = main_runs(runs, lr)[0]
    values = {p: [r.valid_loss for r in at[p] if r.valid_loss is not None] for p, _ in PLACEMENTS}
    if min(len(v) for v in values.values()) < 2:
        return None
    verdict = seed_variance(values["peri"], values["pre"])
    return Finding("Peri-LN's validation loss varies less from seed to seed", verdict.status, verdict.statistic,
                   verdict.values)


def run_figures(run: RunSummary) -> dict:
    """The stability figures of one run (periln_megatron/verdicts/stability.py's run_stability)."""
    steps = [s for s, _ in run.train_curve]
    grads = [g for _, g in (run.grad_curve or [])]
    return run_stability(steps, [l for _, l in run.train_curve], grads, run.warmup, run.peak_act,
                         run.status == "diverged")


def stability_finding(runs: list[RunSummary], lr: float) -> Finding:
    """Loss excursions after warm-up, divergences, grad-norm spike sizes and fp16 overflow, Peri-LN's runs
    against Pre-LN's at each learning rate (all seeds)."""
    groups: dict[float, tuple[list, list]] = {}
    for r in sorted(runs, key=lambda r: r.seed):
        key = next((x for x in groups if math.isclose(x, r.lr)), r.lr)
        groups.setdefault(key, ([], []))[0 if r.placement == "peri" else 1].append(run_figures(r))
    verdict = stability(groups)
    diverged = {p: sum(r.status == "diverged" for r in runs if r.placement == p) for p, _ in PLACEMENTS}
    text = verdict.statistic + f" Diverged: Peri-LN {diverged['peri']}, Pre-LN {diverged['pre']} runs."
    return Finding("Pre-LN is less stable (loss excursions, divergence) where Peri-LN trains fine", verdict.status,
                   text, verdict.values)


FINDINGS = (variance_finding, massive_activation_finding, loss_finding, stability_finding, best_lr_finding,
            lr_sensitivity_finding, seed_spread_finding)


def classify(runs: list[RunSummary], lr: float) -> list[Finding]:
    """What the runs show of the paper's findings. `runs`: every run (main, seeds, sweep); the
    comparison at `lr` uses the runs at that learning rate (all their seeds)."""
    return [f for f in (finding(runs, lr) for finding in FINDINGS) if f is not None]

