"""Loading a recipe: YAML with `base:` inheritance (relative to the file naming it; keys merge per
section, lists are replaced whole), then `--set` overrides (each key once), typed into the schema
and validated. Every error names the file and the dotted key."""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path

import yaml

from periln_megatron.config.recipe import Recipe, RecipeError
from periln_megatron.config.validate import validate


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class _DuplicateKeyError(yaml.MarkedYAMLError):
    pass


class _RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping, at any depth (plain YAML keeps
    the last and silently drops the first block)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges; later keys override it
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in first:
                        raise _DuplicateKeyError(problem=f"duplicate key `{key}` (first at line {first[key]})",
                                                 problem_mark=key_node.start_mark)
                except TypeError:  # an unhashable key: SafeLoader reports it
                    continue
                first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def read_mapping(path: Path, what: str = "recipe") -> dict:
    """A YAML file holding one mapping (duplicate keys refused); errors name file:line."""
    if not path.is_file():
        raise RecipeError(f"{path}: {what} file not found")
    try:
        raw = yaml.load(path.read_text(), Loader=_RecipeLoader) or {}
    except _DuplicateKeyError as e:
        raise RecipeError(f"{path}:{e.problem_mark.line + 1}: {e.problem}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        detail = "; ".join(str(x) for x in (e.context, e.problem) if x)
        raise RecipeError(f"{where}: invalid YAML: {detail}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a {what} is a mapping of {'sections' if what == 'recipe' else 'keys'}, "
                          f"got {type(raw).__name__}")
    return raw


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    if path.resolve() in seen:
        raise RecipeError(f"{path}: `base` chain loops back to itself")
    raw = read_mapping(path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    return _deep_merge(_read_yaml(path.parent / base, seen + (path.resolve(),)), raw)


def _type_ok(value, annotation) -> tuple[bool, object]:
    """Check (and gently coerce: int -> float) a YAML value against a field annotation."""
    args = typing.get_args(annotation)
    if type(None) in args:
        if value is None:
            return True, None
        annotation = next(a for a in args if a is not type(None))
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return True, float(value)
    if annotation is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return True, float(value)
        except ValueError:
            return False, value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is bool:
        return isinstance(value, bool), value
    origin = typing.get_origin(annotation) or annotation
    return isinstance(value, origin), value


def _build(cls, data: dict, source: str, prefix: str):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in hints or key == "source":
            known = ", ".join(f.name for f in dataclasses.fields(cls) if f.name != "source")
            raise RecipeError(f"{source}: unknown key `{dotted}` (known here: {known})")
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise RecipeError(f"{source}: `{dotted}` must be a section (mapping), got {value!r}")
            kwargs[key] = _build(hints[key], value, source, dotted + ".")
            continue
        ok, coerced = _type_ok(value, hints[key])
        if not ok:
            expected = getattr(hints[key], "__name__", str(hints[key]))
            raise RecipeError(f"{source}: `{dotted}` must be {expected}, got {value!r} ({type(value).__name__})")
        kwargs[key] = coerced
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict:
    """['model.num_layers=4', 'parallel.tp=2'] -> nested dict; values parsed as YAML. A key given
    twice (or a key and a section holding it) is an error, as a duplicate key in a recipe file is."""
    nested: dict = {}
    given: dict[tuple, str] = {}
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected key=value, e.g. model.num_layers=4")
        key, raw = item.split("=", 1)
        path = tuple(key.strip().split("."))
        for other, first in given.items():
            if other[:len(path)] == path or path[:len(other)] == other:
                what = (f"given twice ({first!r}, then {item!r})" if other == path else
                        f"overlaps {first!r} (a section and a key inside it)")
                raise RecipeError(f"--set {key.strip()}: {what}; give each key once")
        given[path] = item
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise RecipeError(f"--set {key}: cannot parse value {raw!r}: {e}") from None
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--set {key}: `{part}` is not a section")
        node[parts[-1]] = value
    return nested


def combine_overrides(*groups: list[str]) -> list[str]:
    """Override lists composed by a caller (defaults, then the caller's own): a key of a later group
    replaces the same key of an earlier one, so the result passes parse_overrides' duplicate check."""
    out: dict[str, str] = {}
    for group in groups:
        for item in group:
            key = item.split("=", 1)[0].strip()
            out.pop(key, None)
            out[key] = item
    return list(out.values())


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None, world_size: int | None = None,
                check_environment: bool = True) -> Recipe:
    path = Path(path)
    data = _read_yaml(path)
    source = str(path)
    if overrides:
        data = _deep_merge(data, parse_overrides(overrides))
        source = f"{path} (with --set {' '.join(overrides)})"
    recipe = _build(Recipe, data, source, "")
    recipe.source = source
    validate(recipe, world_size, check_environment)
    return recipe
