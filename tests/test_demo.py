"""`make demo`: the findings classifier on synthetic metric files (shown, contradicted, not shown), the warnings, the
degeneracy check, the held-back prompt, the shipped base recipe, and a reduced demo end to end (the
`quick` preset), from the checkout and from an installed wheel in another directory."""

import csv
import json
import sys
from pathlib import Path

import pytest
import yaml

from launch import run

from periln_megatron.demo.__main__ import PRESETS, parse_args, plan
from periln_megatron.demo.corpus import (CorpusStats, build_corpus, heldout_document, near_duplicates, sample_prompt,
                                         split_bounds)
from periln_megatron.demo.findings import classify as classify_runs
from periln_megatron.demo.findings import peak as find_peak
from periln_megatron.demo.report import activation_lines, long_preset_hint
from periln_megatron.demo.report import warnings as report_warnings
from periln_megatron.demo.runner import BASE_RECIPE, recipe_overrides
from periln_megatron.demo.sample import degeneracy
from periln_megatron.demo.summary import summarise_run

PNG = b"\x89PNG\r\n\x1a\n"
LAYERS = 4
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- synthetic runs

def layer_record(step: int, variance: list, max_abs: list, placement: str, sub_max=None, top=0.65) -> dict:
    """A measured step's per-layer lists as the trainer logs them (index 0: the embedding output)."""
    n = len(variance)
    sub = [None] + [1.0] * (n - 1)
    return {"step": step, "layer_variance": variance, "layer_max_abs": max_abs,
            "layer_max_token_sumsq": [m * m * 2 for m in max_abs], "layer_grad_norm": [0.1] * n,
            "layer_max_abs_dim": [7] * n,
            "layer_top_dims": [[[7, top * 10 / 13], [3, top * 2 / 13], [1, top / 13]]] * n,
            "attn_out_rms": sub, "mlp_out_rms": sub, "attn_out_max_abs": sub,
            "mlp_out_max_abs": sub_max or sub,
            "attn_out_gain": sub if placement == "peri" else [None] * n,
            "mlp_out_gain": sub if placement == "peri" else [None] * n}


