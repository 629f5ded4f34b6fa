"""Diagnostics: per-layer statistics (layer 0 = the embedding output; residual variance, max |activation|
and where it sits, fp16 headroom, sublayer output RMS, output-norm gains, grad norms), invariant under TP,
TP+SP, PP (and DP); the spike detector; plot_diagnostics on real Peri-LN and Pre-LN runs."""

import json
import math
import shutil
import struct
import sys
from pathlib import Path

import pytest

from launch import requeue, run, run_torchrun
from periln_megatron.training.metrics import read_metrics

from periln_megatron.training.diagnostics import LAYER_DIM_KEYS, LAYER_KEYS, SpikeDetector

TRAIN = ["-m", "periln_megatron.train", "--recipe"]
NUM_LAYERS = 4  # recipes/tiny
HIDDEN = 64


def records(run_dir: Path) -> dict[int, dict]:
    return read_metrics(run_dir)


# ----------------------------------------------------------------------------- spike detector

def test_spike_detector_flags_values_above_factor_times_running_median():
    det = SpikeDetector(window=4, factor=3.0, min_history=3)
    assert det.update(loss=10.0) == []  # not enough history yet: no verdict
    assert det.update(loss=100.0) == []
    assert det.update(loss=2.0) == []
    # history [10, 100, 2]: median 10; 29 is below 3x, 31 above
    assert det.update(loss=29.0) == []
    history = list(det.history["loss"])
    assert history == [10.0, 100.0, 2.0, 29.0]
    (msg,) = det.update(loss=200.0)  # window 4 -> median of [10, 100, 2, 29] = 19.5
    assert msg == "loss 200 > 3x median 19.5"
    assert list(det.history["loss"]) == [100.0, 2.0, 29.0, 200.0]  # the window slides, spikes included


def test_spike_detector_series_with_one_spike_per_quantity():
    det = SpikeDetector(window=50, factor=3.0)
    losses = [2.9 + (0.05 if i % 2 else -0.05) for i in range(30)]  # median 2.9
    grads = [1.0 + 0.02 * (i % 3) for i in range(30)]
    losses[20] = 9.1
    grads[25] = 5.0
    found = {}
    for step, (loss, grad) in enumerate(zip(losses, grads)):
        for msg in det.update(loss=loss, grad_norm=grad):
            found.setdefault(step, []).append(msg)
    assert sorted(found) == [20, 25]
    assert found[20] == ["loss 9.1 > 3x median 2.9"]
    assert found[25] == ["grad_norm 5 > 3x median 1.02"]


def test_spike_detector_ignores_missing_and_nonfinite():
    det = SpikeDetector(window=10, factor=2.0, min_history=2)
    for value in (1.0, None, float("nan"), 1.0, float("inf")):
        assert det.update(grad_norm=value) == []
    assert list(det.history["grad_norm"]) == [1.0, 1.0]
    assert det.update(grad_norm=2.5) == ["grad_norm 2.5 > 2x median 1"]
    with pytest.raises(ValueError):
        SpikeDetector(window=0)


# ----------------------------------------------------------------------------- real runs

@pytest.fixture(scope="module")
def tiny_runs(tiny_run, tmp_path_factory):
    """Peri-LN and Pre-LN tiny runs, 2 ranks at TP=1 (so DP=2). Peri-LN (the session's tiny_run,
    tests/fixtures.py) measures every step and saves at step 2, the starting point of the layout
    comparison; Pre-LN measures every 2nd step and logs every 3rd."""
    d = tmp_path_factory.mktemp("diag_runs") / "pre"
    run_torchrun(2, [*TRAIN, "recipes/tiny/pre_ln.yaml", "--set", "train.steps=4", "diagnostics.interval=2",
                     "logging.interval=3", f"checkpoint.dir={d}"], timeout=300)
    return {"peri": tiny_run, "pre": d}


def positive(values) -> bool:
    return all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in values)


