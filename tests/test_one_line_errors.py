"""Bad input to the tools and the recipe loader: one line on stderr naming the file, key or flag, a
non-zero exit (the tool's own convention: 1 bad input, 2 bad usage or recipe), nothing written.

Every case runs the tool's `main(argv)` (or the trainer's `train_main`, or `load_recipe`) in this
process, with a real SentencePiece model trained here and real megatron-core indexed files.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest

from launch import REPO
from periln_megatron.cli import params_main, train_main
from periln_megatron.config import Recipe, RecipeError, load_recipe
from periln_megatron.data import inspect as inspect_data
from periln_megatron.data import preprocess
from periln_megatron.data.indexed import PrefixWriter
from periln_megatron.data.tokenizers import train as train_tokenizer

TINY = str(REPO / "recipes/tiny/peri_ln.yaml")
SP = "SentencePieceTokenizer"


def one_line(capfd, needles: list[str]) -> str:
    """The run's stderr: exactly one line, holding every needle."""
    err = capfd.readouterr().err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0], err
    assert "Traceback" not in err and all(n in lines[0] for n in needles), (needles, err)
    return lines[0]


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture(scope="module")
def tools():
    return {"preprocess_data": preprocess, "train_tokenizer": train_tokenizer, "inspect_data": inspect_data}


@pytest.fixture(scope="module")
def spm(tools, tmp_path_factory) -> str:
    work = tmp_path_factory.mktemp("spm")
    text = (REPO / "tests/data/tinyshakespeare.txt").read_text().splitlines()[:3000]
    (work / "train.txt").write_text("\n".join(text) + "\n")
    rc = tools["train_tokenizer"].main(["--input", str(work / "train.txt"), "--model-prefix", str(work / "sp"),
                                        "--vocab-size", "400"])
    assert rc == 0
    return str(work / "sp.model")


GOOD = '{"text": "First Citizen: before we proceed any further, hear me speak."}\n'

# name: (files {name: bytes}, extra flags, needles beyond the first input's name)
PREPROCESS_CASES = {
    "lone surrogate escape": ({"d.jsonl": GOOD.encode() + b'{"text": "x\\ud800y"}\n'}, [],
                              ["d.jsonl:2:", "'text'", "lone surrogate", "U+D800"]),
    "lone surrogate, UTF-8 bytes": ({"d.jsonl": GOOD.encode() + b'{"text": "x\xed\xa0\x80y"}\n'}, [],
                                    ["d.jsonl:2:", "lone surrogate"]),
    "empty file": ({"d.jsonl": b""}, [], ["d.jsonl:", "no tokens for key 'text'", "nothing written"]),
    "blank lines only": ({"d.jsonl": b"\n  \n\n"}, [], ["d.jsonl:", "no tokens", "3 blank lines"]),
    "empty documents only": ({"d.jsonl": b'{"text": ""}\n{"text": ""}\n'}, [], ["d.jsonl:", "no tokens", "2 empty"]),
    "empty documents kept": ({"d.jsonl": b'{"text": ""}\n'}, ["--keep-empty-documents"], ["d.jsonl:", "no tokens"]),
    "every line skipped": ({"d.jsonl": b'{"txt": "a"}\n'}, ["--on-error", "skip"], ["d.jsonl:", "1 skipped"]),
    "one empty file of two, kept separate": ({"a.jsonl": GOOD.encode(), "d.jsonl": b""}, ["--keep-separate"],
                                             ["d.jsonl:", "no tokens"]),
}


@pytest.mark.parametrize("case", list(PREPROCESS_CASES))
def test_preprocess_data(tools, spm, tmp_path, capfd, case):
    files, extra, needles = PREPROCESS_CASES[case]
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    before = files_under(tmp_path)
    rc = tools["preprocess_data"].main(["--input", *(str(tmp_path / n) for n in files), "--output-prefix",
                                        str(tmp_path / "out" / "c"), "--tokenizer-type", SP, "--tokenizer-model", spm,
                                        "--workers", "1", "--quiet", *extra])
    assert rc == 1
    one_line(capfd, ["error:", *needles])
    assert files_under(tmp_path) == before  # not even the output directory


