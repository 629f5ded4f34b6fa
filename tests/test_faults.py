"""Nothing lost under misuse (issue #15): what the tools promise when they are pointed at the wrong
place, given a bad value, or fed a damaged file. Each test's docstring states one promise.

Everything is real: the checkpoints come from real training runs (the session's tiny_run,
tests/fixtures.py) and real conversions, the recipes are real YAML files. A one-line error runs the
tool's `main(argv)` in this process (`_tool`); what needs a process of its own stays a subprocess:
signals, exit statuses of the launcher, locks held by another process, two tools racing, a traceback
(PERILN_DEBUG=1), and runs that train. Expected failures are one line that names the file (and the
line or key) with no traceback; PERILN_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch import REPO, load_tool, run, run_torchrun
from periln_megatron.cli import params_main, train_main
from periln_megatron.training.metrics import read_metrics, series

PY = sys.executable


def _snapshot(root: Path) -> dict:
    """Every file under root (relative path -> sha256), so a test can show nothing changed."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _errors(output: str, prefix: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(prefix)]


def _one_line_error(result, prefix: str) -> str:
    """The tool failed with exactly one `prefix` line and no traceback; return that line."""
    assert "Traceback" not in result.stdout, result.stdout
    lines = _errors(result.stdout, prefix)
    assert len(lines) == 1, result.stdout
    return lines[0]


_TOOLS: dict = {}


def _tool(capfd, name: str, argv: list[str]) -> subprocess.CompletedProcess:
    """tools/<name>.py's main(argv) in this process (or periln-train / periln-params for "train" and
    "params"): its exit status and its stdout+stderr, as a subprocess would have given them."""
    if name == "train":
        main = train_main
    elif name == "params":
        main = params_main
    else:
        if name not in _TOOLS:
            _TOOLS[name] = load_tool(name)
        main = _TOOLS[name].main
    capfd.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code if isinstance(e.code, int) else 2
    captured = capfd.readouterr()
    return subprocess.CompletedProcess([name, *argv], code, captured.out + captured.err)


# ------------------------------------------------------------------------------ real artefacts

@pytest.fixture
def hf_model(stock_llama) -> Path:
    """The session's random stock Llama, one safetensors file (its sibling `sharded` has shards)."""
    return stock_llama / "single"


def _convert(capfd, src: Path, dst: Path, *extra):
    return _tool(capfd, "convert_from_hf", [str(src), str(dst), "--quiet", *extra])


# ------------------------------------------------------------------ convert_from_hf: target dir

def test_convert_from_hf_never_touches_a_training_checkpoint(tiny_run, hf_model, tmp_path, capfd):
    """convert_from_hf into a training run's checkpoint dir exits 2 with one line naming the dir and
    what is in it, with or without --overwrite; the run's files (its marker included) are untouched
    and it can still resume."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_run, ckpt)
    before = _snapshot(ckpt)
    for extra in ([], ["--overwrite"]):
        r = _convert(capfd, hf_model, ckpt, *extra)
        assert r.returncode == 2, r.stdout
        line = _one_line_error(r, "convert_from_hf: error:")
        assert str(ckpt) in line and "iter_0000004" in line, line
        assert _snapshot(ckpt) == before
        assert sorted(p.name for p in ckpt.iterdir()) == sorted(p.name for p in tiny_run.iterdir())


def test_convert_from_hf_refuses_a_non_empty_dir_without_overwrite(hf_model, tmp_path, capfd):
    """A non-empty target is refused (exit 2, one line naming the dir and its entries) unless
    --overwrite; with --overwrite, files that are not checkpoints are left as they are."""
    target = tmp_path / "target"
    target.mkdir()
    (target / "notes.txt").write_text("mine\n")
    r = _convert(capfd, hf_model, target)
    assert r.returncode == 2
    line = _one_line_error(r, "convert_from_hf: error:")
    assert str(target) in line and "notes.txt" in line and "--overwrite" in line, line
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    r = _convert(capfd, hf_model, target, "--overwrite")
    assert r.returncode == 0, r.stdout
    assert (target / "notes.txt").read_text() == "mine\n"
    assert sorted(p.name for p in target.iterdir()) == ["iter_0000000", "latest_checkpointed_iteration.txt",
                                                        "notes.txt"]


def test_convert_from_hf_overwrite_replaces_only_its_own_conversion(hf_model, tmp_path, capfd):
    """Converting twice into one dir needs --overwrite, which replaces the earlier conversion's
    iter_0000000 (and nothing else; no temporary left behind). An existing --recipe-out file is
    refused the same way."""
    target, recipe = tmp_path / "ckpt", tmp_path / "recipe.yaml"
    assert _convert(capfd, hf_model, target).returncode == 0
    recipe.write_text("# my notes\n")
    r = _convert(capfd, hf_model, target, "--recipe-out", str(recipe))
    assert r.returncode == 2
    line = _one_line_error(r, "convert_from_hf: error:")
    assert str(target) in line and "iter_0000000" in line, line
    (target / "iter_0000000" / "stale").write_text("from the first conversion")
    r = _convert(capfd, hf_model, target, "--overwrite", "--recipe-out", str(recipe))
    assert r.returncode == 2 and str(recipe) in _one_line_error(r, "convert_from_hf: error:")
    assert recipe.read_text() == "# my notes\n" and (target / "iter_0000000" / "stale").exists()
    recipe.unlink()
    r = _convert(capfd, hf_model, target, "--overwrite", "--recipe-out", str(recipe))
    assert r.returncode == 0, r.stdout
    assert sorted(p.name for p in target.iterdir()) == ["iter_0000000", "latest_checkpointed_iteration.txt"]
    assert not (target / "iter_0000000" / "stale").exists()
    assert (target / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    assert "iter_0000000" in recipe.read_text()


def test_convert_from_hf_overwrite_refuses_a_foreign_iteration_0(tiny_run, hf_model, tmp_path, capfd):
    """--overwrite replaces only an iter_0000000 that convert_from_hf wrote: a dir holding another
    run's iteration (here a training checkpoint renamed to iteration 0) is refused and kept."""
    target = tmp_path / "ckpt"
    target.mkdir()
    shutil.copytree(tiny_run / "iter_0000004", target / "iter_0000000")
    (target / "latest_checkpointed_iteration.txt").write_text("0\n")
    before = _snapshot(target)
    r = _convert(capfd, hf_model, target, "--overwrite")
    assert r.returncode == 2
    line = _one_line_error(r, "convert_from_hf: error:")
    assert str(target / "iter_0000000") in line, line
    assert _snapshot(target) == before


