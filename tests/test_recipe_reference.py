"""docs/recipes.md is the reference generated from the schema, and `periln-train --help-recipe` prints it."""

import dataclasses
import typing

import pytest

from launch import REPO
from periln_megatron import config
from periln_megatron.cli import train_main
from periln_megatron.config.reference import REGENERATE, field_meanings, main, reference_markdown


def schema_keys() -> list[str]:
    keys = []
    hints = typing.get_type_hints(config.Recipe)
    for f in dataclasses.fields(config.Recipe):
        if f.name == "source":
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(hints[f.name])]
        else:
            keys.append(f.name)
    return keys


def test_docs_recipes_md_is_current():
    doc = REPO / "docs/recipes.md"
    assert doc.read_text() == reference_markdown(), f"docs/recipes.md is stale: regenerate it with `{REGENERATE}`"
    assert main(["--check", str(doc)]) == 0


def test_check_names_the_regenerate_command(tmp_path, capsys):
    stale = tmp_path / "recipes.md"
    stale.write_text(reference_markdown().replace("`model.num_layers`", "`model.layers`"))
    assert main(["--check", str(stale)]) == 1
    assert REGENERATE in capsys.readouterr().err


def test_every_key_has_a_row_with_its_default_and_a_meaning():
    text = reference_markdown()
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]  # key, type, default, allowed, meaning
            assert len(cells) == 5 and cells[4], line
            rows[cells[0].strip("`")] = cells
    assert sorted(rows) == sorted(schema_keys() + ["base"])
    assert rows["model.placement"][1:4] == ["str", "`peri`", "`peri`, `pre`, `post`, `output`"]
    assert rows["tokenizer.type"][1:3] == ["str \\| null", "`null`"] and "`TikTokenizer`" in rows["tokenizer.type"][3]
    assert rows["model.vocab_size"][1:4] == ["int \\| null", "`null`", ""]
    assert rows["data.synthetic_vocab_size"][1:3] == ["int", "`256`"]
    assert rows["train.steps"][3] == ">= 1"
    assert rows["train.exit_signals"][2] == "`[SIGTERM, SIGUSR1]`"
    # the meanings are the schema's comments, one per field
    meanings = field_meanings()
    assert rows["data.synthetic"][4] == meanings["DataConfig"]["synthetic"]
    assert meanings["ModelConfig"]["cross_entropy_fusion"].startswith("On a GPU in bf16/fp8: megatron-core's fused cross-entropy")


def test_a_field_without_a_comment_is_refused(monkeypatch):
    from periln_megatron.config import reference as recipe_reference

    real = recipe_reference.field_meanings

    def without_one():
        meanings = real()
        del meanings["TrainConfig"]["seed"]
        return meanings

    monkeypatch.setattr(recipe_reference, "field_meanings", without_one)
    with pytest.raises(ValueError, match=r"`train.seed` has no comment"):
        reference_markdown()


def test_help_recipe_prints_the_reference_without_a_recipe(capsys):
    with pytest.raises(SystemExit) as done:
        train_main(["--help-recipe"])
    assert done.value.code == 0
    assert capsys.readouterr().out == (REPO / "docs/recipes.md").read_text()
    with pytest.raises(SystemExit):
        train_main(["--help"])
    assert "--help-recipe" in capsys.readouterr().out