def test_preprocess_data_skips_a_lone_surrogate_under_on_error_skip(tools, spm, tmp_path, capfd):
    (tmp_path / "d.jsonl").write_bytes(GOOD.encode() + b'{"text": "x\\udfffy"}\n' + GOOD.encode())
    summary = tmp_path / "summary.json"
    rc = tools["preprocess_data"].main(["--input", str(tmp_path / "d.jsonl"), "--output-prefix", str(tmp_path / "c"),
                                        "--tokenizer-type", SP, "--tokenizer-model", spm, "--workers", "1",
                                        "--on-error", "skip", "--summary-json", str(summary)])
    assert rc == 0
    assert "d.jsonl:2: key 'text' holds a lone surrogate (U+DFFF" in capfd.readouterr().err
    stats = json.loads(summary.read_text())
    assert stats["documents"] == 2 and stats["skipped"]["lone surrogate"] == 1


def _empty_prefix(path: Path) -> str:
    """A 0-document prefix as preprocess_data.py wrote one before it refused empty input."""
    writer = PrefixWriter(path, 400)
    assert writer.commit() == (0, 0)
    return str(path)


@pytest.mark.parametrize("suffix", ["", ".bin", ".idx"])
def test_inspect_data_calls_an_empty_prefix_empty(tools, tmp_path, capfd, suffix):
    prefix = _empty_prefix(tmp_path / "empty_text_document")
    assert tools["inspect_data"].main([prefix + suffix]) == 1
    one_line(capfd, [f"error: {prefix}: an empty dataset (0 documents, 0 tokens)"])


def test_trainer_on_an_empty_prefix_names_it(tmp_path, capfd):
    """The trainer's own check (periln-train before any process group): it used to fail in
    megatron-core with "cannot mmap an empty file", naming none."""
    prefix = _empty_prefix(tmp_path / "empty_text_document")
    run_dir = tmp_path / "run"
    rc = train_main(["--recipe", TINY, "--set", "data.synthetic=false", "model.vocab_size=256", f"data.prefixes=[{prefix}]",
                     f"logging.run_dir={run_dir}"])
    assert rc == 2
    one_line(capfd, [f"periln-train: error: {prefix}: an empty dataset (0 documents, 0 tokens) in data.prefixes"])
    assert not run_dir.exists()


@pytest.mark.parametrize("suffix", [".bin", ".idx"])
def test_a_prefix_given_as_its_file_is_taken_by_both_trainer_and_inspect_data(tools, spm, tmp_path, capfd, suffix):
    (tmp_path / "d.jsonl").write_text(GOOD * 20)
    assert tools["preprocess_data"].main(["--input", str(tmp_path / "d.jsonl"), "--output-prefix", str(tmp_path / "c"),
                                          "--tokenizer-type", SP, "--tokenizer-model", spm, "--workers", "1",
                                          "--quiet"]) == 0
    prefix = str(tmp_path / "c_text_document")
    assert tools["inspect_data"].main([prefix + suffix, "--show", "0"]) == 0
    assert f"prefix: {prefix}\n" in capfd.readouterr().out
    from periln_megatron.data.datasets import check_prefixes, split_blend

    recipe = load_recipe(TINY, ["data.synthetic=false", f"data.prefixes=[{prefix + suffix}]", "data.split=100,0,0",
                                 "model.vocab_size=512"])
    assert split_blend(recipe.data.prefixes) == ([prefix], None)
    check_prefixes(recipe)  # reads PREFIX.bin/.idx


