"""Verdicts on per-layer numbers: how the residual stream's variance grows with depth (its shape from
layer 1, and whether one layer's write makes most of it), and whether Pre-LN's largest activations are
concentrated outliers rather than overall scale.

Inputs are per-layer lists indexed 0..L as the trainer's diagnostics log them: index 0 is the
embedding output, index n the residual stream after layer n; sublayer lists hold None at index 0."""

from __future__ import annotations

import math
import statistics

from periln_megatron.verdicts import CONTRADICTED, NOT_SHOWN, SHOWN, Verdict
from periln_megatron.verdicts.stats import r_squared, slope

MARGIN = 2.0        # one model's figure at least twice the other's before a verdict leans either way
JUMP_SHARE = 0.5    # a one-layer jump: one layer adds at least half of a model's variance increase ...
JUMP_FACTOR = 4.0   # ... multiplying the variance by 4x the median factor of the other layers (not a steep shape)
FLAT_GROWTH = 2.0   # growth from layer 1 below this is called flat (no shape to fit)


def _finite(values: list) -> bool:
    return bool(values) and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def growth_shape(variance: list[float], attn_rms: list | None = None, mlp_rms: list | None = None) -> dict | None:
    """The variance's growth with depth from layer 1 (layer 0, the embedding, is left out: its variance
    is tiny in both models, so growth measured from it is the last layer's value again):

        growth        variance[L] / variance[1]
        r2_linear     R^2 of variance against depth (layers 1..L)
        r2_exp        R^2 of log variance against depth: higher than r2_linear for exponential growth
        rate          the fitted growth per layer, exp(slope of log variance)
        shape         flat (growth < FLAT_GROWTH), exponential (r2_exp > r2_linear) or linear
        jump_layer, jump_share
                      the layer adding the largest part of the increase from layer 0 and that share
        jump          True when that is a one-layer jump: a share of at least JUMP_SHARE, and a factor
                      variance[i] / variance[i-1] at least JUMP_FACTOR x the median of the other layers'
                      (an exponential's last layer also adds a large share, at the common factor)
        jump_sublayer, jump_rms
                      that layer's larger write ("attention" or "MLP") and its RMS, where given
    None without at least 3 finite values (layers 0..2)."""
    if len(variance) < 3 or not _finite(variance) or min(variance[1:]) <= 0:
        return None
    depth = list(range(1, len(variance)))
    body = variance[1:]
    logs = [math.log(v) for v in body]
    r2_lin, r2_exp = r_squared(depth, body), r_squared(depth, logs)
    growth = body[-1] / body[0]
    steps = [variance[i] - variance[i - 1] for i in range(1, len(variance))]
    total = variance[-1] - variance[0]
    jump = max(range(len(steps)), key=lambda i: steps[i]) + 1
    share = steps[jump - 1] / total if total > 0 else 0.0
    factors = [variance[i] / variance[i - 1] if variance[i - 1] > 0 else math.inf for i in range(1, len(variance))]
    typical = statistics.median(f for i, f in enumerate(factors, 1) if i != jump)
    sub, rms = None, None
    writes = [(r[jump], name) for r, name in ((attn_rms, "attention"), (mlp_rms, "MLP"))
              if r and jump < len(r) and isinstance(r[jump], (int, float))]
    if writes:
        rms, sub = max(writes)
    shape = "flat" if growth < FLAT_GROWTH else ("exponential" if r2_exp > r2_lin else "linear")
    return {"growth": growth, "r2_linear": r2_lin, "r2_exp": r2_exp, "rate": math.exp(slope(depth, logs)),
            "shape": shape, "jump_layer": jump, "jump_share": share,
            "jump": share >= JUMP_SHARE and factors[jump - 1] >= JUMP_FACTOR * typical,
            "jump_sublayer": sub, "jump_rms": rms,
            "last": variance[-1], "layers": len(variance) - 1}


def _describe(name: str, g: dict) -> str:
    return (f"{name} grows {g['growth']:.3g}x from layer 1 to {g['layers']} ({g['shape']}: R^2 {g['r2_linear']:.2f} "
            f"linear, {g['r2_exp']:.2f} in log; {g['rate']:.3g}x per layer); layer {g['jump_layer']} adds "
            f"{g['jump_share']:.0%} of its increase from layer 0")


def _jump_sentence(name: str, g: dict) -> str:
    where = f"layer {g['jump_layer']}" + (f"'s {g['jump_sublayer']} write" if g["jump_sublayer"] else "")
    rms = f" (output RMS {g['jump_rms']:.3g})" if g["jump_rms"] is not None else ""
    return f"{name}'s variance is one layer's jump: {where}{rms} adds {g['jump_share']:.0%} of it"


