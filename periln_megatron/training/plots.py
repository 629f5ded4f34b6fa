"""The diagnostics plots of tools/plot_diagnostics.py (periln-plot-diagnostics): one or more trainer
run directories (metrics.jsonl read by the one reader, periln_megatron/training/metrics.py, and
recipe.yaml for labels) overlaid in PNGs. `plot_runs` writes them all; each *_plot function returns
what it drew, so tests can check the numbers behind a picture."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import yaml  # noqa: E402

from periln_megatron.config.choices import PLACEMENT_NAMES  # noqa: E402
from periln_megatron.training.metrics import MetricsError, read_metrics  # noqa: E402

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
        self.placement = (recipe.get("model") or {}).get("placement")
        self.lr = (recipe.get("optim") or {}).get("lr")
        self.seed = (recipe.get("train") or {}).get("seed")
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
        pretty = PLACEMENT_NAMES.get(placement, placement)
        return f"{name} ({pretty})" if pretty else str(name)

    def layers(self, values: list) -> list[int]:
        """The layer numbers of a per-layer list: 0..num_layers, or 1..num_layers for a run logged before
        layer 0 (the embedding output) was measured."""
        first = 1 if self.num_layers is not None and len(values) == self.num_layers else 0
        return list(range(first, first + len(values)))

    @staticmethod
    def _records(path: Path) -> dict[int, dict]:
        """step -> record, by the one metrics.jsonl rule (periln_megatron/training/metrics.py)."""
        try:
            out = read_metrics(path, warn=warn)
        except MetricsError as e:
            raise PlotError(str(e)) from None
        if not out:
            raise PlotError(f"{path}: no records")
        return out

    def series(self, key: str) -> tuple[list[int], list]:
        steps = [s for s, r in self.records.items() if isinstance(r.get(key), (int, float))]
        return steps, [self.records[s][key] for s in steps]

    def measured(self, key: str) -> list[tuple[int, list]]:
        return [(s, r[key]) for s, r in self.records.items() if isinstance(r.get(key), list) and r[key]]


def warn(message: str) -> None:
    print(f"plot_diagnostics: warning: {message}", file=sys.stderr)


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


def curve_styles(runs: list[Run]) -> list[dict]:
    """Colour and line width of each run's curves over steps: one colour per placement when placement,
    learning rate and seed tell the runs apart (seeds of one model then share its colour, thin lines),
    else one colour per run."""
    keys = [(r.placement, r.lr, r.seed) for r in runs]
    by_placement = all(r.placement for r in runs) and len(set(keys)) == len(keys)
    order = list(dict.fromkeys(r.placement for r in runs))
    colours = [SOLID[order.index(r.placement) % len(SOLID)] if by_placement else SOLID[i % len(SOLID)]
               for i, r in enumerate(runs)]
    shared = {(c, r.lr): sum(1 for c2, r2 in zip(colours, runs) if (c2, r2.lr) == (c, r.lr))
              for c, r in zip(colours, runs)}
    return [{"color": c, "linewidth": 0.9 if shared[(c, r.lr)] > 1 else 1.6} for c, r in zip(colours, runs)]


def _lr_panels(runs: list[Run], title: str, width: float = 6.0):
    """One panel per learning rate (the runs' recipes), sharing the y axis: (fig, {lr: ax})."""
    lrs = sorted({r.lr for r in runs}, key=lambda x: (x is None, x or 0))
    fig, axes = plt.subplots(1, len(lrs), figsize=(width * len(lrs) ** 0.8 + 1, 4.5), sharey=True, squeeze=False)
    panels = dict(zip(lrs, axes[0]))
    for lr, ax in panels.items():
        ax.set_title(title + (f", lr {lr:g}" if lr is not None and len(lrs) > 1 else ""))
    return fig, panels


def _spikes(run: Run, kind: str) -> list[int]:
    """Steps whose trainer spike message names `kind` ("loss" or "grad_norm")."""
    return [s for s, r in run.records.items() if kind in str(r.get("spike") or "")]


SPIKE_MARKERS = ("X", "^", "s", "D", "v", "P")  # one per colour: two models' spikes differ in shape too


def _spike_markers(styles: list[dict]) -> dict:
    colours = dict.fromkeys(s["color"] for s in styles)
    return {c: SPIKE_MARKERS[i % len(SPIKE_MARKERS)] for i, c in enumerate(colours)}


def loss_plot(runs: list[Run], path: Path) -> Drawn:
    """Training loss (and valid_loss, dashed) of every run: one panel per learning rate, one colour per
    model, seeds as thin lines; loss spikes (the trainer's detector) marked on their own run's curve."""
    fig, panels = _lr_panels(runs, "Loss")
    drawn: Drawn = []
    styles = curve_styles(runs)
    markers = _spike_markers(styles)
    for run, style in zip(runs, styles):
        ax = panels[run.lr]
        steps, losses = run.series("loss")
        seed = f" seed {run.seed}" if run.seed is not None else ""
        if steps:
            _plot(ax, drawn, steps, losses, f"{run.label}{seed} train", **style)
        vsteps, vlosses = run.series("valid_loss")
        if vsteps:
            _plot(ax, drawn, vsteps, vlosses, f"{run.label}{seed} valid", linestyle="--", marker="s", markersize=3,
                  **style)
        _mark_spikes(ax, drawn, run, "loss", f"{run.label}{seed} loss spikes", style["color"], markers)
    if not drawn:
        plt.close(fig)
        return drawn
    for ax in panels.values():
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6)
    next(iter(panels.values())).set_ylabel("loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def _mark_spikes(ax, drawn: Drawn, run: Run, key: str, label: str, color, markers: dict) -> None:
    """`run`'s `key` spikes as markers on its own `key` curve, in its colour and its model's marker."""
    spikes = [s for s in _spikes(run, key) if isinstance(run.records[s].get(key), (int, float))]
    if spikes:
        ys = [run.records[s][key] for s in spikes]
        ax.scatter(spikes, ys, marker=markers[color], color=color, edgecolors="black", zorder=3, label=label)
        drawn.append((label, spikes, ys))


def grad_plot(runs: list[Run], path: Path, curve_runs: list[Run] | None = None) -> Drawn:
    """Left: the global grad norm over steps of `runs` and `curve_runs` (every run, colours as
    loss_plot, grad-norm spikes marked on their own run's curve); right: per-layer grad norm of `runs`
    at the last measured step."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    drawn_left: Drawn = []
    drawn_right: Drawn = []
    everyone = runs + (curve_runs or [])
    styles = curve_styles(everyone)
    markers = _spike_markers(styles)
    lrs = sorted({r.lr for r in everyone}, key=lambda x: (x is None, x or 0))
    dashes = {lr: ("-", "--", ":", "-.")[i % 4] for i, lr in enumerate(lrs)}  # one line style per learning rate
    multi_lr = len(lrs) > 1
    for run, style in zip(everyone, styles):
        steps, norms = run.series("grad_norm")
        finite = [(s, n) for s, n in zip(steps, norms) if n == n and n > 0]
        name = run.label + (f" lr {run.lr:g}" if multi_lr and run.lr is not None else "") + (
            f" seed {run.seed}" if curve_runs and run.seed is not None else "")
        if finite:
            _plot(left, drawn_left, [s for s, _ in finite], [n for _, n in finite], name, linestyle=dashes[run.lr],
                  **style)
        _mark_spikes(left, drawn_left, run, "grad_norm", f"{name} grad-norm spikes", style["color"], markers)
    for i, run in enumerate(runs):
        measured = run.measured("layer_grad_norm")
        if measured:
            step, values = measured[-1]
            values = _clean(values)
            _plot(right, drawn_right, run.layers(values), values, f"{run.label}, step {step}", color=styles[i]["color"],
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
            ax.legend(fontsize=6)
        else:
            ax.text(0.5, 0.5, "no data (diagnostics.interval = 0?)", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_ylabel("grad norm")
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn_left + drawn_right


def plot_runs(run_dirs: list[Path], out: Path, steps: int = 4, curve_dirs: list[Path] = ()) -> list[Path]:
    """Write every plot with data into `out` (created); the paths written. `curve_dirs`: more runs (other
    seeds, learning rates) drawn only in the plots over steps (loss.png, grad_norm.png's left panel). A
    plot without data is a warning; PlotError when a run cannot be read or nothing could be drawn."""
    runs = [Run(Path(d)) for d in run_dirs]
    curves = [Run(Path(d)) for d in curve_dirs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = [
        ("variance_vs_depth.png", lambda p: depth_plot(runs, "layer_variance", "variance of the residual stream",
                                                       "Hidden-state variance vs depth", p, steps)),
        ("max_abs_vs_depth.png", lambda p: depth_plot(runs, "layer_max_abs", "max |activation|",
                                                      "Max activation vs depth", p, steps)),
        ("sublayers.png", lambda p: sublayer_plot(runs, p)),
        ("fp16_headroom.png", lambda p: fp16_plot(runs, p)),
        ("loss.png", lambda p: loss_plot(runs + curves, p)),
        ("grad_norm.png", lambda p: grad_plot(runs, p, curves)),
    ]
    written = []
    for name, draw in plots:
        if draw(out / name):
            written.append(out / name)
        else:
            print(f"plot_diagnostics: {name}: no data in {', '.join(str(r.dir) for r in runs)}, skipped",
                  file=sys.stderr)
    if not written:
        raise PlotError("nothing to plot")
    return written