NOKEY = '{"txt": "a"}\n'
SURROGATE = '{"text": "x\\ud800y"}\n'
# name: (files {name: text}, needles)
TOKENIZER_CASES = {
    "empty file": ({"d.jsonl": ""}, ["d.jsonl: no text to train on"]),
    "blank lines only": ({"d.txt": "\n   \n"}, ["d.txt: no text to train on"]),
    "empty documents only": ({"d.jsonl": '{"text": ""}\n{"text": "  "}\n'}, ["d.jsonl: no text to train on"]),
    "missing key, first line": ({"d.jsonl": NOKEY}, ["d.jsonl:1: cannot read key 'text'"]),
    # after good text: raised inside SentencePiece's sentence iterator, which wraps it with its frames
    "missing key, later file": ({"a.jsonl": GOOD * 50, "d.jsonl": GOOD + NOKEY},
                                ["d.jsonl:2: cannot read key 'text'"]),
    "lone surrogate, first line": ({"d.jsonl": SURROGATE}, ["d.jsonl:1: key 'text' holds a lone surrogate (U+D800"]),
    "lone surrogate, later line": ({"a.jsonl": GOOD * 50, "d.jsonl": GOOD + SURROGATE},
                                   ["d.jsonl:2: key 'text' holds a lone surrogate"]),
}


@pytest.mark.parametrize("case", list(TOKENIZER_CASES))
def test_train_tokenizer(tools, tmp_path, capfd, case):
    files, needles = TOKENIZER_CASES[case]
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8", errors="surrogatepass")
    before = files_under(tmp_path)
    rc = tools["train_tokenizer"].main(["--input", *(str(tmp_path / n) for n in files), "--model-prefix",
                                        str(tmp_path / "tok" / "sp"), "--vocab-size", "300"])
    assert rc == 1
    one_line(capfd, ["error: " + str(tmp_path / needles[0].split(":")[0]), *needles])
    assert files_under(tmp_path) == before  # no model, and not the directory made for it


@pytest.mark.parametrize("flag,kept", [([], False), (["--no-remove-extra-whitespaces"], True)])
def test_train_tokenizer_whitespace_flag_does_what_help_says(tools, tmp_path, capfd, flag, kept):
    """--help: the default drops repeated and leading spaces (in the model, so when encoding too);
    --no-remove-extra-whitespaces keeps every space."""
    from periln_megatron.data.tokenizers import load_tokenizer

    helps = {a.dest: a.help for a in tools["train_tokenizer"].build_parser()._actions}
    assert "keeps text as is" not in helps["normalization"]
    assert "repeated spaces are dropped" in helps["remove_extra_whitespaces"]
    assert "--no-remove-extra-whitespaces keeps every space" in helps["remove_extra_whitespaces"]
    lines = ["def f(x):", "    return  x + 1", "        if x:  pass"] * 60
    (tmp_path / "code.txt").write_text("\n".join(lines) + "\n")
    assert tools["train_tokenizer"].main(["--input", str(tmp_path / "code.txt"), "--model-prefix",
                                          str(tmp_path / "sp"), "--vocab-size", "300", *flag]) == 0
    tok = load_tokenizer(SP, str(tmp_path / "sp.model"))
    text = "def f(x):\n    return  x + 1"
    assert (tok.decode(tok.sp.encode(text)) == text) is kept
    record = json.loads((tmp_path / "sp.json").read_text())
    assert record["settings"]["remove_extra_whitespaces"] is not kept