def make_run(root: Path, key: str, placement: str, *, lr=0.01, seed=1234, steps=100, variance=None, max_abs=None,
             valid=None, train=None, spikes=(), diverged_at=None, sub_max=None, valid_curve=None, top=0.65) -> Path:
    """A run directory like the demo's: recipe.yaml, metrics.jsonl, demo_outcome.json."""
    d = root / key
    d.mkdir(parents=True)
    recipe = {"name": f"demo-{key}", "model": {"placement": placement, "num_layers": LAYERS, "hidden_size": 64},
              "optim": {"lr": lr}, "train": {"seed": seed, "steps": steps}}
    (d / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    last = diverged_at - 1 if diverged_at else steps
    train = train or (lambda s: 6.0 - s / steps)
    records = {s: {"step": s, "loss": train(s)} for s in range(10, last + 1, 10)}
    for s, message in spikes:
        records.setdefault(s, {"step": s, "loss": train(s)})["spike"] = message
    for s, v in (valid_curve or []):
        records.setdefault(s, {"step": s, "loss": train(s)})["valid_loss"] = v
    if variance is not None:
        records.setdefault(last, {"step": last, "loss": train(last)}).update(
            layer_record(last, variance, max_abs, placement, sub_max, top))
    lines = [json.dumps(records[s]) for s in sorted(records)]
    if not diverged_at:
        lines.append(json.dumps({"step": steps, "final_valid_loss": valid}))
        outcome = {"status": "finished", "message": "", "steps": steps}
    else:
        outcome = {"status": "diverged", "message": f"step {diverged_at}: loss=nan grad_norm=nan", "steps": steps}
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (d / "demo_outcome.json").write_text(json.dumps(outcome))
    return d


FLAT = [1e-3, 2.0, 4.0, 6.0, 8.0]           # Peri-LN-like: linear growth after layer 0
STEEP = [1e-3, 10.0, 300.0, 3e3, 2e5]        # Pre-LN-like: exponential
SMALL_MAX, BIG_MAX = [0.1, 3.0, 5.0, 7.0, 9.0], [0.1, 900.0, 1500.0, 1400.0, 1600.0]


def excursion(s: int, steps: int = 100) -> float:
    """A training loss that climbs back above its initial value after warm-up (steps 40 to 60)."""
    return 6.0 - s / steps + (1.0 if 40 <= s <= 60 else 0.0)


def status(findings, word: str) -> str:
    (f,) = [f for f in findings if word in f.name]
    return f.status


def classify(root: Path, lr=0.01):
    runs = [summarise_run(d) for d in sorted(root.iterdir())]
    return classify_runs(runs, lr)


def favouring(root: Path, good: str, bad: str) -> None:
    """`good` (a placement) has linear variance growth, spread activations, a lower loss with a tight seed spread,
    no loss excursions and survives lr 0.1; `bad` the opposite, over 3 seeds at lr 0.01."""
    for i, (vg, vb) in enumerate([(5.000, 5.3), (5.001, 5.5), (5.002, 5.1)]):
        make_run(root, f"{good}_s{i}", good, seed=1234 + i, variance=FLAT, max_abs=SMALL_MAX, valid=vg, top=0.1)
        make_run(root, f"{bad}_s{i}", bad, seed=1234 + i, variance=STEEP, max_abs=BIG_MAX, valid=vb, top=0.65,
                 train=excursion, sub_max=[None, 800.0, 1.0, 1.0, 1.0], spikes=[(30, "grad_norm 9 > 3x median 1")])
    make_run(root, f"{good}_lr0.1", good, lr=0.1, variance=FLAT, max_abs=SMALL_MAX, valid=5.3)
    make_run(root, f"{bad}_lr0.1", bad, lr=0.1, diverged_at=40)


def test_classifier_shown_when_the_numbers_favour_peri_ln(tmp_path):
    favouring(tmp_path, "peri", "pre")
    findings = classify(tmp_path)
    assert [f.status for f in findings] == ["shown"] * 7, [f.line() for f in findings]
    assert "Pre-LN grows 2e+04x from layer 1 to 4 (exponential" in findings[0].evidence
    assert "Peri-LN grows 4x from layer 1 to 4 (linear" in findings[0].evidence
    assert "The other runs (not judged): lr 0.01 seed 1235: growth from layer 1 Pre-LN 2e+04x" in findings[0].evidence
    assert "Pre-LN max|act|/std 3.58 at layer 4, top 3 dimensions 65.0% of its energy" in findings[1].evidence
    assert "means of 3 / 3 seeds" in findings[2].evidence and "tolerance 0.231 nats" in findings[2].evidence
    assert "Pre-LN: steps above the initial loss after warm-up 3, 3, 3" in findings[3].evidence
    assert "Tested at lr 0.01, each at p <= 0.05: Pre-LN less stable at lr 0.01" in findings[3].evidence
    assert "Diverged: Peri-LN 0, Pre-LN 1 runs." in findings[3].evidence
    assert "Range: Peri-LN 0.2990 nats, Pre-LN unbounded (a run diverged)" in findings[5].evidence
    assert "F = 4e+04 on (2, 2) degrees of freedom" in findings[6].evidence
    # where the massive activation sits: its layer, the sublayer that writes it, the dimensions
    pre = summarise_run(tmp_path / "pre_s0")
    peak = find_peak(pre)
    assert (peak["layer"], peak["half_layer"], peak["dim"]) == (4, 1, 7)
    assert peak["write"] == {"value": 800.0, "layer": 1, "sublayer": "MLP"}
    (line,) = activation_lines(pre)
    assert "reaches half of that at layer 1" in line and "7 (50.0%)" in line
    assert "The largest single write is layer 1's MLP output, max|act| 800 before the residual add." in line
    assert "a token's sum of squares exceeds 65504" in line and "from layer 1 on" in line


def test_classifier_contradicted_when_the_numbers_favour_pre_ln(tmp_path):
    favouring(tmp_path, "pre", "peri")
    findings = classify(tmp_path)
    assert [f.status for f in findings] == ["contradicted"] * 7, [f.line() for f in findings]
    assert "Peri-LN less stable at lr 0.01" in findings[3].evidence


def test_classifier_not_shown_inside_the_noise_and_with_one_seed(tmp_path):
    make_run(tmp_path, "peri", "peri", variance=FLAT, max_abs=SMALL_MAX, valid=5.010)
    make_run(tmp_path, "pre", "pre", variance=[1e-3, 3, 6, 9, 12.0], max_abs=[0.1, 5, 10, 15, 12.0], valid=4.5)
    make_run(tmp_path, "peri_lr0.1", "peri", lr=0.1, variance=FLAT, max_abs=SMALL_MAX, valid=5.5)
    make_run(tmp_path, "pre_lr0.1", "pre", lr=0.1, variance=FLAT, max_abs=SMALL_MAX, valid=6.5)
    findings = classify(tmp_path)
    assert [f.status for f in findings] == ["not shown"] * 6, [f.line() for f in findings]
    # a 0.5-nat gap with one seed: the tolerance is unknown, so it is no verdict either way
    assert "the tolerance is unknown" in findings[2].evidence
    assert "3 per model are the fewest" in findings[3].evidence
    assert "seed to seed" not in " ".join(f.name for f in findings)  # needs 2 seeds per model
    # a main run that diverged gives no per-layer lists: nothing is claimed about depth
    other = tmp_path / "diverged"
    make_run(other, "peri", "peri", variance=FLAT, max_abs=SMALL_MAX, valid=5.0)
    make_run(other, "pre", "pre", diverged_at=20)
    findings = classify(other)
    assert [f.status for f in findings[:2]] == ["not shown", "not shown"]
    assert status(findings, "lower validation loss (lr") == "shown"  # a divergence is outside any loss noise


def test_warnings_for_too_many_epochs_and_overfitting(tmp_path):
    curve = [(20, 5.0), (40, 4.8), (60, 4.9), (80, 5.1)]
    make_run(tmp_path, "pre", "pre", variance=FLAT, max_abs=SMALL_MAX, valid=5.1, valid_curve=curve)
    make_run(tmp_path, "peri", "peri", variance=FLAT, max_abs=SMALL_MAX, valid=4.7,
             valid_curve=[(20, 5.0), (40, 4.8), (60, 4.75), (80, 4.7)])
    runs = [summarise_run(tmp_path / k) for k in ("peri", "pre")]
    stats = CorpusStats(100, 60_000, 95, 50_000, 3000, 6.5)
    found = report_warnings(runs, stats, tokens_per_step=2048)
    assert len(found) == 2
    assert "100 steps x 2048 tokens = 204,800 tokens is 4.1 epochs" in found[0]
    assert "Pre-LN (lr 0.01, seed 1234): validation loss rose from 4.8000 (step 40) to 5.1000 (step 80)" in found[1]
    assert report_warnings(runs[:1], CorpusStats(100, 10**6, 95, 900_000, 3000, 6.5), 2048) == []
    # a validation split smaller than one evaluation pass is resampled
    (small,) = report_warnings(runs[:1], CorpusStats(100, 10**6, 95, 900_000, 1235, 6.5), 2048, eval_iters=1)
    assert small.startswith("The validation split (1,235 tokens) is smaller than one evaluation pass (1 x 2,048")
    assert report_warnings(runs[:1], CorpusStats(100, 10**6, 95, 900_000, 4096, 6.5), 2048, eval_iters=2) == []
    # the --preset long hint says which corpus it was measured on, and what it would be on this one
    hint = long_preset_hint(stats, True)
    assert "the standard library's docstrings, 366,086 training tokens at vocabulary 2000" in hint
    assert "where its 3,072,000 tokens would be 61.4 epochs of the 50,000 training tokens" in long_preset_hint(stats,
                                                                                                             False)
    # the loss finding says which model was lower along the way, not only at the end
    loss = classify_runs(runs, 0.01)[2]
    assert loss.evidence.endswith("Peri-LN's validation loss was the lower one at 2 of 4 evaluations (steps 60, 80).")


def test_a_killed_and_resumed_run_is_read_through_the_one_metrics_reader(tmp_path, capsys):
    d = make_run(tmp_path, "pre", "pre", variance=FLAT, max_abs=SMALL_MAX, valid=5.0, steps=40)
    # killed at step 40 mid-line, resumed from its step-20 checkpoint: steps 30 and 40 are the resumed run's
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "lo\n{"step": 30, "loss": 9.0}\n{"step": 40, "loss": 8.0}\n'
                '{"step": 40, "final_valid_loss": 4.5}\n')
    run = summarise_run(d)
    assert run.train_curve == [(10, 5.75), (20, 5.5), (30, 9.0), (40, 8.0)] and run.valid_loss == 4.5
    assert run.measured_step is None  # the per-layer record of step 40 was the killed run's
    assert "a record cut off by a killed run, skipped" in capsys.readouterr().out
    (d / "metrics.jsonl").write_text('{"step": 1, "loss": 6.0}\ngarbage\n{"step": 2, "loss": 5.9}\n')
    with pytest.raises(SystemExit, match="^demo: .*metrics.jsonl:2: invalid JSON"):
        summarise_run(d)