# ------------------------------------------------------------------- convert_to_hf: target dir

def _export(capfd, ckpt: Path, out: Path, *extra):
    return _tool(capfd, "convert_to_hf", [str(ckpt), str(out), "--quiet", *extra])


def _run_layout(tiny_run: Path, root: Path, layout: str) -> tuple[Path, Path, list[str]]:
    """A copy of the tiny run under root/proj (with the user's NOTES.txt beside it) and the
    output a careless command line would name: (checkpoint dir, output dir, extra flags)."""
    proj = root / "proj"
    ckpt = _copy_run(tiny_run, proj)
    (proj / "NOTES.txt").write_text("my notes\n")
    if layout == "the-run-itself":  # convert_to_hf.py RUN RUN --overwrite
        return ckpt, ckpt, []
    if layout == "the-project-holding-the-run":  # convert_to_hf.py proj/ckpt proj --overwrite
        return ckpt, proj, []
    if layout == "inside-the-run":
        return ckpt, ckpt / "hf", []
    if layout == "the-iteration":
        return ckpt, ckpt / "iter_0000004", []
    logs = proj / "logs"  # a run dir of its own (logging.run_dir) holding metrics.jsonl, named by --metrics
    logs.mkdir()
    os.replace(ckpt / "metrics.jsonl", logs / "metrics.jsonl")
    return ckpt, logs, ["--metrics", str(logs)]


@pytest.mark.parametrize("layout", ["the-run-itself", "the-project-holding-the-run", "inside-the-run",
                                    "the-iteration", "the-metrics-run-dir"])
def test_convert_to_hf_never_replaces_or_enters_the_run_it_exports(tiny_run, tmp_path, layout, capfd):
    """An output that is, contains or lies inside the exported run (its checkpoint dir, an
    iteration, the run dir holding metrics.jsonl) exits 2 with one line naming both, even with
    --overwrite; every file (checkpoints, metrics.jsonl, data cache, the user's notes) is untouched."""
    ckpt, out, extra = _run_layout(tiny_run, tmp_path, layout)
    before = _snapshot(tmp_path)
    for flags in ([], ["--overwrite"]):
        r = _export(capfd, ckpt, out, *extra, *flags)
        assert r.returncode == 2, r.stdout
        line = _one_line_error(r, "convert_to_hf: error:")
        assert str(out) in line and "run" in line, line
        assert _snapshot(tmp_path) == before