# --set overrides: (sets, key named); through periln-params: exit 2, one line, nothing on stdout
RECIPE_CASES = {
    "lr inf": (["optim.lr=.inf"], "optim.lr"),
    "lr nan": (["optim.lr=.nan"], "optim.lr"),
    "lr negative": (["optim.lr=-1"], "optim.lr"),
    "checkpoint interval negative": (["checkpoint.interval=-1"], "checkpoint.interval"),
    "split without train": (["data.split=0,0,100"], "data.split"),
    "split not numbers": (["data.split=abc"], "data.split"),
    "split four parts": (["data.split=90,5,3,2"], "data.split"),
    "split without valid, with eval": (["data.split=100,0,0", "train.eval_interval=5"], "data.split"),
    "blend weight negative": (["data.synthetic=false", "data.prefixes=[-1, /a, 2, /b]"], "data.prefixes"),
    "blend weights zero": (["data.synthetic=false", "data.prefixes=[0, /a, 0, /b]"], "data.prefixes"),
    "blend weight nan": (["data.synthetic=false", "data.prefixes=[.nan, /a, 1, /b]"], "data.prefixes"),
    "dropout 1": (["model.hidden_dropout=1.0"], "model.hidden_dropout"),
    "adam beta2 1": (["optim.adam_beta2=1"], "optim.adam_beta2"),
}


@pytest.mark.parametrize("case", list(RECIPE_CASES))
def test_recipe_values(capfd, case):
    sets, key = RECIPE_CASES[case]
    assert params_main([TINY, "--set", *sets]) == 2
    one_line(capfd, ["periln-params: error:", TINY, f"`{key}`"])
    assert capfd.readouterr().out == ""


def test_trainer_refuses_lr_inf_before_writing_anything(tmp_path, capfd):
    run_dir = tmp_path / "run"
    assert train_main(["--recipe", TINY, "--set", "optim.lr=.inf", f"logging.run_dir={run_dir}"]) == 2
    one_line(capfd, ["periln-train: error:", "`optim.lr` must be a finite number, got inf"])
    assert not run_dir.exists()


def _numeric_keys() -> list[tuple[str, str]]:
    """(dotted key, "int" or "float") of every number-typed key of the schema, read from its dataclasses."""
    out = []
    for section in dataclasses.fields(Recipe):
        cls = typing.get_type_hints(Recipe)[section.name]
        for name, hint in typing.get_type_hints(cls).items() if dataclasses.is_dataclass(cls) else ():
            kinds = [a for a in (typing.get_args(hint) or (hint,)) if a in (int, float)]
            out += [(f"{section.name}.{name}", kinds[0].__name__)] if kinds else []
    return out


NUMERIC_KEYS = _numeric_keys()


@pytest.mark.parametrize("key,kind", NUMERIC_KEYS, ids=[k for k, _ in NUMERIC_KEYS])
def test_every_number_key_refuses_nonfinite_or_negative(key, kind):
    """Every float key of the schema refuses nan and inf, every integer key a negative value."""
    bad = [".nan", ".inf", "-.inf"] if kind == "float" else ["-1"]
    for value in bad:
        with pytest.raises(RecipeError) as err:
            load_recipe(TINY, [f"{key}={value}"], check_environment=False)
        message = str(err.value)
        assert f"`{key}`" in message and "\n" not in message, (value, message)


@pytest.mark.parametrize("argv", [
    ["--set", "model.num_layers=2", "--set", "model.num_layers=4"],
    ["--set", "model.num_layers=2", "model.num_layers=4"],
    ["--set", "model={num_layers: 2}", "model.num_layers=4"],
], ids=["two flags", "one flag", "section and key"])
def test_a_key_set_twice_is_refused_as_in_a_recipe_file(capfd, argv):
    assert params_main([TINY, *argv]) == 2
    one_line(capfd, ["periln-params: error: --set model.num_layers:", "give each key once"])


def test_combine_overrides_lets_callers_replace_their_defaults():
    from periln_megatron.config import combine_overrides

    sets = combine_overrides(["train.steps=4", "checkpoint.dir=/x"], ["train.steps=9"])
    assert sets == ["checkpoint.dir=/x", "train.steps=9"]
    assert load_recipe(TINY, sets, check_environment=False).train.steps == 9


def test_periln_params_help_shows_a_plain_percent(capsys):
    with pytest.raises(SystemExit) as exit_:
        params_main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "within 10% of its total" in " ".join(out.split()) and "%%" not in out