def check_layer_lists(r: dict, placement: str = "peri") -> None:
    """Every per-layer list has layers 0..NUM_LAYERS, with values where they apply and None where not."""
    for key in (*LAYER_KEYS, *LAYER_DIM_KEYS):
        assert len(r[key]) == NUM_LAYERS + 1, (key, r[key])
    for key in ("layer_variance", "layer_max_abs", "layer_max_token_sumsq", "layer_grad_norm"):
        assert positive(r[key]), (key, r[key])  # layer 0 (the embedding output / embedding grads) included
    for key in ("attn_out_rms", "mlp_out_rms", "attn_out_max_abs", "mlp_out_max_abs"):
        assert r[key][0] is None and positive(r[key][1:]), (key, r[key])
    for key in ("attn_out_gain", "mlp_out_gain"):
        if placement == "peri":  # gains start at 1; a few small steps move them little
            assert r[key][0] is None and all(0.9 < g < 1.1 for g in r[key][1:]), (key, r[key])
        else:  # Pre-LN has no output norms
            assert r[key] == [None] * (NUM_LAYERS + 1), (key, r[key])
    if placement == "peri":  # an RMSNorm output with gains ~1 has RMS at most ~1 (below 1 where eps matters)
        assert all(v < 1.1 for v in r["attn_out_rms"][1:] + r["mlp_out_rms"][1:])
    # per-layer grads are a subset of all grads (the output layer and final norm excluded)
    assert math.sqrt(sum(g * g for g in r["layer_grad_norm"])) <= r["grad_norm"] * (1 + 1e-6)
    for var, mx, tok, dim, top, a_rms, m_rms, a_max, m_max in zip(
            *(r[k] for k in ("layer_variance", "layer_max_abs", "layer_max_token_sumsq", "layer_max_abs_dim",
                             "layer_top_dims", "attn_out_rms", "mlp_out_rms", "attn_out_max_abs", "mlp_out_max_abs"))):
        assert mx >= math.sqrt(var)  # a max is at least a standard deviation
        # the token holding the max has a sum of squares >= max^2; no token has more than hidden * max^2
        assert mx * mx * (1 - 1e-6) <= tok <= HIDDEN * mx * mx * (1 + 1e-6)
        assert isinstance(dim, int) and 0 <= dim < HIDDEN
        dims, shares = [d for d, _ in top], [s for _, s in top]
        assert len(set(dims)) == 3 and all(0 <= d < HIDDEN for d in dims)
        assert shares == sorted(shares, reverse=True) and shares[0] >= 1 / HIDDEN and sum(shares) <= 1 + 1e-6
        if a_rms is not None:
            assert a_max >= a_rms and m_max >= m_rms


def test_measured_steps_are_logged_with_complete_per_layer_lists(tiny_runs):
    peri, pre = records(tiny_runs["peri"]), records(tiny_runs["pre"])
    assert sorted(peri) == [1, 2, 3, 4]
    for r in peri.values():
        check_layer_lists(r)
    # Pre-LN: logging.interval=3 logs step 3 and the last; the measured steps 2 and 4 are logged anyway
    assert sorted(pre) == [2, 3, 4]
    assert not any(key in pre[3] for key in (*LAYER_KEYS, *LAYER_DIM_KEYS))
    check_layer_lists(pre[2], "pre")
    check_layer_lists(pre[4], "pre")


LAYOUTS = {
    "tp2": ["parallel.tp=2"],
    "tp2_sp": ["parallel.tp=2", "parallel.sequence_parallel=true"],
    "pp2": ["parallel.pp=2"],
}


@pytest.fixture(scope="module")
def layout_records(tiny_runs, tmp_path_factory):
    """Step 3 under each layout, resumed (resharded) from the TP=1 Peri-LN run's step-2 checkpoint: the
    same weights and the same global batch as that run's step 3, the reference."""
    source = tiny_runs["peri"]
    assert (source / "iter_0000002").is_dir()
    out = {}
    for name, layout in LAYOUTS.items():
        d = requeue(source, 2, tmp_path_factory.mktemp(f"layout_{name}"))
        result = run_torchrun(2, ["-m", "periln_megatron.train", "--recipe", "recipes/tiny/peri_ln.yaml", "--set",
                                  *layout, "train.steps=3", "diagnostics.interval=1", f"checkpoint.dir={d}",
                                  "checkpoint.save_at_end=false", "checkpoint.on_schedule_change=checkpoint"],
                              timeout=300)
        assert "resumed from iteration 2" in result.stdout
        out[name] = records(d)[3]
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_diagnostics_identical_across_layouts(tiny_runs, layout_records, layout):
    ref, got = records(tiny_runs["peri"])[3], layout_records[layout]
    check_layer_lists(got)
    for key in LAYER_KEYS:  # every per-layer figure, layer 0 (the embedding output) included
        assert got[key] == [v if v is None else pytest.approx(v, rel=1e-5, abs=1e-7) for v in ref[key]], key
    assert got["layer_max_abs_dim"] == ref["layer_max_abs_dim"]
    for top_got, top_ref in zip(got["layer_top_dims"], ref["layer_top_dims"]):
        assert [d for d, _ in top_got] == [d for d, _ in top_ref]
        assert [s for _, s in top_got] == pytest.approx([s for _, s in top_ref], rel=1e-5, abs=1e-6)
    # the step itself agrees too: the loss, and the global grad norm (gradients reduced over DP and SP)
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)


