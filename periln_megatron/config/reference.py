"""The recipe reference (docs/recipes.md, `periln-train --help-recipe`), generated from the schema.

Every key, its type, default and allowed values come from the dataclasses and CHOICES in
periln_megatron/config/; its meaning is the comment on (or the comment block just above) the
field there, so the schema stays the one place to edit. Regenerate the file with

    python -m periln_megatron.config.reference --write docs/recipes.md

(`--check docs/recipes.md` exits 1 when the file is stale; tests/test_recipe_reference.py runs it).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import sys
import tokenize
import typing
from pathlib import Path

import yaml

from periln_megatron.config import recipe as config
from periln_megatron.config.validate import CHOICES, POSITIVE

REGENERATE = "python -m periln_megatron.config.reference --write docs/recipes.md"

INTRO = f"""# Recipe keys

<!-- Generated from periln_megatron/config/: edit the schema (a field's comment is its meaning),
then run `{REGENERATE}`. -->

Generated from the schema in `periln_megatron/config/` by `{REGENERATE}`;
`periln-train --help-recipe` prints the same text. A recipe is a YAML mapping of the sections below;
a key left out takes its default, an unknown key or a value of the wrong type is refused naming the file
and the dotted key, and `null` is YAML's None.

## How a recipe is read

1. **`base:`** A recipe may name one other recipe at its top level, `base: peri_ln.yaml`. A relative
   path is relative to the directory of the file that names it (not to the working directory), and a
   base may have a base of its own (a loop is refused). The base is read first and this file's keys are merged
   over it section by section: a key set here replaces the base's value (a list is replaced whole, not
   appended to), and the keys it does not name keep the base's. `recipes/tiny/pre_ln.yaml` is
   `base: peri_ln.yaml` plus `name` and `model.placement`.
2. **Overrides** on the command line come last, over the merged file: `periln-train --recipe R.yaml
   --set model.num_layers=8 parallel.tp=2` (also `periln-params R.yaml --set ...`). Each is a dotted
   `section.key=value` pair whose value is parsed as YAML (`8`, `3e-4`, `true`, `null`, `[a, b]`);
   several follow one `--set`, or repeat `--set`; each key at most once (a key given twice is refused, as in a recipe file).
3. The result is validated as a whole before anything is built or written (choices, ranges, the
   parallel layout against the world size, files named by `tokenizer.model` and `data.prefixes`); the
   resolved recipe is printed at start and saved as `recipe.yaml` in the run directory.

So the order, lowest to highest: the schema's defaults below, the deepest `base:`, each recipe
above it, `--set`.

## Vocabulary

The embedding has `model.vocab_size` rows, padded up to a multiple of
lcm(`model.make_vocab_size_divisible_by`, `parallel.tp`) (Megatron-LM pads to their product; the lcm
keeps the shape independent of the layout so checkpoints reshard across TP). With `model.vocab_size:
null` the size is the tokenizer's (read from `tokenizer.model`; a byte-fallback SentencePiece model
has at least 259 pieces). Synthetic data (`data.synthetic: true`, megatron-core's mock dataset of
counting token ids) needs a vocabulary too: the tokenizer's if one is given, else `model.vocab_size`,
else `data.synthetic_vocab_size`. The tiny recipes leave `model.vocab_size` null, so they take any
tokenizer: add `tokenizer.type`, `tokenizer.model`, `data.synthetic=false` and `data.prefixes`
(README.md, "Train on your own text").
"""


def _comments(source: str) -> dict[int, str]:
    """Line number -> the text of the comment on that line (without '#')."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def field_meanings() -> dict[str, dict[str, str]]:
    """{dataclass name: {field: meaning}} from the comments in config.py."""
    source = Path(config.__file__).read_text()
    comments = _comments(source)
    lines = source.splitlines()
    meanings: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = meanings.setdefault(node.name, {})
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            if stmt.lineno in comments and not lines[stmt.lineno - 1].lstrip().startswith("#"):
                fields[stmt.target.id] = comments[stmt.lineno]
                continue
            above, line = [], stmt.lineno - 1
            while line in comments and lines[line - 1].lstrip().startswith("#"):
                above.insert(0, comments[line])
                line -= 1
            if above:
                fields[stmt.target.id] = " ".join(above)
    return meanings


def _type_name(annotation) -> str:
    args = typing.get_args(annotation)
    if type(None) in args:
        return " | ".join("null" if a is type(None) else a.__name__ for a in args)
    return getattr(annotation, "__name__", str(annotation))


def _yaml(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _rows(cls, prefix: str, meanings: dict) -> list[tuple[str, str, str, str, str]]:
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.name == "source" or dataclasses.is_dataclass(hints[f.name]):
            continue
        dotted = f"{prefix}{f.name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        allowed = ""
        if dotted in CHOICES:
            allowed = ", ".join(f"`{_yaml(v)}`" for v in CHOICES[dotted])
        elif dotted in POSITIVE:
            allowed = ">= 1"
        meaning = meanings.get(cls.__name__, {}).get(f.name)
        if not meaning:
            raise ValueError(f"periln_megatron/config/: `{dotted}` has no comment: give the field a "
                             "one-line meaning as a comment, then regenerate")
        rows.append((f"`{dotted}`", _cell(_type_name(hints[f.name])), f"`{_cell(_yaml(default))}`",
                     allowed, _cell(meaning)))
    return rows


def _table(rows) -> list[str]:
    out = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def reference_markdown() -> str:
    meanings = field_meanings()
    lines = [INTRO, "## Keys", "", "### Top level", ""]
    top = _rows(config.Recipe, "", meanings)
    top.insert(0, ("`base`", _cell("str | null"), "`null`", "",
                   "another recipe this one is merged over, relative to this file (see above)"))
    lines += _table(top)
    hints = typing.get_type_hints(config.Recipe)
    for f in dataclasses.fields(config.Recipe):
        if dataclasses.is_dataclass(hints[f.name]):
            lines += ["", f"### `{f.name}`", ""] + _table(_rows(hints[f.name], f"{f.name}.", meanings))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m periln_megatron.config.reference",
                                     description="Print (or write, or check) the recipe reference.")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="PATH", help="write the reference to PATH (docs/recipes.md)")
    group.add_argument("--check", metavar="PATH", help="exit 1 if PATH differs from the generated reference")
    args = parser.parse_args(argv)
    text = reference_markdown()
    if args.write:
        Path(args.write).write_text(text)
    elif args.check:
        path = Path(args.check)
        if not path.is_file() or path.read_text() != text:
            print(f"{path}: stale recipe reference: regenerate it with `{REGENERATE}`", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
