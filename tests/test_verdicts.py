"""The verdict functions (periln_megatron/verdicts/) on synthetic numbers: each gives shown, not shown and
contradicted where it should, including a one-layer jump, scale without concentration, one seed (an
unknown tolerance) and seed spreads inside the noise. Pure Python: milliseconds."""

import math

import pytest

from periln_megatron.verdicts import CONTRADICTED, NOT_SHOWN, SHOWN, Verdict
from periln_megatron.verdicts.depth import concentration, growth_shape, massive_activations, variance_growth
from periln_megatron.verdicts.losses import best_lr_loss, loss_difference, lr_sensitivity, seed_variance
from periln_megatron.verdicts.stability import largest_spike, run_stability, stability
from periln_megatron.verdicts.stats import (betainc, f_cdf, f_ppf, f_sf, rank_test_greater, seeds_for_power,
                                            variance_ratio_power)

EMB = 0.005                                      # both models' embedding variance: tiny
LINEAR = [EMB] + [2.0 * i for i in range(1, 25)]  # Peri-LN-like: each sublayer adds about the same
EXPONENTIAL = [EMB] + [0.5 * 1.6 ** i for i in range(24)]
# the held-out corpus's Pre-LN: layer 1's MLP writes RMS 46.8, then the stream grows 1.44x over 23 layers
JUMP = [EMB, 2190.0] + [2190.0 * (1 + 0.44 * i / 23) for i in range(1, 24)]
JUMP_MLP = [None, 46.8] + [1.0] * 23
ONES = [None] + [1.0] * 24


# ----------------------------------------------------------------------------- statistics

def test_f_distribution_matches_reference_values():
    # scipy.stats.f values (scipy is not a dependency of the package)
    assert f_sf(1.83, 1, 1) == pytest.approx(0.405251111213152, abs=1e-12)
    assert f_cdf(2.0, 3, 7) == pytest.approx(0.7973063575133491, abs=1e-12)
    assert f_ppf(0.95, 1, 1) == pytest.approx(161.4476387975882, rel=1e-9)
    assert f_ppf(0.95, 4, 4) == pytest.approx(6.388232908695867, rel=1e-9)
    assert betainc(2.5, 1.5, 0.3) + betainc(1.5, 2.5, 0.7) == pytest.approx(1.0)
    assert f_cdf(0, 2, 2) == 0.0 and f_sf(math.inf, 2, 2) == 0.0
    # power grows with the seeds; no power for no effect
    assert variance_ratio_power(4.0, 15) >= 0.8 > variance_ratio_power(4.0, 14)
    assert seeds_for_power(4.0) == 15 and seeds_for_power(1.83) == 70 and seeds_for_power(1.0) is None


def test_exact_rank_test():
    assert rank_test_greater([23, 15, 15], [9, 6, 8]) == pytest.approx(1 / 20)  # complete separation, 3 vs 3
    assert rank_test_greater([1], [0]) == 0.5                                 # one seed each: never significant
    assert rank_test_greater([0, 0, 0], [0, 0, 0]) == 1.0                       # all tied
    assert rank_test_greater([math.inf, 3], [1, 2]) == pytest.approx(1 / 6)


# ----------------------------------------------------------------------------- variance growth

def test_variance_growth_shown_for_exponential_against_linear():
    pre, peri = growth_shape(EXPONENTIAL), growth_shape(LINEAR)
    assert pre["shape"] == "exponential" and peri["shape"] == "linear"
    assert pre["rate"] == pytest.approx(1.6) and not pre["jump"]  # a steep shape's last layer is no jump
    v = variance_growth(pre, peri)
    assert v.status == SHOWN, v.statistic
    assert "Pre-LN grows 4.95e+04x from layer 1 to 24 (exponential" in v.statistic


def test_variance_growth_one_layer_jump_is_contradicted_and_named():
    """Pre-LN's larger last-layer variance is one write by layer 1's MLP; from layer 1 Peri-LN grows more."""
    pre, peri = growth_shape(JUMP, ONES, JUMP_MLP), growth_shape(LINEAR, ONES, ONES)
    assert pre["jump"] and pre["jump_layer"] == 1 and pre["jump_sublayer"] == "MLP"
    assert pre["growth"] == pytest.approx(1.44) and pre["shape"] == "flat"
    v = variance_growth(pre, peri)
    assert v.status == CONTRADICTED, v.statistic
    assert "Growth ratio Pre-LN / Peri-LN 0.06" in v.statistic
    assert "Pre-LN 3.15e+03 against 48 (65.7x)" in v.statistic  # the scale, reported, not judged
    assert ("Pre-LN's variance is one layer's jump: layer 1's MLP write (output RMS 46.8) adds 69% of it: "
            "Pre-LN's excess at the last layer comes from that write.") in v.statistic