# ----------------------------------------------------------------------------- plotting

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_plot_diagnostics_writes_valid_pngs(tiny_runs, tmp_path):
    out = tmp_path / "plots"
    result = run([sys.executable, "tools/plot_diagnostics.py", str(tiny_runs["peri"]), str(tiny_runs["pre"]),
                  "--out", str(out)], timeout=120)
    names = {"variance_vs_depth.png", "max_abs_vs_depth.png", "sublayers.png", "fp16_headroom.png", "loss.png",
             "grad_norm.png"}
    assert {p.name for p in out.iterdir()} == names, result.stdout
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg

    for name in names:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE, name
        width, height = struct.unpack(">II", data[16:24])  # IHDR
        assert width > 100 and height > 100, name
        image = mpimg.imread(out / name)
        assert image.shape[:2] == (height, width) and image.std() > 0, name  # decodes, and is not blank


def load_plot_tool():
    """The plots behind tools/plot_diagnostics.py."""
    from periln_megatron.training import plots

    return plots


def test_plots_start_at_layer_0_the_embedding_output(tiny_runs, tmp_path):
    tool = load_plot_tool()
    runs = [tool.Run(tiny_runs["peri"]), tool.Run(tiny_runs["pre"])]
    last = {p: records(tiny_runs[p])[4] for p in ("peri", "pre")}
    for key in ("layer_variance", "layer_max_abs"):
        drawn = tool.depth_plot(runs, key, key, key, tmp_path / f"{key}.png", 4)
        for placement, run in zip(("peri", "pre"), runs):
            label, xs, ys = [d for d in drawn if d[0] == f"{run.label}, step 4"][0]
            assert xs == list(range(NUM_LAYERS + 1)) and ys == last[placement][key], (key, label)
    fp16 = tool.fp16_plot(runs, tmp_path / "fp16.png")
    assert all(xs[0] == 0 for _, xs, _ in fp16) and len(fp16) == 4
    grads = tool.grad_plot(runs, tmp_path / "grads.png")
    per_layer = [(xs, ys) for label, xs, ys in grads if "step 4" in label]
    assert [xs for xs, _ in per_layer] == [list(range(NUM_LAYERS + 1))] * 2
    # sublayers start at layer 1: RMS of both models (4 curves), then the gains, Peri-LN's only (2 curves)
    sub = tool.sublayer_plot(runs, tmp_path / "sub.png")
    assert [label for label, _, _ in sub] == [f"{run.label} {name}, step 4" for run in (*runs, runs[0])
                                              for name in ("attention", "MLP")]
    assert all(xs == list(range(1, NUM_LAYERS + 1)) for _, xs, _ in sub)
    assert [ys for _, _, ys in sub[4:]] == [last["peri"]["attn_out_gain"][1:], last["peri"]["mlp_out_gain"][1:]]
    # a run logged before layer 0 existed (num_layers values) is drawn from layer 1
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(tiny_runs["pre"] / "recipe.yaml", old / "recipe.yaml")
    (old / "metrics.jsonl").write_text(json.dumps({"step": 1, "layer_variance": [1.0, 2.0, 3.0, 4.0]}) + "\n")
    ((_, xs, _),) = tool.depth_plot([tool.Run(old)], "layer_variance", "v", "t", tmp_path / "old.png", 4)
    assert xs == [1, 2, 3, 4]


def test_plot_diagnostics_help_and_errors(tmp_path):
    tool = [sys.executable, "tools/plot_diagnostics.py"]
    helptext = run([*tool, "--help"]).stdout
    assert "RUN_DIR" in helptext and "--out" in helptext and "variance" in helptext
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "recipe.yaml").write_text("name: x\nmodel: {placement: peri}\n")
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n')
    result = run([*tool, str(tmp_path / "bad"), "--out", str(tmp_path / "o")], check=False)
    assert result.returncode == 2
    assert f"{tmp_path / 'bad' / 'metrics.jsonl'}:2: invalid JSON" in result.stdout
    result = run([*tool, str(tmp_path / "missing"), "--out", str(tmp_path / "o")], check=False)
    assert result.returncode == 2 and str(tmp_path / "missing") in result.stdout