def test_degeneracy():
    assert degeneracy([]) == "empty continuation"
    assert degeneracy([5] * 32) == "one token makes up 32 of 32 generated tokens"
    assert degeneracy([1, 2, 3, 4, 5, 6] * 5) == "22 of its 28 3-grams repeat an earlier one (it repeats itself)"
    # 7 of 30 3-grams repeated: under a quarter; 8 of 31: degenerate
    assert degeneracy(list(range(100, 123)) + [100, 101, 102, 103, 104, 105, 106, 107, 108]) is None
    assert "8 of its 31 3-grams" in degeneracy(list(range(100, 123)) + list(range(100, 109)) + [109])
    assert degeneracy(list(range(32))) is None
    assert degeneracy([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3, 11, 12, 13]) is None
    # a varied start that ends in a 3-token loop ("the same as the same as ...")
    assert "ends in a loop" in degeneracy(list(range(20)) + [50, 51, 52] * 4)
    assert degeneracy(list(range(20)) + [50, 51, 52] * 3 + [53, 54, 55]) is None


def test_corpus_holds_back_documents_and_the_prompt_is_their_start(tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text("\n\n".join(f"Document number {i} says word{i} and more words follow here." for i in range(120)))
    (tmp_path / "out").mkdir()
    corpus, heldout = build_corpus(tmp_path / "out", [str(text)])
    kept = [json.loads(l)["text"] for l in corpus.read_text().splitlines()]
    held = [json.loads(l)["text"] for l in heldout.read_text().splitlines()]
    assert len(kept) == 118 and len(held) == 2 and not set(kept) & set(held)
    prompt, truth, doc = sample_prompt(heldout)
    assert (prompt, doc) == ("Document number 49 says", 0) and truth.startswith("word49 and more")
    assert split_bounds([95, 5, 0], 2207) == [0, 2097, 2207, 2207]
    # the first held-back document that starts with plain words, not code
    code = tmp_path / "held.jsonl"
    code.write_text("\n".join(json.dumps({"text": t}) for t in ("x = f(y) + 1 and more", "Return the sum of all values")))
    assert sample_prompt(code) == ("Return the sum of", "all values", 1)
    # the near-duplicate check: the held-back document against the training documents, by shared word 8-grams
    doc = heldout_document(heldout, 0)
    assert near_duplicates(doc, corpus) == {"n": 8, "ngrams": 3, "share": 0.0, "doc": None, "anywhere": 0.0}
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps({"text": t}) for t in (
        "unrelated words " * 10, "Preface: " + doc.replace("word49", "word50"), doc + " and a tail")))
    dup = near_duplicates(doc, train)
    assert (dup["share"], dup["doc"], dup["anywhere"]) == (1.0, 2, 1.0)
    assert near_duplicates("too short to compare", train)["share"] is None


