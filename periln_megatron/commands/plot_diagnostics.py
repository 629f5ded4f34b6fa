"""Plot Peri-LN diagnostics from one or more training runs, overlaid (e.g. Peri-LN vs Pre-LN).

Each RUN_DIR is a trainer run directory holding metrics.jsonl and recipe.yaml (the recipe's `name`
and `model.placement` label the run). Writes into --out:

  variance_vs_depth.png   hidden-state variance after each layer, at several measured steps (log scale);
                          layer 0 is the embedding output
  max_abs_vs_depth.png    max |activation| after each layer ("massive activations"), same steps
  sublayers.png           RMS of the attention and MLP outputs before the residual add, and the mean
                          |gain| of the output norms (Peri-LN), per layer, at the last measured step
  fp16_headroom.png       max |activation| and the largest per-token sum of squares per layer, against
                          fp16's largest value 65504, at the last measured step
  loss.png                training loss per step, and valid_loss where present: one panel per learning
                          rate, one colour per model (seeds as thin lines); loss spikes marked on their
                          own run's curve
  grad_norm.png           global grad norm per step (grad-norm spikes marked on their own run's curve), and
                          per-layer grad norm at the last measured step (layer 0: the embedding)

The per-layer plots need a run trained with `diagnostics.interval > 0`; runs without diagnostics
still get loss and grad-norm curves. Runs logged before layer 0 was measured (lists of num_layers
values, not num_layers + 1) are drawn from layer 1.

metrics.jsonl is read by the one rule (periln_megatron/training/metrics.py): a killed and resumed
run's records replace the killed run's from the step it restarted at; a line cut short by the kill is
skipped with a warning naming file and line (a record the resumed run glued onto it is kept). Any
other line that is not a JSON record is refused (exit 2, file:line): damage that a kill cannot
explain could hide or misplace steps, and a plot drawn around it would misstate the run.
PERILN_DEBUG=1 shows tracebacks.

Example (periln-plot-diagnostics = python tools/plot_diagnostics.py; the plots are
periln_megatron/training/plots.py):
  periln-plot-diagnostics runs/peri-400m runs/pre-400m --out plots/400m
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]).rstrip() + "\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="a trainer run directory (metrics.jsonl + recipe.yaml); give several to overlay them")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory for the PNGs (created if needed)")
    parser.add_argument("--curves-also", nargs="+", default=[], metavar="RUN_DIR",
                        help="more runs (other seeds, learning rates) drawn only in the plots over steps: loss.png "
                             "and grad_norm.png's grad norm over steps")
    parser.add_argument("--steps", type=int, default=4, metavar="N",
                        help="how many measured steps the depth plots show per run (default 4: first to last)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")

    from periln_megatron.training.plots import PlotError, plot_runs

    try:
        written = plot_runs([Path(d) for d in args.run_dirs], Path(args.out), args.steps,
                            [Path(d) for d in args.curves_also])
    except PlotError as e:
        if os.environ.get("PERILN_DEBUG"):
            raise
        print(f"plot_diagnostics: error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