def test_convert_to_hf_refuses_a_non_empty_dir_that_is_not_an_export(capfd, tiny_run, tmp_path):
    """A non-empty directory the exporter did not write (no .periln-export.json) is refused with
    one line naming it and its entries, with or without --overwrite; an empty one is used."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "NOTES.txt").write_text("my notes\n")
    for flags in ([], ["--overwrite"]):
        r = _export(capfd, tiny_run, out, *flags)
        assert r.returncode == 2, r.stdout
        line = _one_line_error(r, "convert_to_hf: error:")
        assert str(out) in line and "NOTES.txt" in line, line
        assert sorted(p.name for p in out.iterdir()) == ["NOTES.txt"]
    (out / "NOTES.txt").unlink()
    assert _export(capfd, tiny_run, out).returncode == 0
    assert (out / "config.json").is_file() and (out / ".periln-export.json").is_file()


def test_convert_to_hf_overwrite_replaces_only_its_own_export(capfd, tiny_run, tmp_path):
    """Exporting twice into one dir needs --overwrite, which replaces the earlier export; once the
    user has put a file of their own into it, even --overwrite refuses, naming that file."""
    out = tmp_path / "hf"
    assert _export(capfd, tiny_run, out).returncode == 0
    written = sorted(p.name for p in out.iterdir())
    assert ".periln-export.json" in written and "model.safetensors" in written
    r = _export(capfd, tiny_run, out)
    assert r.returncode == 2 and "--overwrite" in _one_line_error(r, "convert_to_hf: error:")
    (out / "model.safetensors").write_bytes(b"stale")
    r = _export(capfd, tiny_run, out, "--overwrite")
    assert r.returncode == 0, r.stdout
    assert sorted(p.name for p in out.iterdir()) == written and (out / "model.safetensors").stat().st_size > 5
    (out / "NOTES.txt").write_text("my notes\n")
    before = _snapshot(out)
    r = _export(capfd, tiny_run, out, "--overwrite")
    assert r.returncode == 2, r.stdout
    line = _one_line_error(r, "convert_to_hf: error:")
    assert str(out) in line and "NOTES.txt" in line, line
    assert _snapshot(out) == before
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name or ".tmp-" in p.name]


def _gated(tool: str, src: Path, dst: Path, gate: Path, log: Path):
    """The converter as a command line starts it, held by the test-only gate once its weights are
    in the hidden temporary directory."""
    return _spawn([f"tools/{tool}.py", str(src), str(dst), "--quiet"], log, env={"PERILN_TEST_PAUSE_UNTIL": str(gate)})


@pytest.mark.parametrize("tool", ["convert_to_hf", "convert_from_hf"])
def test_two_concurrent_conversions_into_one_new_dir(tiny_run, hf_model, tmp_path, tool, capfd):
    """Two conversions into the same new directory, both past the start's checks when the first
    finishes: exactly one succeeds and the other exits 2 with one line naming the directory; the
    survivor is complete (transformers loads the export; the import verifies) and no temporary is left."""
    from launch import kill_all, wait_all, wait_for_line

    src = tiny_run if tool == "convert_to_hf" else hf_model
    dst, gate = tmp_path / "out" / "model", tmp_path / "gate"
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [_gated(tool, src, dst, gate, log) for log in logs]
    try:
        for log in logs:
            wait_for_line(log, "PERILN_TEST_PAUSE_UNTIL", procs, timeout=240)
        gate.touch()
        codes = wait_all(procs, timeout=240)
    finally:
        kill_all(procs)
    texts = [log.read_text() for log in logs]
    assert sorted(codes) == [0, 2], texts
    loser = texts[codes.index(2)]
    line = _one_line_error(subprocess.CompletedProcess([], 2, loser), f"{tool}: error:")
    assert str(dst) in line and "--overwrite" in line, line
    assert f"wrote {dst}" in texts[codes.index(0)] and "wrote" not in loser
    assert not [p for p in dst.parent.rglob("*") if ".partial-" in p.name or ".tmp-" in p.name]
    if tool == "convert_to_hf":
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(dst))
        logits = model(torch.tensor([[1, 2, 3]])).logits
        assert logits.shape == (1, 3, 256) and torch.isfinite(logits).all()
    else:
        check = _tool(capfd, "inspect_checkpoint", [str(dst)])
        assert check.returncode == 0 and "iter_0000000  ok" in check.stdout, check.stdout
        assert (dst / "latest_checkpointed_iteration.txt").read_text().strip() == "0"


@pytest.mark.parametrize("tool", ["convert_to_hf", "convert_from_hf"])
def test_ctrl_c_during_a_conversion_exits_130_and_leaves_nothing(tiny_run, hf_model, tmp_path, tool):
    """SIGINT while the weights are being written: exit 130 with one line, no traceback; the
    hidden temporary directory is removed and the target never appears."""
    import signal

    from launch import kill_all, wait_all, wait_for_line

    src = tiny_run if tool == "convert_to_hf" else hf_model
    parent = tmp_path / "out"
    parent.mkdir()
    dst, log = parent / "model", tmp_path / "conv.log"
    proc = _gated(tool, src, dst, tmp_path / "never", log)
    try:
        wait_for_line(log, "PERILN_TEST_PAUSE_UNTIL", [proc], timeout=240)
        assert [p for p in parent.rglob("*") if ".partial-" in p.name or ".tmp-" in p.name]  # mid-write
        proc.send_signal(signal.SIGINT)
        assert wait_all([proc], timeout=120) == [130], log.read_text()
    finally:
        kill_all([proc])
    result = subprocess.CompletedProcess([], 130, log.read_text())
    assert "interrupted" in _one_line_error(result, f"{tool}: interrupted")
    assert not dst.exists() and [p.name for p in parent.iterdir() if not p.name.endswith(".lock")] == []


def test_convert_to_hf_garbage_tokenizer_is_one_line_naming_it(spm_run, tmp_path, capfd):
    """--tokenizer naming a file that is not a SentencePiece model (a checkpoint trained with one):
    exit 2 with one line naming the file and the flag; nothing written."""
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(bytes(range(256)) * 4)
    before = sorted(p.name for p in tmp_path.iterdir())
    r = _export(capfd, spm_run["ckpt"], tmp_path / "hf", "--tokenizer", str(garbage))
    assert r.returncode == 2, r.stdout
    line = _one_line_error(r, "convert_to_hf: error:")
    assert str(garbage) in line and "--tokenizer" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ------------------------------------------------------------------ convert_from_hf: damaged input

@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_convert_from_hf_truncated_safetensors_is_one_line(hf_model, tmp_path, layout, capfd):
    """A truncated safetensors file (single or one shard of several) is exit 2 with one line naming
    that file; nothing is written. PERILN_DEBUG=1 shows the traceback instead."""
    src = tmp_path / "src"
    shutil.copytree(hf_model.parent / layout, src)
    files = sorted(src.glob("*.safetensors"))
    victim = files[-1]
    os.truncate(victim, victim.stat().st_size // 2)
    r = _convert(capfd, src, tmp_path / "ckpt")
    assert r.returncode == 2, r.stdout
    line = _one_line_error(r, "convert_from_hf: error:")
    assert str(victim) in line, line
    assert not (tmp_path / "ckpt").exists()
    r = run([PY, "tools/convert_from_hf.py", str(src), str(tmp_path / "ckpt"), "--quiet"], check=False,
            timeout=180, env={"PERILN_DEBUG": "1"})  # the traceback: a process of its own
    assert r.returncode != 0 and "Traceback" in r.stdout and str(victim) in r.stdout
    assert not (tmp_path / "ckpt").exists()


# ------------------------------------------------------------------------------ recipe YAML

DUPLICATES = {
    "top level": ("model:\n  num_layers: 4\nmodel:\n  num_layers: 8\n", 3, "model"),
    "nested": ("model:\n  num_layers: 4\n  hidden_size: 64\n  num_layers: 8\n", 4, "num_layers"),
    "flow mapping": ("parallel: {tp: 1, pp: 1, tp: 2}\n", 1, "tp"),
    "deep": ("data:\n  synthetic: true\n  blend:\n    a: 1\n    a: 2\n", 5, "a"),
}


@pytest.mark.parametrize("case", list(DUPLICATES))
def test_recipe_duplicate_key_names_file_and_line(tmp_path, case):
    """A key given twice in a recipe (at any nesting level) is an error naming the file, the line of
    the second occurrence and the key, instead of the first block being silently dropped."""
    from periln_megatron.config import RecipeError, load_recipe

    text, line, key = DUPLICATES[case]
    path = tmp_path / "r.yaml"
    path.write_text(f"base: {REPO / 'recipes/tiny/peri_ln.yaml'}\n" + text)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert f"{path}:{line + 1}:" in message and f"duplicate key `{key}`" in message, message
    assert "\n" not in message


def test_recipe_duplicate_key_in_a_base_names_the_base(tmp_path, capfd):
    """A duplicate in a `base:` file names that file; periln-params reports it in one line, exit 2."""
    base = tmp_path / "base.yaml"
    base.write_text((REPO / "recipes/tiny/peri_ln.yaml").read_text() + "train: {steps: 5}\n")
    line = len(base.read_text().splitlines())
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\nname: child\n")
    r = _tool(capfd, "params", [str(child)])
    assert r.returncode == 2
    message = _one_line_error(r, "periln-params: error:")
    assert f"{base}:{line}:" in message and "duplicate key `train`" in message, message


# ------------------------------------------------------------------------------ parallel layout

@pytest.mark.parametrize("sets,world,key", [
    ({"pp": 3}, 4, "parallel.pp"),
    ({"tp": 2, "pp": 3}, 4, "parallel.pp"),
    ({"cp": 3}, 4, "parallel.cp"),
    ({"tp": 3}, 4, "parallel.tp"),
])
def test_layout_error_names_the_dimension_that_does_not_fit(tmp_path, sets, world, key):
    """A world size that tp*pp*cp does not divide is reported against the first of tp, pp, cp whose
    running product stops dividing it (a pipeline problem is `parallel.pp`, not `parallel.tp`)."""
    import yaml

    from periln_megatron.config import RecipeError, load_recipe

    data = yaml.safe_load((REPO / "recipes/tiny/peri_ln.yaml").read_text())
    data["parallel"].update(sets)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError) as err:
        load_recipe(path, world_size=world)
    assert f"`{key}`" in str(err.value) and "not divisible by tp*pp*cp" in str(err.value), str(err.value)


# ------------------------------------------------------------------------------ preprocess_data

@pytest.fixture(scope="module")
def tiktoken_file(tmp_path_factory) -> Path:
    """A tiny local tiktoken BPE file (bytes + a dozen merges)."""
    merges = [b"th", b"he", b"the", b" t", b" the", b"in", b"an", b"and", b" a", b" and", b"er", b"on"]
    ranks = {bytes([i]): i for i in range(256)} | {m: 256 + j for j, m in enumerate(merges)}
    path = tmp_path_factory.mktemp("tok") / "tiny.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return path


def _preprocess_argv(tok: Path, data: Path, prefix: Path, *extra) -> list[str]:
    return ["--input", str(data), "--output-prefix", str(prefix), "--tokenizer-type", "TikTokenizer",
            "--tokenizer-model", str(tok), "--quiet", *extra]


def _preprocess(capfd, tok: Path, data: Path, prefix: Path, *extra):
    return _tool(capfd, "preprocess_data", _preprocess_argv(tok, data, prefix, *extra))


@pytest.mark.parametrize("flag,value", [
    ("--chunk-bytes", "0"), ("--chunk-bytes", "-1"), ("--chunk-bytes", "1e3"), ("--chunk-bytes", "2000000000"),
    ("--workers", "0"), ("--workers", "two"),
    ("--log-interval", "0"), ("--log-interval", "-1"), ("--log-interval", "nan"), ("--log-interval", "inf"),
])
def test_preprocess_rejects_bad_numbers(tiktoken_file, tmp_path, flag, value, capfd):
    """Every numeric flag of preprocess_data.py is checked: a bad value exits 2 naming the flag and
    the value, and nothing is written (--chunk-bytes 0 used to write an empty dataset and exit 0)."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "the cat and the hat"}\n')
    r = _preprocess(capfd, tiktoken_file, data, tmp_path / "out", flag, value)
    assert r.returncode == 2, r.stdout
    assert "Traceback" not in r.stdout
    assert f"argument {flag}:" in r.stdout and repr(value) in r.stdout, r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def test_preprocess_caps_workers_at_cpu_count(tiktoken_file, tmp_path):
    """--workers above the CPU count is lowered to it with a warning naming --workers; the output
    is the same."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "the cat and the hat"}\n{"text": "then in"}\n')
    cpus = os.cpu_count()
    r = run([PY, "tools/preprocess_data.py", *_preprocess_argv(tiktoken_file, data, tmp_path / "out", "--workers",
                                                                str(cpus + 3))], check=False, timeout=120)
    assert r.returncode == 0, r.stdout
    assert f"warning: --workers {cpus + 3} is more than the {cpus} CPUs; using {cpus}" in r.stdout, r.stdout
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    assert len(ds) == 2


def test_preprocess_unwritable_output_prefix_is_one_line(tiktoken_file, tmp_path, capfd):
    """An --output-prefix that cannot be written (its directory is a file) is one line naming the
    path, exit 1, before any tokenizing; nothing is written."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "the cat and the hat"}\n')
    blocker = tmp_path / "notadir"
    blocker.write_text("")
    r = _preprocess(capfd, tiktoken_file, data, blocker / "sub" / "out")
    assert r.returncode == 1, r.stdout
    line = _one_line_error(r, "error:")
    assert "--output-prefix" in line and str(blocker) in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "notadir"]