def test_arguments():
    args = parse_args(["--lr", "3e-2", "--sweep", "1e-2,1e-1", "--steps", "40", "--seeds", "2", "--hidden", "128"])
    assert (args.lr, args.sweep, args.steps, args.sweep_steps, args.seeds) == (0.03, [0.01, 0.1], 40, 40, 2)
    assert args.ffn == 352 and args.layers == PRESETS["default"]["layers"]  # the preset's FFN ratio, 176 / 64
    keys = [j.key for j in plan(args)]
    assert keys == ["peri", "pre", "peri_seed1235", "pre_seed1235", "peri_lr0.01", "pre_lr0.01", "peri_lr0.1",
                    "pre_lr0.1"]
    with pytest.raises(SystemExit):
        parse_args(["--hidden", "90"])  # not a multiple of the 4 heads
    # the stability preset: no gradient clipping at lr 1.0 over 3 seeds; every other preset clips at 1.0
    noclip = parse_args(["--preset", "noclip"])
    assert (noclip.clip_grad, noclip.lr, noclip.seeds, noclip.layers) == (0.0, 1.0, 3, 12) and args.clip_grad == 1.0
    noclip.eval_iters = 1
    job = plan(noclip)[0]
    assert "optim.clip_grad=0.0" in recipe_overrides(noclip, job, Path("r"), Path("d"), Path("t"))