def variance_growth(pre: dict | None, peri: dict | None) -> Verdict:
    """"Pre-LN's variance grows far more with depth (exponentially) than Peri-LN's", from two
    growth_shape() results. Shown: Pre-LN's growth from layer 1 is at least MARGIN x Peri-LN's and
    Peri-LN is not the exponential one of the two; contradicted: Peri-LN's growth is at least MARGIN x
    Pre-LN's, or Peri-LN grows exponentially while Pre-LN does not and grows less; otherwise not shown.
    The last-layer variance ratio (scale) is reported, not judged; a one-layer jump is named."""
    if pre is None or peri is None:
        return Verdict(NOT_SHOWN, "no per-layer variance of both models")
    ratio = pre["growth"] / peri["growth"]
    pre_exp, peri_exp = pre["shape"] == "exponential", peri["shape"] == "exponential"
    if ratio >= MARGIN and not (peri_exp and not pre_exp):
        status = SHOWN
    elif ratio <= 1 / MARGIN or (peri_exp and not pre_exp and ratio < 1):
        status = CONTRADICTED
    else:
        status = NOT_SHOWN
    text = (f"{_describe('Pre-LN', pre)}; {_describe('Peri-LN', peri)}. Growth ratio Pre-LN / Peri-LN "
            f"{ratio:.3g} (a verdict needs {MARGIN:g}x either way). Last layer (scale, not judged): Pre-LN "
            f"{pre['last']:.3g} against {peri['last']:.3g} ({pre['last'] / peri['last']:.3g}x).")
    for name, g in (("Pre-LN", pre), ("Peri-LN", peri)):
        if g["jump"]:
            text += f" {_jump_sentence(name, g)}"
            other = peri if name == "Pre-LN" else pre
            if g["last"] > other["last"]:
                text += f": {name}'s excess at the last layer comes from that write"
            text += "."
    return Verdict(status, text, {"ratio": ratio, "pre": pre, "peri": peri})


def concentration(variance: list[float], max_abs: list[float], top_dims: list | None, layer: int | None = None
                  ) -> dict | None:
    """How concentrated the largest activations are at `layer` (default: the layer 1..L with the largest
    max|act|): max|act| / std of that layer, and the top dimensions' share of its sum of squares."""
    if len(max_abs) < 2 or len(variance) != len(max_abs):
        return None
    usable = [i for i in range(1, len(max_abs)) if isinstance(max_abs[i], (int, float))
              and isinstance(variance[i], (int, float)) and variance[i] > 0]
    if not usable:
        return None
    if layer is None:
        layer = max(usable, key=lambda i: max_abs[i])
    elif layer not in usable:
        return None
    std = math.sqrt(variance[layer])
    top = (top_dims[layer] if top_dims and layer < len(top_dims) else None) or []
    return {"layer": layer, "max_abs": max_abs[layer], "std": std, "max_over_std": max_abs[layer] / std,
            "top_share": sum(s for _, s in top) if top else None, "top_k": len(top)}


def massive_activations(pre: dict | None, peri: dict | None) -> Verdict:
    """"Pre-LN develops massive (outlier) activations, Peri-LN does not", judged by concentration, not
    scale: max|act|/std and the top-k dimensions' energy share at each model's peak layer. Shown: both
    point to Pre-LN (Pre-LN's top-k share not below Peri-LN's) and one of them by MARGIN x; contradicted:
    both point to Peri-LN, one by MARGIN x; otherwise not shown. The max|act| and std ratios (scale)
    are reported separately."""
    if pre is None or peri is None:
        return Verdict(NOT_SHOWN, "no per-layer max|act| of both models")
    by_max = pre["max_over_std"] / peri["max_over_std"]
    by_share = (pre["top_share"] / peri["top_share"]) if pre["top_share"] and peri["top_share"] else None
    ratios = [r for r in (by_max, by_share) if r is not None]
    if all(r >= 1 for r in ratios) and max(ratios) >= MARGIN:
        status = SHOWN
    elif all(r <= 1 for r in ratios) and min(ratios) <= 1 / MARGIN:
        status = CONTRADICTED
    else:
        status = NOT_SHOWN

    def one(name, c):
        share = f", top {c['top_k']} dimensions {c['top_share']:.1%} of its energy" if c["top_share"] else ""
        return f"{name} max|act|/std {c['max_over_std']:.3g} at layer {c['layer']}{share}"

    text = f"Concentration: {one('Pre-LN', pre)}; {one('Peri-LN', peri)}. Ratios Pre-LN / Peri-LN: max|act|/std " \
           f"{by_max:.3g}" + (f", top-dimension share {by_share:.3g}" if by_share is not None else "") + \
           f" (a verdict needs both on one side and one at {MARGIN:g}x)."
    if len(ratios) == 2 and (by_max - 1) * (by_share - 1) < 0:
        text += " The two measures disagree."
    text += (f" Scale, not judged: max|act| {pre['max_abs']:.4g} against {peri['max_abs']:.4g} "
             f"({pre['max_abs'] / peri['max_abs']:.3g}x), std {pre['std']:.3g} against {peri['std']:.3g} "
             f"({pre['std'] / peri['std']:.3g}x).")
    return Verdict(status, text, {"max_over_std_ratio": by_max, "top_share_ratio": by_share, "pre": pre, "peri": peri})