def test_preprocess_long_document_tokens_unchanged_by_bounded_memory(tmp_path):
    """A document much longer than one tokenizer batch (SentencePiece, segment cache) is tokenized
    in bounded pieces and still gives exactly the ids of encoding it whole."""
    import numpy as np
    import sentencepiece
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from periln_megatron.data.tokenizers import load_tokenizer

    corpus = "\n".join(p.read_text() for p in sorted([*REPO.glob("*.md"), *REPO.glob("docs/*.md")]))
    (tmp_path / "corpus.txt").write_text(corpus)
    run([PY, "tools/train_tokenizer.py", "--input", str(tmp_path / "corpus.txt"), "--model-prefix",
         str(tmp_path / "spm"), "--vocab-size", "400", "--threads", "1"], timeout=120)
    assert load_tokenizer("SentencePieceTokenizer", str(tmp_path / "spm.model")).segment_cache
    words = corpus.split()
    rng = np.random.default_rng(0)
    long_doc = " ".join(words[i] for i in rng.integers(0, len(words), 500_000))  # ~3.5 MB, spaces and newlines
    docs = ["short one", long_doc, "", "x  y", "tail"]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    r = run([PY, "tools/preprocess_data.py", "--input", str(data), "--output-prefix", str(tmp_path / "out"),
             "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(tmp_path / "spm.model"),
             "--workers", "1", "--quiet"], timeout=300)
    assert "1 empty" in r.stdout
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "spm.model"))
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    expected = [sp.encode(d) for d in docs if d]
    assert len(ds) == len(expected)
    for i, ids in enumerate(expected):
        assert ds[i].tolist() == ids, i


