"""Verdicts on the paper's findings, each a small pure function of measured numbers (no files, no torch),
so the demo's report and any other report (a scaling ladder's) judge alike.

Every verdict has one of three outcomes and prints the statistic it used:

    shown          the numbers favour the paper's claim beyond the stated margin or significance level
    not shown      within the noise (or the margin), or the noise is unknown (one seed)
    contradicted   the numbers point the other way beyond the same margin or level

Modules: stats.py (F distribution, exact rank test, fits), depth.py (variance growth shape, outlier
concentration), losses.py (loss comparisons with seed-spread tolerances, seed variance), stability.py
(loss excursions, grad-norm spike magnitudes, fp16 overflow).
"""

from __future__ import annotations

from dataclasses import dataclass, field

SHOWN, NOT_SHOWN, CONTRADICTED = "shown", "not shown", "contradicted"
STATUSES = (SHOWN, NOT_SHOWN, CONTRADICTED)


@dataclass
class Verdict:
    status: str                 # one of STATUSES
    statistic: str              # the sentence of numbers the status follows from
    values: dict = field(default_factory=dict)  # the same numbers, for summary.json

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"verdict status {self.status!r} is not one of {STATUSES}")
