"""A reduced `make demo`: the whole pipeline on the default (local) corpus with few steps."""

import json
import sys

from launch import run

PNG = b"\x89PNG\r\n\x1a\n"


def test_reduced_demo(tmp_path):
    out = tmp_path / "demo"
    result = run([sys.executable, "-m", "periln_megatron.demo", "--out", str(out), "--steps", "6"], timeout=900)
    assert "done in" in result.stdout, result.stdout[-4000:]

    report = (out / "report.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    for placement in ("peri", "pre"):
        s = summary[placement]
        assert s["valid_loss"] > 0 and len(s["layer_variance"]) == 12
        assert s["variance_ratio"] > 0 and s["growth_per_layer"] > 0
    # the report states the measured growth of both, whatever its direction
    assert f"{summary['pre']['variance_ratio']:.2f}x under Pre-LN" in report
    assert f"{summary['peri']['variance_ratio']:.2f}x under Peri-LN" in report

    plots = sorted((out / "plots").glob("*.png"))
    assert len(plots) >= 4
    import matplotlib.image

    for plot in plots:
        assert plot.read_bytes()[:8] == PNG
        assert matplotlib.image.imread(plot).shape[0] > 100

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "hf_peri_ln")
    assert model.config.model_type == "hyperclovax" and model.config.num_hidden_layers == 12
    assert "greedy:" in report

    # re-running resumes: nothing is retrained, the report is rewritten
    again = run([sys.executable, "-m", "periln_megatron.demo", "--out", str(out), "--steps", "6"], timeout=600)
    assert "corpus: " in again.stdout and "exists, kept" in again.stdout
    assert "training Peri-LN" in again.stdout and "step 1/" not in again.stdout