def test_variance_growth_not_shown_within_the_margin_and_when_peri_ln_is_exponential():
    similar = growth_shape([EMB] + [3.0 * i for i in range(1, 25)])
    assert variance_growth(similar, growth_shape(LINEAR)).status == NOT_SHOWN
    # Peri-LN exponential, Pre-LN linear and growing less, inside the margin: still contradicted by shape
    slow_exp = growth_shape([EMB] + [1.1 ** i for i in range(24)])
    steep_lin = growth_shape([EMB] + [1.0 + 0.3 * i for i in range(24)])
    assert slow_exp["shape"] == "exponential" and steep_lin["shape"] == "linear"
    assert 0.5 < steep_lin["growth"] / slow_exp["growth"] < 1
    assert variance_growth(steep_lin, slow_exp).status == CONTRADICTED
    assert variance_growth(None, growth_shape(LINEAR)).status == NOT_SHOWN
    assert growth_shape([EMB, 1.0]) is None


# ----------------------------------------------------------------------------- massive activations

def _conc(std: float, max_abs: float, share: float) -> dict:
    variance = [EMB] + [std * std] * 4
    maxes = [0.1] + [max_abs] * 4
    top = [None] + [[[7, share / 3], [3, share / 3], [1, share / 3]]] * 4
    return concentration(variance, maxes, top)


def test_massive_activations_judged_by_concentration_not_scale():
    # Pre-LN 3x the max|act| because its std is 3x: the same concentration, so not shown
    scale_only = massive_activations(_conc(30.0, 240.0, 0.15), _conc(10.0, 80.0, 0.15))
    assert scale_only.status == NOT_SHOWN, scale_only.statistic
    assert "max|act| 240 against 80 (3x), std 30 against 10 (3x)" in scale_only.statistic
    # concentrated outliers in Pre-LN, spread energy in Peri-LN
    assert massive_activations(_conc(10.0, 800.0, 0.6), _conc(10.0, 40.0, 0.1)).status == SHOWN
    # the reverse
    assert massive_activations(_conc(10.0, 40.0, 0.1), _conc(10.0, 800.0, 0.6)).status == CONTRADICTED
    # the held-out corpus: max/std 9 against 4.5, but top-3 share 15% against 37.5%: the measures disagree
    mixed = massive_activations(_conc(20.0, 180.0, 0.15), _conc(9.0, 40.5, 0.375))
    assert mixed.status == NOT_SHOWN and "The two measures disagree." in mixed.statistic
    assert "Pre-LN max|act|/std 9 at layer 1, top 3 dimensions 15.0% of its energy" in mixed.statistic


# ----------------------------------------------------------------------------- losses

def test_loss_difference_tolerance_from_the_seed_spread():
    # one seed per model: the tolerance is unknown, whatever the gap
    one = loss_difference([5.0], [5.3])
    assert one.status == NOT_SHOWN and "the tolerance is unknown" in one.statistic
    # two seeds each, SD 0.0707: tolerance 2 x 0.0707 x sqrt(1/2 + 1/2) = 0.141
    assert loss_difference([5.0, 5.1], [5.3, 5.4]).status == SHOWN
    noise = loss_difference([5.0, 5.1], [5.1, 5.2])
    assert noise.status == NOT_SHOWN and "tolerance 0.141 nats" in noise.statistic
    assert loss_difference([5.3, 5.4], [5.0, 5.1]).status == CONTRADICTED
    # a divergence is outside any loss noise, even with one seed
    assert loss_difference([5.0], [math.inf]).status == SHOWN
    assert loss_difference([math.inf], [5.0]).status == CONTRADICTED