def test_preprocess_help_states_memory_per_document(capfd):
    """--help says how much memory a worker needs per byte of document, per tokenizer family."""
    r = _tool(capfd, "preprocess_data", ["--help"])
    out = r.stdout
    assert r.returncode == 0, out
    assert "memory" in out.lower() and "per byte of" in out, out


# ------------------------------------------------------------------------------ plot_diagnostics

def _plot(*run_dirs, out):
    return run([PY, "tools/plot_diagnostics.py", *map(str, run_dirs), "--out", str(out)], check=False, timeout=120)


def test_plot_skips_the_truncated_last_line_of_a_killed_run(tiny_run, tmp_path):
    """A metrics.jsonl whose last line was cut short (the run was killed mid-write) is plotted
    without it, with one warning naming the file and the line."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines) + "\n")
    with open(metrics, "r+b") as f:
        f.truncate(metrics.stat().st_size - len(lines[-1]) // 2)
    r = _plot(run_dir, out=tmp_path / "plots")
    assert r.returncode == 0, r.stdout
    warnings = _errors(r.stdout, "plot_diagnostics: warning:")
    assert len(warnings) == 1 and f"{metrics}:{len(lines)}:" in warnings[0], r.stdout
    assert (tmp_path / "plots" / "loss.png").is_file()


def test_plot_keeps_records_a_resumed_run_appended_after_a_truncated_line(tiny_run, tmp_path):
    """A run killed mid-write and then resumed: the trainer starts a new line after the cut one; the
    cut record is dropped with a warning naming file and line, the resumed records are kept."""
    run_dir = tmp_path / "ckpt"
    shutil.copytree(tiny_run, run_dir)
    metrics = run_dir / "metrics.jsonl"
    text = metrics.read_text()
    n = len(text.splitlines())
    metrics.write_text(text[: len(text) - 1 - len(text.splitlines()[-1]) // 2])  # step 4 cut in half
    run_torchrun(1, ["-m", "periln_megatron.train", "--recipe", str(REPO / "recipes/tiny/peri_ln.yaml"), "--set",
                     f"checkpoint.dir={run_dir}", "train.steps=6", "checkpoint.interval=2",
                     "logging.tensorboard=false", "checkpoint.on_schedule_change=checkpoint"], timeout=240)
    lines = metrics.read_text().splitlines()
    assert '{"step": 5' not in lines[n - 1] and lines[n].startswith('{"step": 5')  # a new line after the cut one
    r = _plot(run_dir, out=tmp_path / "plots")
    assert r.returncode == 0, r.stdout
    warnings = _errors(r.stdout, "plot_diagnostics: warning:")
    assert len(warnings) == 1 and f"{metrics}:{n}:" in warnings[0] and "cut off" in warnings[0], r.stdout


def test_plot_still_refuses_corruption_in_the_middle(tiny_run, tmp_path):
    """A damaged line in the middle of metrics.jsonl that is not a cut record followed by a whole
    one is refused: exit 2, one line naming the file and line (plotting around it could misstate
    the run)."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[1] = lines[1][:10] + "\x00\x00garbage"
    metrics.write_text("\n".join(lines) + "\n")
    r = _plot(run_dir, out=tmp_path / "plots")
    assert r.returncode == 2
    assert f"{metrics}:2: invalid JSON" in _one_line_error(r, "plot_diagnostics: error:")


# ------------------------------------------------------------- damaged or foreign checkpoints (trainer)

TINY_TRAIN_ARGV = ["--recipe", str(REPO / "recipes/tiny/peri_ln.yaml"), "--set", "logging.tensorboard=false",
                   "checkpoint.interval=2"]
TINY_TRAIN = [PY, "-m", "periln_megatron.train", *TINY_TRAIN_ARGV]


def _copy_run(tiny_run: Path, tmp_path: Path) -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_run, ckpt)
    return ckpt


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated-distcp": lambda it: _truncate(next(it.glob("*.distcp"))),
    "truncated-common": lambda it: _truncate(it / "common.pt"),
    "missing-metadata": lambda it: (it / ".metadata").unlink(),
    "marker-names-missing-iteration": lambda it: shutil.rmtree(it),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_checkpoint_is_one_line_naming_file_and_iteration(tiny_run, tmp_path, damage, capfd):
    """A damaged newest checkpoint stops the trainer before it writes anything: one line naming the
    file and iteration, and the intact iteration that checkpoint.on_corrupt=previous would use."""
    ckpt = _copy_run(tiny_run, tmp_path)
    DAMAGE[damage](ckpt / "iter_0000004")
    before = _snapshot(ckpt)
    result = _tool(capfd, "train", [*TINY_TRAIN_ARGV, f"checkpoint.dir={ckpt}", "train.steps=6"])
    assert result.returncode == 2
    line = _one_line_error(result, "periln-train: error:")
    assert "iteration 4" in line and "iteration 2 is intact" in line and "on_corrupt=previous" in line, line
    assert str(ckpt / "iter_0000004") in line, line
    assert _snapshot(ckpt) == before