def test_the_shipped_base_recipe_resolves_to_the_tiny_recipe(tmp_path):
    """The demo's recipe ships in the package (an installed wheel has no recipes/): with the demo's
    overrides it must stay the recipe the demo's runs used to get from recipes/tiny/peri_ln.yaml."""
    from periln_megatron.config import load_recipe

    args = parse_args(["--preset", "quick"])
    args.eval_iters = 3
    for job in plan(args):
        overrides = recipe_overrides(args, job, tmp_path / job.key, tmp_path / "data", tmp_path / "spm.model")
        shipped = load_recipe(BASE_RECIPE, overrides, check_environment=False).to_dict()
        tiny = load_recipe(REPO / "recipes/tiny/peri_ln.yaml", overrides, check_environment=False).to_dict()
        assert shipped == tiny and shipped["model"]["placement"] == job.placement


# ----------------------------------------------------------------------------- end to end

def test_an_installed_wheel_runs_the_demo_outside_the_checkout(tmp_path):
    """The wheel of `pip install .`, installed into a fresh venv, then `python -m periln_megatron.demo --preset quick` from another
    directory without PYTHONPATH: the demo needs no recipes/, no tools/ and no checkout. Its output is
    checked in full against the runs' metrics.jsonl (this was test_reduced_demo, run from the checkout:
    one quick demo serves both), and a second run resumes without retraining."""
    import shutil
    import sysconfig

    src = tmp_path / "src"  # a copy: an in-tree build would leave build/ (and stale modules) in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "periln_megatron", src / "periln_megatron", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)])
    # torch, megatron-core & co. come from this interpreter's site-packages (a plain path: its .pth files,
    # an editable install of this checkout among them, are not run), after the venv's own
    site = run([str(venv / "bin/python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    (Path(site.stdout.strip()) / "parent_site.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {"PYTHONPATH": ""}  # run() sets it to the checkout; Python ignores an empty one
    # the wheel is built by this interpreter's setuptools (a fresh venv's bundled one may predate bdist_wheel)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
         str(src)], env=env, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("periln_megatron-*.whl")
    run([str(venv / "bin/python"), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], env=env, timeout=600)
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = run([str(venv / "bin/python"), "-c", "import periln_megatron.demo as d; print(d.__file__)"], env=env,
                cwd=work)
    assert where.stdout.strip().startswith(str(venv)), where.stdout

    result = run([str(venv / "bin/python"), "-m", "periln_megatron.demo", "--preset", "quick", "--out", "out"],
                 env=env, cwd=work, timeout=900)
    assert "done in" in result.stdout, result.stdout[-4000:]
    assert "Peri-LN (lr 0.01, seed 1234, 6 steps): step 3/6" in result.stdout and "ETA" in result.stdout
    out = work / "out"
    report = (out / "report.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    runs = {}
    for placement in ("peri", "pre"):
        records = [json.loads(l) for l in (out / "runs" / placement / "metrics.jsonl").read_text().splitlines()]
        measured = [r for r in records if "layer_variance" in r]
        # layer 0 (the embedding output) in the JSONL
        assert measured and all(len(r["layer_variance"]) == LAYERS + 1 for r in measured)
        runs[placement] = summarise_run(out / "runs" / placement)
        assert summary["runs"][placement]["valid_loss"] == runs[placement].valid_loss > 0
    # layer 0 in the report's table, with the numbers of the JSONL
    row = [l for l in report.splitlines() if l.startswith("| 0 (embedding) |")]
    assert len(row) == 1
    assert f"| {runs['peri'].layer('layer_variance')[0]:.3g} | {runs['pre'].layer('layer_variance')[0]:.3g} |" in row[0]
    # every finding line is the classifier's, recomputed here from the run directories
    for finding in classify_runs(list(runs.values()), 0.01):
        assert finding.line() in report
    assert "Training: 6 steps of 8 x 64 = 512 tokens: 3,072 tokens seen" in report
    assert "## Parallelism check" in report and "(agree: difference" in report

    plots = sorted((out / "plots").glob("*.png"))
    assert {p.name for p in plots} >= {"variance_vs_depth.png", "max_abs_vs_depth.png", "sublayers.png",
                                       "fp16_headroom.png"}
    for plot in plots:
        assert plot.read_bytes()[:8] == PNG

    # the prompt is the start of a held-back document; the export loads in stock transformers
    prompt, truth, _ = sample_prompt(out / "heldout.jsonl")
    assert summary["sample"]["prompt"] == prompt and repr(prompt) in report
    corpus = (out / "corpus.jsonl").read_text()
    first_held = json.loads((out / "heldout.jsonl").read_text().splitlines()[0])["text"]
    assert json.dumps({"text": first_held}) not in corpus
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "hf_peri_ln")
    assert model.config.model_type == "hyperclovax" and model.config.num_hidden_layers == LAYERS
    assert "Greedy, 32 new tokens (" in report and repr(summary["sample"]["text"]) in report
    verdict = "no (" if degeneracy(summary["sample"]["ids"]) else "yes:"
    assert "## Export check" in report and f"Non-degenerate: {verdict}" in report
    assert "Near-duplicate check of the prompt's document: " in report
    assert "Matmul throughput of this machine: " in report and summary["timing"]["gemm_gflops"] > 0
    assert "## Loss and stability per run" in report and "## What this run shows" in report
    # the ladder's report of the demo's runs (demo/ladder.py): one aggregation of metrics.jsonl for both
    cells = {row["placement"]: row for row in csv.DictReader((out / "summary.csv").open())}
    assert set(cells) == {"peri", "pre"}
    for placement, row in cells.items():
        assert float(row["val_loss_mean"]) == runs[placement].valid_loss and row["n_seeds"] == "1", row
    assert "## Final validation loss: " in report and "- best LR for Peri-LN: 0.01 (" in report
    assert (out / "lr_sensitivity.png").read_bytes()[:8] == PNG

    # re-running resumes: nothing is retrained, the report is rewritten
    again = run([str(venv / "bin/python"), "-m", "periln_megatron.demo", "--preset", "quick", "--out", "out"],
                env=env, cwd=work, timeout=600)
    assert "corpus: " in again.stdout and "exists, kept" in again.stdout
    assert "finished earlier (finished), kept" in again.stdout and "step 1/" not in again.stdout


@pytest.mark.parametrize("on_spike", ["log", "rollback"])
def test_on_spike_choice_gives_a_valid_recipe(tmp_path, on_spike):
    """--on-spike rollback: every run rolls back on a spike or a non-finite loss, with a checkpoint every
    tenth of the run (the recipe the trainer would load validates); log changes nothing."""
    from periln_megatron.config.load import combine_overrides, load_recipe
    from periln_megatron.demo.runner import BASE_RECIPE, Job, recipe_overrides

    args = parse_args(["--preset", "noclip", "--on-spike", on_spike])
    args.eval_iters = 1
    job = Job("peri-s1", "peri", args.lr, 1234, args.steps, "main")
    sets = recipe_overrides(args, job, tmp_path / "run", tmp_path / "prefix", tmp_path / "spm.model")
    r = load_recipe(BASE_RECIPE, combine_overrides(sets, ["tokenizer.type=null", "tokenizer.model=null",
                                                          "data.synthetic=true", "data.prefixes=[]",
                                                          "model.vocab_size=512"]))
    assert r.optim.clip_grad == 0.0
    if on_spike == "rollback":
        assert (r.stability.on_spike, r.stability.on_nonfinite) == ("rollback", "rollback")
        assert r.checkpoint.interval == args.steps // 10
    else:
        assert r.stability.on_spike == "log" and r.checkpoint.interval == args.steps // 2