def test_best_lr_and_lr_sensitivity():
    # the held-out corpus: seed SD ~0.08, a 0.15-nat gap in ranges over 2 learning rates is noise
    peri = {0.01: [6.30, 6.42], 0.03: [6.33]}
    pre = {0.01: [6.36, 6.46], 0.03: [6.55]}
    sens = lr_sensitivity(peri, pre)
    assert sens.status == NOT_SHOWN, sens.statistic
    assert "Range: Peri-LN 0.0300 nats, Pre-LN 0.1400 nats" in sens.statistic
    assert lr_sensitivity({0.01: [5.0, 5.01], 0.1: [5.05]}, {0.01: [5.0, 5.01], 0.1: [math.inf]}).status == SHOWN
    assert lr_sensitivity({0.01: [5.0, 5.01], 0.1: [6.0]}, {0.01: [5.0, 5.01], 0.1: [5.05]}).status == CONTRADICTED
    assert lr_sensitivity({0.01: [5.0]}, {0.01: [5.0]}).status == NOT_SHOWN
    assert "the tolerance is unknown" in lr_sensitivity({0.01: [5.0], 0.1: [5.1]}, {0.01: [5.0], 0.1: [6.0]}).statistic
    best = best_lr_loss(peri, pre)
    assert best.status == NOT_SHOWN and "Peri-LN 6.3300 (lr 0.03), Pre-LN 6.4100 (lr 0.01)" in best.statistic
    assert best_lr_loss({0.01: [5.0, 5.01], 0.1: [4.5]}, {0.01: [5.0, 5.01], 0.1: [5.1]}).status == SHOWN
    assert best_lr_loss({0.01: [5.0, 5.01], 0.1: [5.5]}, {0.01: [4.5, 4.51], 0.1: [5.1]}).status == CONTRADICTED


def test_seed_variance_needs_a_significant_f_test():
    # the held-out corpus's 2 seeds each: F = 1.83 on (1, 1), p ~ 0.4: not shown, and the seeds it would take
    two = seed_variance([6.30, 6.30 + 0.068 * math.sqrt(2)], [6.36, 6.36 + 0.092 * math.sqrt(2)])
    assert two.status == NOT_SHOWN
    assert "F = 1.83 on (1, 1) degrees of freedom, one-sided p = 0.405" in two.statistic
    assert "70 seeds per model would find it with 80% power" in two.statistic
    tight = [5.00, 5.01, 5.00, 5.01, 5.00, 5.01]
    wide = [5.0, 5.3, 4.8, 5.2, 4.9, 5.35]
    assert seed_variance(tight, wide).status == SHOWN
    assert seed_variance(wide, tight).status == CONTRADICTED
    assert seed_variance([5.0], [5.1, 5.2]).status == NOT_SHOWN


# ----------------------------------------------------------------------------- stability

def _run(above: int, peak: float = 14.0, spike: float = 3.0, max_act: float = 100.0, diverged: bool = False) -> dict:
    """100 logged steps, warm-up 10, initial loss 10; `above` steps after warm-up above it, from step 16."""
    losses = [10.0] + [9.0] * 99
    for i in range(15, 15 + above):
        losses[i] = peak if i == 15 else 10.5
    grads = [1.0] * 100
    grads[50] = spike
    return run_stability(list(range(1, 101)), losses, grads, 10, max_act, diverged)


def test_run_stability_figures():
    r = _run(9, spike=22.0, max_act=1e5)
    assert (r["above"], r["peak"], r["peak_step"], r["recovered"]) == (9, 14.0, 16, 25)
    assert (r["spike"], r["spike_step"], r["fp16"]) == (22.0, 51, True)
    calm = _run(0)
    assert calm["above"] == 0 and calm["recovered"] is None and not calm["excursion"]
    assert _run(0, diverged=True)["above"] == math.inf
    assert largest_spike([1.0, 1.0, 1.0]) == (0.0, None)  # too little history for a median


def test_stability_verdict_from_seeds():
    peri, pre = [_run(9), _run(6), _run(8)], [_run(23, 20.0, 22.0, 1e5), _run(15), _run(15)]
    v = stability({1.0: (peri, pre)})
    assert v.status == SHOWN, v.statistic
    assert "steps above the initial loss after warm-up 23, 15, 15" in v.statistic
    assert "largest grad norm / running median 22, 3, 3" in v.statistic and "1 of 3 runs" in v.statistic
    assert stability({1.0: (pre, peri)}).status == CONTRADICTED
    # one seed per model cannot reach p <= 0.05: figures printed, no verdict
    single = stability({1.0: (peri[:1], pre[:1])})
    assert single.status == NOT_SHOWN and "3 per model are the fewest" in single.statistic
    # two testable learning rates share the level (Bonferroni): 0.05 no longer passes 0.025
    assert stability({1.0: (peri, pre), 0.1: (peri, pre)}).status == NOT_SHOWN
    assert stability({1.0: ([_run(1)] * 3, [_run(1)] * 3)}).status == NOT_SHOWN


def test_a_verdict_status_is_one_of_three():
    with pytest.raises(ValueError):
        Verdict("reproduced", "")