def test_on_corrupt_previous_resumes_from_the_newest_intact_iteration(tiny_run, tmp_path):
    """checkpoint.on_corrupt=previous falls back to the newest intact iteration and says so."""
    ckpt = _copy_run(tiny_run, tmp_path)
    _truncate(next((ckpt / "iter_0000004").glob("*.distcp")))
    result = run([*TINY_TRAIN, f"checkpoint.dir={ckpt}", "train.steps=5", "checkpoint.on_corrupt=previous",
                  "checkpoint.on_schedule_change=checkpoint"], timeout=240)
    assert "iteration 4 is damaged" in result.stdout and "resuming from iteration 2" in result.stdout
    assert "resumed from iteration 2" in result.stdout
    assert all(f"step {s}/5" in result.stdout for s in (3, 4, 5)) and "step 2/5" not in result.stdout
    assert sorted(series(read_metrics(ckpt), "loss")) == [1, 2, 3, 4, 5]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "5"


def test_inspect_checkpoint_verifies_every_iteration(tiny_run, tmp_path, capfd):
    """tools/inspect_checkpoint.py checks every iteration without training: exit 1 naming the damage."""
    ckpt = _copy_run(tiny_run, tmp_path)
    ok = _tool(capfd, "inspect_checkpoint", [str(ckpt)])
    assert ok.returncode == 0, ok.stdout
    assert "iter_0000002  ok  resumable" in ok.stdout and "iter_0000004  ok  resumable" in ok.stdout
    _truncate(next((ckpt / "iter_0000004").glob("*.distcp")))
    bad = _tool(capfd, "inspect_checkpoint", [str(ckpt)])
    assert bad.returncode == 1
    assert "iter_0000004  DAMAGED" in bad.stdout and "truncated" in bad.stdout
    assert "resume (checkpoint.on_corrupt=previous): iteration 2" in bad.stdout


def test_resume_into_a_different_model_shape_is_refused_untouched(tiny_run, tmp_path, capfd):
    """Resuming with another model shape names the differing keys in one line and changes nothing."""
    ckpt = _copy_run(tiny_run, tmp_path)
    before = _snapshot(ckpt)
    result = _tool(capfd, "train", [*TINY_TRAIN_ARGV, f"checkpoint.dir={ckpt}", "train.steps=6", "model.num_layers=2",
                                    "model.hidden_size=32"])
    assert result.returncode == 2
    line = _one_line_error(result, "periln-train: error:")
    assert "model.num_layers: 4 -> 2" in line and "model.hidden_size: 64 -> 32" in line, line
    assert _snapshot(ckpt) == before


def test_resume_after_convert_from_hf_starts_a_fresh_optimizer(hf_model, tmp_path, capfd):
    """A convert_from_hf.py directory used as checkpoint.dir trains from its weights at iteration 0."""
    converted = tmp_path / "converted"
    assert _convert(capfd, hf_model, converted, "--recipe-out", str(tmp_path / "recipe.yaml")).returncode == 0
    result = run([PY, "-m", "periln_megatron.train", "--recipe", str(tmp_path / "recipe.yaml"), "--set",
                  f"checkpoint.dir={converted}", "data.synthetic=true", "tokenizer.type=null", "tokenizer.model=null",
                  "tokenizer.vocab_size=null", "model.vocab_size=256", "train.steps=2", "optim.warmup_steps=0",
                  "logging.tensorboard=false", "checkpoint.load=null"], timeout=240)
    assert f"initial weights from {converted / 'iter_0000000'} (fresh optimizer state, iteration 0)" in result.stdout
    assert (converted / "latest_checkpointed_iteration.txt").read_text().strip() == "2"


def test_token_ids_beyond_the_vocabulary_are_one_line(tmp_path, capfd):
    """A prefix made with a bigger tokenizer fails before training, naming the prefix (no IndexError)."""
    import numpy as np

    from periln_megatron.data.indexed import PrefixWriter

    writer = PrefixWriter(tmp_path / "big_vocab", vocab_size=1000)
    rng = np.random.default_rng(0)
    for _ in range(20):
        writer.add_documents(rng.integers(0, 1000, 500).astype(np.int32), np.array([500]))
    writer.commit()
    result = _tool(capfd, "train", [*TINY_TRAIN_ARGV, f"checkpoint.dir={tmp_path / 'ckpt'}", "data.synthetic=false",
                                    f"data.prefixes=[{tmp_path / 'big_vocab'}]", "data.split=90,10,0",
                                    "model.vocab_size=256"])
    assert result.returncode == 2
    line = _one_line_error(result, "periln-train: error:")
    assert str(tmp_path / "big_vocab") in line and ">= the vocabulary size 256" in line, line


# ------------------------------------------- one run per directory, Ctrl-C, torchrun's exit, free port

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                 "SLURM_JOB_ID", "SLURM_RESTART_COUNT", "PERILN_RUN_LOCK", "PERILN_RANK_STATUS_DIR")
TRAIN_MODULE = ["-m", "periln_megatron.train", "--recipe", "recipes/tiny/peri_ln.yaml"]
# ~5 s per step on 2 cores: time for a second Ctrl-C to land before the step's end
SLOW_STEPS = ["train.global_batch_size=1024", "train.micro_batch_size=16"]


