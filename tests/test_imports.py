"""The package's import structure, read statically (ast, nothing imported): no cycle among
module-level imports (a function-level import is the deliberate way to break one), no
sys.path.insert in the package, and no closed choice list copied out of config/choices.py."""

import ast
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "periln_megatron"

# data/tokenizers/__init__.py still defines SENTENCEPIECE_TYPES, TOKENIZER_TYPES, PREPROCESS_ONLY_TYPES
# and LOADABLE_TYPES itself while that package is being split (issue #23); then it imports them.
CHOICES_PENDING: set[str] = set()


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict) -> str | None:
    """The package module `name` refers to (an attribute of a module resolves to that module)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path, modules: dict) -> tuple[set[str], set[str]]:
    """(modules imported at module level, modules imported inside functions)."""
    tree = ast.parse(path.read_text(), str(path))
    top, local = set(), set()
    is_package = path.name == "__init__.py"

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = module.split(".") if is_package else module.split(".")[:-1]
                    anchor = anchor[:len(anchor) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import mod` needs pkg.mod; `from pkg import name` needs pkg's __init__ to have
                # defined name (a cycle when pkg's __init__ imports this module first)
                subs = [f"{base}.{a.name}" for a in child.names if f"{base}.{a.name}" in modules]
                targets = subs + ([base] if len(subs) < len(child.names) else [])
            for target in targets:
                resolved = _resolve(target, modules) if target.startswith("periln_megatron") else None
                if resolved and resolved != module:
                    (local if in_function else top).add(resolved)
            visit(child, nested)

    visit(tree, False)
    return top, local


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = _modules()
    top, local = {}, {}
    for name, path in modules.items():
        top[name], local[name] = _imports(name, path, modules)
    return top, local


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def _edges_within(component: list[str], graph: dict) -> str:
    return "; ".join(f"{a} -> {b}" for a in component for b in sorted(graph[a]) if b in component)


def test_the_graph_sees_both_kinds_of_import():
    """The reader finds real edges: cli.py imports config at module level and the trainer inside
    train_main; and it finds a cycle where one is."""
    top, local = import_graph()
    assert "periln_megatron.config" in top["periln_megatron.cli"]
    assert "periln_megatron.training.loop" in local["periln_megatron.cli"]
    assert "periln_megatron.training.loop" not in top["periln_megatron.cli"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    top, _ = import_graph()
    found = cycles(top)
    assert not found, "import cycles (module-level imports; move one import into the function that needs it):\n" + \
        "\n".join(_edges_within(c, top) for c in found)


def test_no_sys_path_insert_in_the_package():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("insert", "append") and ast.unparse(node.func.value) == "sys.path"):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, "the package is installed (pip install -e .): no sys.path edits: " + ", ".join(offenders)


def _choice_lists() -> dict[frozenset, str]:
    from periln_megatron.config import choices

    out = {}
    for name, value in vars(choices).items():
        if name.isupper() and isinstance(value, (tuple, dict)) and len(value) > 1:
            out[frozenset(value)] = name
    return out


def test_choice_lists_live_only_in_config_choices():
    """A tuple, list or set literal of strings in the package that spells out a whole choice list
    of config/choices.py is a copy that can drift: import it instead."""
    known = _choice_lists()
    copies = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel == "periln_megatron/config/choices.py" or rel in CHOICES_PENDING:
            continue
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(node.elts) > 1 and all(
                    isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
                values = frozenset(e.value for e in node.elts)
                if values in known:
                    copies.append(f"{rel}:{node.lineno} repeats choices.{known[values]}")
    assert not copies, "\n".join(copies)


def test_the_recipe_checks_the_choice_lists_of_choices_py():
    from periln_megatron.config import CHOICES, choices
    from periln_megatron.model import specs

    assert CHOICES["model.placement"] is choices.PLACEMENTS and CHOICES["checkpoint.format"] is choices.CHECKPOINT_FORMATS
    assert specs.FP8_RECIPES is choices.FP8_RECIPES is CHOICES["precision.fp8_recipe"]
    assert set(choices.RECIPE_TOKENIZER_TYPES) <= set(choices.TOKENIZER_TYPES)
    assert set(choices.PLACEMENT_NAMES) == set(choices.PLACEMENTS)
    from periln_megatron.hf import mapping

    assert tuple(mapping.DTYPES) == choices.HF_DTYPES
