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
  loss.png                training loss per step, and valid_loss where present; spikes marked
  grad_norm.png           global grad norm per step, and per-layer grad norm at the last measured step
                          (layer 0: the embedding)

The per-layer plots need a run trained with `diagnostics.interval > 0`; runs without diagnostics
still get loss and grad-norm curves. Runs logged before layer 0 was measured (lists of num_layers
values, not num_layers + 1) are drawn from layer 1.

A run killed while writing metrics.jsonl leaves its last line cut short: that line is skipped with a
warning naming file and line. If the run was then resumed, the trainer appended its next record to
the cut line: the cut part is skipped with a warning and the appended record kept. Any other line
that is not a JSON record is refused (exit 2, file:line): damage that a kill cannot explain could
hide or misplace steps, and a plot drawn around it would misstate the run. PERILN_DEBUG=1 shows
tracebacks.

Example (tools/plot_diagnostics.py is the same command):
  python -m periln_megatron.training.plots runs/peri-400m runs/pre-400m --out plots/400m
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import yaml  # noqa: E402

PALETTES = ("Blues", "Oranges", "Greens", "Purples", "Reds", "Greys")
SOLID = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:red", "tab:gray")


class PlotError(Exception):
    pass


class Run:
    def __init__(self, directory: Path, label: str | None = None):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise PlotError(f"{self.dir}: not a directory")
        recipe = self._recipe(self.dir / "recipe.yaml")
        self.label = label or self._label(recipe, self.dir)
        self.num_layers = (recipe.get("model") or {}).get("num_layers")
        self.records = self._records(self.dir / "metrics.jsonl")

    @staticmethod
    def _recipe(path: Path) -> dict:
        if not path.is_file():
            raise PlotError(f"{path}: not found (expected the recipe.yaml the trainer writes into its run dir)")
        try:
            recipe = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise PlotError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(recipe, dict):
            raise PlotError(f"{path}: expected a mapping, got {type(recipe).__name__}")
        return recipe

    @staticmethod
    def _label(recipe: dict, directory: Path) -> str:
        name = recipe.get("name") or directory.name
        placement = (recipe.get("model") or {}).get("placement")
        pretty = {"peri": "Peri-LN", "pre": "Pre-LN", "post": "Post-LN", "output": "Output-LN"}.get(placement, placement)
        return f"{name} ({pretty})" if pretty else str(name)

    def layers(self, values: list) -> list[int]:
        """The layer numbers of a per-layer list: 0..num_layers, or 1..num_layers for a run logged before
        layer 0 (the embedding output) was measured."""
        first = 1 if self.num_layers is not None and len(values) == self.num_layers else 0
        return list(range(first, first + len(values)))

    @staticmethod
    def _records(path: Path) -> dict[int, dict]:
        """step -> record; later lines (e.g. after a resume) override earlier ones key by key.
        A cut-off line left by a killed run is skipped with a warning (see the module docstring)."""
        if not path.is_file():
            raise PlotError(f"{path}: not found")
        out: dict[int, dict] = {}
        lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if lineno == len(lines):  # no newline after it: the write was cut short
                    warn(f"{path}:{lineno}: last line cut off (the run was killed while writing it?), skipped")
                    continue
                record = _appended_after_cut(line)
                # cut by a kill (printable text, as json.dumps writes); the trainer resumed on a new line
                if record is None and line.startswith(RECORD_START) and line.isprintable():
                    warn(f"{path}:{lineno}: a record cut off by a killed run (the resumed run went on at the next "
                         "line), skipped")
                    continue
                if record is None:
                    raise PlotError(f"{path}:{lineno}: invalid JSON: {e}") from None
                warn(f"{path}:{lineno}: a cut-off record (the run was killed while writing it) followed by the record "
                     f"of step {record['step']} (appended when it resumed): kept step {record['step']}, "
                     "skipped the cut part")
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise PlotError(f"{path}:{lineno}: expected an object with an integer `step`")
            out.setdefault(record["step"], {}).update(record)
        if not out:
            raise PlotError(f"{path}: no records")
        return dict(sorted(out.items()))

    def series(self, key: str) -> tuple[list[int], list]:
        steps = [s for s, r in self.records.items() if isinstance(r.get(key), (int, float))]
        return steps, [self.records[s][key] for s in steps]

    def measured(self, key: str) -> list[tuple[int, list]]:
        return [(s, r[key]) for s, r in self.records.items() if isinstance(r.get(key), list) and r[key]]


