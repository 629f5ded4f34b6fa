"""Nothing lost under misuse (issue #15): what the tools promise when they are pointed at the wrong
place, given a bad value, or fed a damaged file. Each test's docstring states one promise.

Everything is real: the tools run as subprocesses, the checkpoints come from real training runs and
real conversions, the recipes are real YAML files. Expected failures are one line that names the
file (and the line or key) with no traceback; PERILN_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from launch import REPO, run, run_torchrun

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


def test_recipe_duplicate_key_in_a_base_names_the_base(tmp_path):
    """A duplicate in a `base:` file names that file; periln-params reports it in one line, exit 2."""
    base = tmp_path / "base.yaml"
    base.write_text((REPO / "recipes/tiny/peri_ln.yaml").read_text() + "train: {steps: 5}\n")
    line = len(base.read_text().splitlines())
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\nname: child\n")
    r = run([PY, "-m", "periln_megatron.params", str(child)], check=False, timeout=60)
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
