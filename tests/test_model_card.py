"""The README.md model card and generation_config.json of tools/convert_to_hf.py, on checkpoints
trained here: every number in the card is the run's (metrics.jsonl, recipe.yaml) or the export's
(safetensors), and transformers still loads the directory."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

import corpus
from launch import REPO, run, run_torchrun

PY = sys.executable
STEPS, GBS, SEQ = 4, 8, 64  # recipes/tiny/peri_ln.yaml: global batch 8, seq 64


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    import sentencepiece

    prefix = tmp_path_factory.mktemp("spm") / "spm1k"
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus.data_file(corpus.TINYSHAKESPEARE)), model_prefix=str(prefix), vocab_size=1000,
        model_type="bpe", byte_fallback=True, input_sentence_size=20000, shuffle_input_sentence=True, minloglevel=2,
        num_threads=2)
    return prefix.with_suffix(".model")


def _train(ckpt: Path, *sets: str, steps: int = STEPS) -> None:
    run_torchrun(1, ["-m", "periln_megatron.train", "--recipe", str(REPO / "recipes/tiny/peri_ln.yaml"), "--set",
                     f"checkpoint.dir={ckpt}", f"train.steps={steps}", "diagnostics.interval=2",
                     "train.eval_interval=2", "train.eval_iters=1", *sets], timeout=300)


def _export(ckpt: Path, out: Path, *extra: str) -> str:
    return run([PY, "tools/convert_to_hf.py", str(ckpt), str(out), "--quiet", *extra], timeout=180).stdout


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _rows(card: str) -> dict[str, str]:
    """The card's two-column table rows, `| key | value |` -> {key: value}."""
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| (.+?) \| (.*) \|$", card, re.M)}