def warn(message: str) -> None:
    print(f"plot_diagnostics: warning: {message}", file=sys.stderr)


RECORD_START = '{"step": '  # how the trainer's json.dumps(record) begins


def _appended_after_cut(line: str) -> dict | None:
    """The record a resumed run appended to a line cut off by a kill (`{"step": 4, "lo{"step": 5, ...}`),
    or None if the line is not that."""
    start = line.rfind(RECORD_START)
    if start <= 0 or not line.startswith(RECORD_START):
        return None
    try:
        record = json.loads(line[start:])
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def pick_steps(steps: list[int], count: int) -> list[int]:
    """Up to `count` steps spread evenly over `steps`, always including the first and the last."""
    if len(steps) <= count:
        return steps
    if count == 1:
        return steps[-1:]
    picks = {steps[round(i * (len(steps) - 1) / (count - 1))] for i in range(count)}
    return sorted(picks)


def _clean(values: list) -> list[float]:
    return [float("nan") if v is None else v for v in values]


# Every plotting function returns what it drew, [(label, xs, ys), ...], empty if it drew nothing.
Drawn = list[tuple[str, list, list]]

LAYER_AXIS = "layer (0 = embedding output)"


def _plot(ax, drawn: Drawn, xs, ys, label: str, **kwargs) -> None:
    ax.plot(xs, ys, label=label, **kwargs)
    drawn.append((label, list(xs), list(ys)))