def _spawn(args: list[str], log: Path, env: dict | None = None):
    """`python ARGS` as a bare command line would start it (no launcher variables), output to `log`:
    forked from the test fork server (a process of its own, as a fresh interpreter runs it)."""
    from launch import start

    return start(args, log, env, drop=LAUNCHER_VARS)


def _spawn_launcher(args: list[str], log: Path):
    """`python ARGS` started fresh in its own session, for the launcher (periln-launch) tests: its
    ranks are torchrun's own children, and a terminal's Ctrl-C reaches the whole process group."""
    import subprocess

    full = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    full.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    with open(log, "w") as out:
        # SIGINT as a terminal's command has it: a pytest started in the background by a non-interactive
        # shell ignores SIGINT, and children inherit an ignored signal
        return subprocess.Popen([PY, *args], cwd=REPO, env=full, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_default_sigint)


def _default_sigint():
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _marker(ckpt: Path) -> int:
    return int((ckpt / "latest_checkpointed_iteration.txt").read_text())


def _train_steps(run_dir: Path) -> list[int]:
    return sorted(series(read_metrics(run_dir), "loss"))


def test_single_process_run_does_not_need_port_29500(tmp_path):
    """A single-process run started without a launcher (no MASTER_PORT) trains while another process listens on port 29500."""
    import socket

    from launch import wait_all

    from periln_megatron.distributed.runtime import read_dist_env

    assert read_dist_env({}).master_port == 0  # no port: an in-process store
    assert read_dist_env({"MASTER_PORT": "1234"}).master_port == 1234
    assert read_dist_env({"RANK": "0", "WORLD_SIZE": "2"}).master_port == 29500  # every rank must agree
    with socket.socket() as busy:
        try:
            busy.bind(("0.0.0.0", 29500))
            busy.listen()
        except OSError:
            pass  # someone else holds it: the same situation
        log = tmp_path / "train.log"
        proc = _spawn([*TRAIN_MODULE, "--set", "train.steps=3", f"checkpoint.dir={tmp_path / 'ckpt'}"], log)
        assert wait_all([proc], timeout=240) == [0], log.read_text()[-3000:]
    assert "1 ranks (single)" in log.read_text()