def _safetensors_numel(hf: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in hf.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                n = 1
                for d in st.get_slice(name).get_shape():
                    n *= d
                total += n
    return total


def _convert_tool():
    """tools/convert_to_hf.py's main, in this process (its exports here need no fresh interpreter)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_to_hf_tool", REPO / "tools" / "convert_to_hf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def trained(spm_model, tmp_path_factory) -> Path:
    """A Peri-LN run with a SentencePiece tokenizer, diagnostics and validation every 2 steps,
    checkpoints at 2 and 4; the checkpoint dir is the run dir (metrics.jsonl beside iter_*)."""
    ckpt = tmp_path_factory.mktemp("run") / "ckpt"
    _train(ckpt, "checkpoint.interval=2", "tokenizer.type=SentencePieceTokenizer", f"tokenizer.model={spm_model}",
           "model.vocab_size=null")
    assert (ckpt / "metrics.jsonl").is_file() and (ckpt / "iter_0000002").is_dir()
    return ckpt


def test_card_is_computed_from_the_run(trained, spm_model, tmp_path):
    import sentencepiece
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    import periln_megatron

    hf = tmp_path / "hf"
    out = _export(trained, hf)
    assert f"model card metrics: {trained / 'metrics.jsonl'}" in out, out
    card = (hf / "README.md").read_text()
    rows = _rows(card)
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "HyperCLOVAXForCausalLM" in rows["architecture"] and rows["norm placement"].startswith("Peri-LN")

    # parameter count: the exported tensors, and what transformers counts
    numel = _safetensors_numel(hf)
    assert rows["parameters"].startswith(f"{numel:,} ")
    model = AutoModelForCausalLM.from_pretrained(str(hf))
    assert model.num_parameters() == numel

    # losses and diagnostics: the last of each in metrics.jsonl
    records = _metrics(trained / "metrics.jsonl")
    loss = [r for r in records if "loss" in r][-1]
    valid = [r for r in records if "valid_loss" in r][-1]
    final = [r for r in records if "final_valid_loss" in r][-1]
    measured = [r for r in records if "layer_variance" in r][-1]
    assert loss["step"] == valid["step"] == final["step"] == measured["step"] == STEPS
    assert rows["training loss"] == f"{loss['loss']:.6g} (step {STEPS})"
    assert rows["validation loss"] == f"{valid['valid_loss']:.6g} (step {STEPS})"
    assert rows["final validation loss (end of run)"] == f"{final['final_valid_loss']:.6g} (step {STEPS})"
    layers = len(measured["layer_variance"]) - 1
    assert layers == 4
    assert rows[f"residual variance after layer {layers} (last)"] == f"{measured['layer_variance'][-1]:.6g} (step {STEPS})"
    assert rows[f"max abs activation after layer {layers} (last)"] == f"{measured['layer_max_abs'][-1]:.6g} (step {STEPS})"
    source = json.loads((hf / "megatron_source.json").read_text())
    assert source["metrics"]["loss"] == [STEPS, loss["loss"]]  # exact, machine-readable
    assert source["parameters"] == numel and source["iteration"] == STEPS

    # tokenizer, tokens, recipe, provenance
    assert "SentencePieceTokenizer" in rows["tokenizer"] and "spm1k.model" in rows["tokenizer"]
    assert rows["training tokens"].startswith(f"{STEPS * GBS * SEQ:,} = {STEPS} steps x {GBS} sequences x {SEQ} tokens")
    recipe_block = re.search(r"```yaml\n(.*?)\n```", card, re.S).group(1)
    assert yaml.safe_load(recipe_block) == yaml.safe_load((trained / "iter_0000004" / "recipe.yaml").read_text())
    assert rows["periln-megatron"] == periln_megatron.__version__
    assert f"python tools/convert_to_hf.py {trained} {hf} --quiet" in card
    assert rows["source checkpoint"] == f"`{(trained / 'iter_0000004').resolve()}` (iteration 4)"

    # generation_config.json: the tokenizer's eos/bos, as config.json and the tokenizer have them
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    gen = GenerationConfig.from_pretrained(str(hf))
    config = json.loads((hf / "config.json").read_text())
    assert (gen.eos_token_id, gen.bos_token_id) == (sp.eos_id(), sp.bos_id()) == (config["eos_token_id"], config["bos_token_id"])
    tok = AutoTokenizer.from_pretrained(str(hf))
    assert tok.eos_token_id == sp.eos_id()
    ids = tok("To be, or not to be", return_tensors="pt")["input_ids"]
    generated = model.generate(ids, max_new_tokens=4)  # greedy, from generation_config.json
    assert generated.shape == (1, ids.shape[1] + 4)


def test_card_of_an_earlier_iteration(trained, tmp_path):
    """--iteration 2: the card reports the run up to step 2, not the later records."""
    hf = tmp_path / "hf2"
    assert _convert_tool()([str(trained), str(hf), "--quiet", "--iteration", "2"]) == 0
    rows = _rows((hf / "README.md").read_text())
    records = _metrics(trained / "metrics.jsonl")
    at2 = [r for r in records if r["step"] == 2 and "loss" in r][-1]
    assert rows["training loss"] == f"{at2['loss']:.6g} (step 2)"
    assert rows["validation loss"] == f"{at2['valid_loss']:.6g} (step 2)"
    assert rows["final validation loss (end of run)"] == "n/a"
    assert rows["residual variance after layer 4 (last)"] == f"{at2['layer_variance'][-1]:.6g} (step 2)"
    assert rows["training tokens"].startswith(f"{2 * GBS * SEQ:,} = 2 steps")


def test_metrics_in_logging_run_dir_and_missing(tmp_path, capsys):
    """metrics.jsonl written to logging.run_dir (not the checkpoint dir) is found through the recipe;
    once gone, the card says the metrics are unavailable and where it looked; --metrics points at it."""
    ckpt, run_dir, hf = tmp_path / "ckpt", tmp_path / "logs" / "run", tmp_path / "hf"
    _train(ckpt, f"logging.run_dir={run_dir}", "optim.warmup_steps=1", steps=2)
    assert not (ckpt / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").is_file()
    records = _metrics(run_dir / "metrics.jsonl")
    last_loss = [r for r in records if "loss" in r][-1]["loss"]
    convert = _convert_tool()

    assert convert([str(ckpt), str(hf), "--quiet"]) == 0
    rows = _rows((hf / "README.md").read_text())
    assert rows["training loss"] == f"{last_loss:.6g} (step 2)"
    assert rows["metrics"] == f"`{(run_dir / 'metrics.jsonl').resolve()}`"
    assert rows["tokenizer"].startswith("none in the recipe")

    moved = tmp_path / "elsewhere" / "metrics.jsonl"  # outside the exported run: --metrics names its run dir
    moved.parent.mkdir()
    shutil.move(run_dir / "metrics.jsonl", moved)
    assert convert([str(ckpt), str(hf), "--quiet", "--overwrite"]) == 0
    card = (hf / "README.md").read_text()
    assert "Metrics unavailable: no metrics.jsonl was found" in card
    assert f"`{ckpt / 'metrics.jsonl'}`" in card and f"`{run_dir / 'metrics.jsonl'}`" in card
    assert "training loss" not in _rows(card) and _rows(card)["metrics"] == "unavailable"
    assert json.loads((hf / "megatron_source.json").read_text())["metrics"] is None
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(hf))  # still a loadable model directory

    assert convert([str(ckpt), str(hf), "--quiet", "--overwrite", "--metrics", str(moved)]) == 0
    assert _rows((hf / "README.md").read_text())["training loss"] == f"{last_loss:.6g} (step 2)"
    capsys.readouterr()
    assert convert([str(ckpt), str(tmp_path / "hf3"), "--metrics", str(tmp_path / "nope")]) == 2
    assert "no such metrics file (--metrics)" in capsys.readouterr().err
    assert not (tmp_path / "hf3").exists()


def test_summary_of_a_resumed_and_killed_run(tmp_path):
    """A resumed run logs steps again (the killed run's records from there on are dropped); a killed
    one leaves a cut-off line; records after the exported iteration are not the checkpoint's."""
    from periln_megatron.hf.model_card import summarize_metrics

    lines = [
        {"step": 1, "loss": 5.0},
        {"step": 2, "loss": 4.0, "layer_variance": [0.1, 1.0, 2.0], "layer_max_abs": [0.5, 3.0, 7.0]},
        {"step": 3, "loss": 3.9, "spike": "loss 3.9 > 3.0x median 1.0"},  # lost: the run died after step 2's save
        {"step": 3, "loss": 3.5},  # resumed from step 2
        {"step": 4, "loss": 3.0, "valid_loss": 3.2, "layer_variance": [0.1, 1.5, 2.5], "layer_max_abs": [0.5, 9.0, 6.0]},
        {"step": 5, "loss": 2.0},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 6, "lo')
    s = summarize_metrics(path, 4)
    assert (s.loss, s.valid_loss, s.final_valid_loss) == ([4, 3.0], [4, 3.2], None)
    assert s.records == 4 and s.skipped_lines == 1 and s.last_step == 4
    assert s.spikes == []  # the spike was the killed run's step 3, not this checkpoint's
    d = s.diagnostics
    assert (d["step"], d["num_layers"], d["last_layer_variance"], d["last_layer_max_abs"]) == (4, 2, 2.5, 6.0)
    assert (d["peak_max_abs"], d["peak_max_abs_layer"]) == (9.0, 1)
    assert summarize_metrics(path, 2).diagnostics["last_layer_max_abs"] == 7.0
