"""The plots over steps (periln_megatron/training/plots.py) on synthetic run directories: every run drawn,
one panel per learning rate, one colour per model with seeds as thin lines, and spikes marked on the curve
of the run they belong to (loss spikes on the loss, grad-norm spikes on the grad norm). No training."""

import json
from pathlib import Path

import yaml

from periln_megatron.training import plots


def run_dir(root: Path, key: str, placement: str, lr: float, seed: int, spikes: dict | None = None) -> Path:
    d = root / key
    d.mkdir()
    recipe = {"name": f"demo-{key}", "model": {"placement": placement, "num_layers": 2},
              "optim": {"lr": lr}, "train": {"seed": seed}}
    (d / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    records = []
    for s in range(1, 21):
        record = {"step": s, "loss": 6.0 - s / 20 + seed % 7 / 100, "grad_norm": 1.0 + s / 100}
        if s in (spikes or {}):
            record["spike"] = spikes[s]
        records.append(record)
    (d / "metrics.jsonl").write_text("\n".join(map(json.dumps, records)) + "\n")
    return d


def test_every_run_in_the_curves_with_spikes_on_their_own_curve(tmp_path):
    dirs = [run_dir(tmp_path, "peri", "peri", 0.01, 1234), run_dir(tmp_path, "pre", "pre", 0.01, 1234,
                                                                    {7: "grad_norm 9 > 3x median 1"}),
            run_dir(tmp_path, "peri_seed1235", "peri", 0.01, 1235, {9: "loss 19 > 3x median 5"}),
            run_dir(tmp_path, "pre_seed1235", "pre", 0.01, 1235),
            run_dir(tmp_path, "peri_lr0.03", "peri", 0.03, 1234), run_dir(tmp_path, "pre_lr0.03", "pre", 0.03, 1234)]
    runs = [plots.Run(d) for d in dirs]
    styles = plots.curve_styles(runs)
    # one colour per model; the two seeds at lr 0.01 are thin lines, the single run at 0.03 is not
    assert [s["color"] for s in styles] == ["tab:blue", "tab:orange"] * 3
    assert [s["linewidth"] for s in styles] == [0.9] * 4 + [1.6] * 2
    drawn = plots.loss_plot(runs, tmp_path / "loss.png")
    assert len([label for label, _, _ in drawn if label.endswith(" train")]) == 6
    (spike,) = [d for d in drawn if "spikes" in d[0]]
    assert spike[0] == "demo-peri_seed1235 (Peri-LN) seed 1235 loss spikes" and spike[1] == [9]
    assert spike[2] == [runs[2].records[9]["loss"]]  # on that run's own curve
    grads = plots.grad_plot(runs[:2], tmp_path / "grad.png", runs[2:])
    (gspike,) = [d for d in grads if "spikes" in d[0]]
    assert gspike[0] == "demo-pre (Pre-LN) lr 0.01 seed 1234 grad-norm spikes" and gspike[2] == [1.07]
    assert len([d for d in grads if "spikes" not in d[0]]) == 6
    # the command-line tool: the other runs only in the plots over steps
    written = plots.plot_runs(dirs[:2], tmp_path / "out", curve_dirs=dirs[2:])
    assert {p.name for p in written} == {"loss.png", "grad_norm.png"}


def test_runs_that_placement_lr_and_seed_do_not_tell_apart_get_a_colour_each(tmp_path):
    runs = [plots.Run(run_dir(tmp_path, k, "peri", 0.01, 1234)) for k in ("a", "b")]
    assert [s["color"] for s in plots.curve_styles(runs)] == ["tab:blue", "tab:orange"]