def depth_plot(runs: list[Run], key: str, ylabel: str, title: str, path: Path, num_steps: int) -> Drawn:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn: Drawn = []
    for i, run in enumerate(runs):
        measured = dict(run.measured(key))
        steps = pick_steps(list(measured), num_steps)
        cmap = plt.get_cmap(PALETTES[i % len(PALETTES)])
        for j, step in enumerate(steps):
            values = _clean(measured[step])
            shade = 0.35 + 0.6 * (j + 1) / len(steps)
            _plot(ax, drawn, run.layers(values), values, f"{run.label}, step {step}", marker="o", markersize=3,
                  color=cmap(shade))
    if not drawn:
        plt.close(fig)
        return drawn
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(LAYER_AXIS)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=max(1, len(runs)))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def sublayer_plot(runs: list[Run], path: Path) -> Drawn:
    """Left: RMS of each sublayer's output before the residual add; right: mean |gain| of the output norms."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    drawn: Drawn = []
    gains: Drawn = []
    for i, run in enumerate(runs):
        color = SOLID[i % len(SOLID)]
        for key, name, style, ax, out in (("attn_out_rms", "attention", "-", left, drawn),
                                          ("mlp_out_rms", "MLP", "--", left, drawn),
                                          ("attn_out_gain", "attention", "-", right, gains),
                                          ("mlp_out_gain", "MLP", "--", right, gains)):
            measured = run.measured(key)
            if not measured:
                continue
            step, values = measured[-1]
            points = [(x, v) for x, v in zip(run.layers(values), values) if isinstance(v, (int, float))]
            if points:
                _plot(ax, out, [x for x, _ in points], [v for _, v in points], f"{run.label} {name}, step {step}",
                      color=color, linestyle=style, marker="o", markersize=3)
    if not (drawn or gains):
        plt.close(fig)
        return []
    left.set_title("Sublayer output RMS, before the residual add")
    left.set_ylabel("RMS")
    right.set_title("Output-norm gain, mean |gamma|")
    right.set_ylabel("mean |gamma|")
    right.ticklabel_format(axis="y", useOffset=False)
    for ax, data in ((left, drawn), (right, gains)):
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, which="both", alpha=0.3)
        if data:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no output norms in these runs (Pre-LN has none)", ha="center", va="center",
                    transform=ax.transAxes)
    left.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn + gains


FP16_MAX = 65504.0


def fp16_plot(runs: list[Run], path: Path) -> Drawn:
    """max |activation| and the largest per-token sum of squares per layer, against fp16's largest value."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn: Drawn = []
    for i, run in enumerate(runs):
        color = SOLID[i % len(SOLID)]
        for key, name, style in (("layer_max_abs", "max |activation|", "-"),
                                 ("layer_max_token_sumsq", "max token sum of squares", "--")):
            measured = run.measured(key)
            if measured:
                step, values = measured[-1]
                values = _clean(values)
                _plot(ax, drawn, run.layers(values), values, f"{run.label} {name}, step {step}", color=color,
                      linestyle=style, marker="o", markersize=3)
    if not drawn:
        plt.close(fig)
        return drawn
    ax.axhline(FP16_MAX, color="red", linewidth=1)
    ax.text(0.01, FP16_MAX, " fp16 max 65504", color="red", va="bottom", transform=ax.get_yaxis_transform())
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(LAYER_AXIS)
    ax.set_ylabel("value")
    ax.set_title("fp16 headroom of the residual stream")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def loss_plot(runs: list[Run], path: Path) -> Drawn:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn: Drawn = []
    for i, run in enumerate(runs):
        color = SOLID[i % len(SOLID)]
        steps, losses = run.series("loss")
        if steps:
            _plot(ax, drawn, steps, losses, f"{run.label} train", color=color)
        vsteps, vlosses = run.series("valid_loss")
        if vsteps:
            _plot(ax, drawn, vsteps, vlosses, f"{run.label} valid", color=color, linestyle="--", marker="s",
                  markersize=3)
        spikes = [s for s in steps if run.records[s].get("spike")]
        if spikes:
            ax.scatter(spikes, [run.records[s]["loss"] for s in spikes], marker="x", color="red", zorder=3,
                       label=f"{run.label} spikes")
    if not drawn:
        plt.close(fig)
        return drawn
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def grad_plot(runs: list[Run], path: Path) -> Drawn:
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    drawn_left: Drawn = []
    drawn_right: Drawn = []
    for i, run in enumerate(runs):
        color = SOLID[i % len(SOLID)]
        steps, norms = run.series("grad_norm")
        finite = [(s, n) for s, n in zip(steps, norms) if n == n and n > 0]
        if finite:
            _plot(left, drawn_left, [s for s, _ in finite], [n for _, n in finite], run.label, color=color)
        measured = run.measured("layer_grad_norm")
        if measured:
            step, values = measured[-1]
            values = _clean(values)
            _plot(right, drawn_right, run.layers(values), values, f"{run.label}, step {step}", color=color,
                  marker="o", markersize=3)
    if not (drawn_left or drawn_right):
        plt.close(fig)
        return []
    left.set_title("Global grad norm (before clipping)")
    left.set_xlabel("step")
    right.set_title("Per-layer grad norm, last measured step")
    right.set_xlabel("layer (0 = embedding)")
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax, drawn in ((left, drawn_left), (right, drawn_right)):
        if drawn:
            ax.set_yscale("log")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data (diagnostics.interval = 0?)", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_ylabel("grad norm")
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn_left + drawn_right


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]).rstrip() + "\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="a trainer run directory (metrics.jsonl + recipe.yaml); give several to overlay them")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory for the PNGs (created if needed)")
    parser.add_argument("--steps", type=int, default=4, metavar="N",
                        help="how many measured steps the depth plots show per run (default 4: first to last)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    try:
        runs = [Run(Path(d)) for d in args.run_dirs]
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        plots = [
            ("variance_vs_depth.png", lambda p: depth_plot(runs, "layer_variance", "variance of the residual stream",
                                                           "Hidden-state variance vs depth", p, args.steps)),
            ("max_abs_vs_depth.png", lambda p: depth_plot(runs, "layer_max_abs", "max |activation|",
                                                          "Max activation vs depth", p, args.steps)),
            ("sublayers.png", lambda p: sublayer_plot(runs, p)),
            ("fp16_headroom.png", lambda p: fp16_plot(runs, p)),
            ("loss.png", lambda p: loss_plot(runs, p)),
            ("grad_norm.png", lambda p: grad_plot(runs, p)),
        ]
        for name, draw in plots:
            if draw(out / name):
                written.append(out / name)
            else:
                print(f"plot_diagnostics: {name}: no data in {', '.join(str(r.dir) for r in runs)}, skipped",
                      file=sys.stderr)
    except PlotError as e:
        if os.environ.get("PERILN_DEBUG"):
            raise
        print(f"plot_diagnostics: error: {e}", file=sys.stderr)
        return 2
    if not written:
        print("plot_diagnostics: error: nothing to plot", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