def test_rendezvous_port_in_use_names_the_port(tmp_path):
    """Rank 0 of a two-rank world whose MASTER_PORT another process listens on exits 1 with a line
    that names the address and says what to set, not torch's store traceback alone."""
    import socket

    from launch import wait_all

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        log = tmp_path / "train.log"
        proc = _spawn([*TRAIN_MODULE, "--set", "train.steps=3", "checkpoint.dir=null"], log,
                      env={"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(port)})
        assert wait_all([proc], timeout=120) == [1], log.read_text()[-3000:]
    text = log.read_text()
    assert f"RendezvousError: rank 0 cannot listen on 127.0.0.1:{port}" in text, text[-3000:]
    assert "Set MASTER_PORT to a free port" in text


@pytest.mark.parametrize("key,lock", [("checkpoint.dir", "flock"), ("logging.run_dir", "lease")])
def test_second_trainer_on_a_busy_directory_exits_2_naming_the_holder(tmp_path, key, lock):
    """A trainer on a directory another running trainer writes (its checkpoint.dir, or its run dir) exits 2 with one line naming the directory and the holder's pid, writing nothing; the first finishes (exit 0) intact."""
    import signal
    import subprocess

    from launch import kill_all, wait_all, wait_for_line

    d = tmp_path / "run"
    args = [*TRAIN_MODULE, "--set", f"{key}={d}", "train.steps=12", "checkpoint.interval=5"]
    env = {"PERILN_RUN_LOCK": lock}  # lease: the fallback for filesystems without a coherent flock
    first = _spawn(args, tmp_path / "first.log", env)
    try:
        wait_for_line(tmp_path / "first.log", "step 3/12", [first], timeout=240)
        first.send_signal(signal.SIGSTOP)  # it keeps its lock but writes nothing while the second one tries
        before = _snapshot(d)
        second = _spawn(args, tmp_path / "second.log", env)
        assert wait_all([second], timeout=240) == [2], (tmp_path / "second.log").read_text()[-3000:]
        result = subprocess.CompletedProcess(args, 2, (tmp_path / "second.log").read_text())
        line = _one_line_error(result, "periln-train: error:")
        assert str(d) in line and f"pid {first.pid} " in line and key in line, line
        assert _snapshot(d) == before
        first.send_signal(signal.SIGCONT)
        assert wait_all([first], timeout=240) == [0], (tmp_path / "first.log").read_text()[-3000:]
    finally:
        kill_all([first])
    assert _train_steps(d) == list(range(1, 13))
    if key == "checkpoint.dir":
        assert _marker(d) == 12 and sorted(p.name for p in d.glob("iter_*")) == ["iter_0000010", "iter_0000012"]


@pytest.mark.parametrize("lock", ["flock", "lease"])
def test_a_killed_holder_does_not_block_the_next_run(tmp_path, lock):
    """After the run holding a checkpoint.dir is SIGKILLed (its lock file left behind, naming it), the next run on that dir takes it over and resumes."""
    from launch import kill_all, wait_all, wait_for_line

    d = tmp_path / "ckpt"
    env = {"PERILN_RUN_LOCK": lock}
    first = _spawn([*TRAIN_MODULE, "--set", f"checkpoint.dir={d}", "train.steps=1000", "checkpoint.interval=2"],
                   tmp_path / "first.log", env)
    try:
        wait_for_line(tmp_path / "first.log", "saved checkpoint iteration 2 ", [first], timeout=240)
        lock_file = d / (".periln.lock" if lock == "flock" else ".periln.lease")
        assert json.loads(lock_file.read_text())["pid"] == first.pid
    finally:
        kill_all([first])  # SIGKILL: no clean-up of the lock file
    saved = _marker(d)
    second = _spawn([*TRAIN_MODULE, "--set", f"checkpoint.dir={d}", f"train.steps={saved + 2}",
                     "checkpoint.on_schedule_change=checkpoint"], tmp_path / "second.log", env)
    log = tmp_path / "second.log"
    assert wait_all([second], timeout=240) == [0], log.read_text()[-3000:]
    assert f"resumed from iteration {saved}" in log.read_text() and _marker(d) == saved + 2
    assert _train_steps(d)[-2:] == [saved + 1, saved + 2]
    assert lock_file.exists() == (lock == "flock")  # a lease is removed on a clean exit


def test_launch_sigterm_to_the_launcher_saves_and_exits_75(tmp_path):
    """Under periln-launch (torchrun's arguments), SIGTERM to the launcher makes every rank save and the launcher exit 75 (requeue), where bare torchrun exits 1."""
    import signal

    from launch import free_port, wait_all, wait_for_line

    d, log = tmp_path / "ckpt", tmp_path / "launch.log"
    proc = _spawn_launcher(["-m", "periln_megatron.launch", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                   f"--master_port={free_port()}", *TRAIN_MODULE, "--set", "train.steps=1000",
                   "checkpoint.interval=0", f"checkpoint.dir={d}"], log)
    wait_for_line(log, "step 3/1000", [proc], timeout=240)
    proc.send_signal(signal.SIGTERM)
    assert wait_all([proc], timeout=180) == [75], log.read_text()[-3000:]
    saved = _marker(d)
    text = log.read_text()
    assert saved >= 3 and f"saved checkpoint iteration {saved}" in text and "exit 75 to requeue" in text
    assert "periln-launch: rank(s) 0,1 saved a checkpoint and exited 75" in text, text[-3000:]


def test_ctrl_c_once_saves_and_exits_75(tmp_path):
    """One SIGINT (Ctrl-C) is a request to stop: the run saves a checkpoint at the end of the step and exits 75."""
    import signal

    from launch import wait_all, wait_for_line

    d, log = tmp_path / "ckpt", tmp_path / "train.log"
    proc = _spawn([*TRAIN_MODULE, "--set", "train.steps=1000", "checkpoint.interval=0", f"checkpoint.dir={d}"], log)
    wait_for_line(log, "step 3/1000", [proc], timeout=240)
    proc.send_signal(signal.SIGINT)
    assert wait_all([proc], timeout=180) == [75], log.read_text()[-3000:]
    text = log.read_text()
    assert "press Ctrl-C again" in text and "(SIGINT)" in text and "Traceback" not in text, text[-3000:]
    assert _marker(d) >= 3


def test_ctrl_c_twice_exits_at_once_without_saving(tmp_path):
    """A second Ctrl-C (SIGINT to periln-launch's process group, as a terminal sends it) exits at once with 130, saving nothing."""
    import os as os_
    import signal
    import time

    from launch import free_port, wait_all, wait_for_line

    d, log = tmp_path / "ckpt", tmp_path / "launch.log"
    proc = _spawn_launcher(["-m", "periln_megatron.launch", "--nproc_per_node=1", "--master_addr=127.0.0.1",
                   f"--master_port={free_port()}", *TRAIN_MODULE, "--set", "train.steps=1000",
                   "checkpoint.interval=0", f"checkpoint.dir={d}", *SLOW_STEPS], log)
    wait_for_line(log, "step 1/1000", [proc], timeout=240)  # step 2 has begun, and lasts ~5 s
    os_.killpg(proc.pid, signal.SIGINT)
    time.sleep(1.5)  # well apart: presses closer than 0.5 s count as one
    os_.killpg(proc.pid, signal.SIGINT)
    pressed = time.monotonic()
    assert wait_all([proc], timeout=120) == [130], log.read_text()[-3000:]
    assert time.monotonic() - pressed < 20
    text = log.read_text()
    assert "second SIGINT" in text and "saved checkpoint" not in text, text[-3000:]
    assert not (d / "latest_checkpointed_iteration.txt").exists()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (a disk that fills up), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (make test runs as root in CI)")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("this kernel refuses tmpfs mounts here")
    yield disk
    subprocess.run(["umount", "-l", str(disk)])


def test_disk_full_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tiny_disk, tmp_path):
    """A save that fills the disk fails in one line naming the file; the marker still names the last good one."""
    result = run([*TINY_TRAIN, f"checkpoint.dir={tiny_disk}", "train.steps=4",  # TINY_TRAIN: checkpoint.interval=2
                  "checkpoint.keep=5", f"logging.run_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"],
                 check=False, timeout=180)
    assert result.returncode == 2, result.stdout[-3000:]
    line = _one_line_error(result, "periln-train: error:")
    assert str(tiny_disk) in line and "No space left on device" in line, line
    marker = tiny_disk / "latest_checkpointed_iteration.txt"
    assert not marker.exists() or marker.read_text().strip() in ("2",)


def test_disk_full_in_the_data_cache_is_one_line(tiny_disk, tmp_path):
    """A data cache that cannot be written is one line naming the file, not "MockGPTDataset failed to build"."""
    (tiny_disk / "filler").write_bytes(b"\0" * (1024 * 1024 - 8192))
    result = run([*TINY_TRAIN, f"checkpoint.dir={tmp_path / 'ckpt'}", "train.steps=200",
                  f"data.cache_dir={tiny_disk / 'cache'}"], check=False, timeout=180)
    assert result.returncode == 2, result.stdout[-3000:]
    line = _one_line_error(result, "periln-train: error:")
    assert str(tiny_disk / "cache") in line and "No space left on device" in line, line
