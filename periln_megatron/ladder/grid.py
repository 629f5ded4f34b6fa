"""A ladder's grid file (YAML): recipes (sizes) x placements x seeds x learning rates, one run each.

    name: paper-400m
    recipes: [recipes/peri_ln/400m.yaml]   # one per size; the placement is overridden per run
    placements: [peri, pre]                # model.placement
    seeds: [1234, 1235, 1236]              # train.seed
    lrs: [1.0e-3, 2.0e-3, 4.0e-3]          # optim.lr; optim.min_lr keeps the recipe's min_lr/lr ratio
    set: [train.steps=2000]                # --set overrides of every run
    dir: runs/ladders/paper-400m           # <dir>/<run name>: checkpoints, metrics.jsonl, logs
    nodes: 1                               # nodes per run (optional, default 1)
    gpus_per_node: 8                       # GPUs per node (optional, default 8)

Paths (recipes, dir) are relative to the working directory, as on the command line. Every run's
recipe is loaded with its overrides when the grid is read, so a bad override is refused before
anything runs. Runs are named from their coordinates: <size>-<placement>-lr<lr>-s<seed>.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from periln_megatron.config import RecipeError, load_recipe
from periln_megatron.config.choices import PLACEMENTS
from periln_megatron.config.load import read_mapping

KEYS = ("name", "recipes", "placements", "seeds", "lrs", "set", "dir", "nodes", "gpus_per_node")
REQUIRED = ("name", "recipes", "placements", "seeds", "lrs", "dir")
# Coordinates the ladder sets on every run; a `set` entry may not fix them.
OWNED = ("model.placement", "train.seed", "optim.lr", "optim.min_lr", "checkpoint.dir", "logging.run_dir")


class GridError(ValueError):
    pass


@dataclass(frozen=True)
class Run:
    name: str
    recipe: str  # as the grid names it
    size: str
    placement: str
    seed: int
    lr: float
    overrides: tuple[str, ...]  # every --set of the run, the grid's `set` first
    dir: Path
    nodes: int = 1
    gpus_per_node: int = 8

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class Grid:
    path: Path
    name: str
    recipes: list[str]
    placements: list[str]
    seeds: list[int]
    lrs: list[float]
    sets: list[str]
    dir: Path
    nodes: int = 1
    gpus_per_node: int = 8
    runs: list[Run] = field(default_factory=list)

    def sizes(self) -> dict[str, list[Run]]:
        """size -> its runs, in grid order (one Slurm job array each)."""
        out: dict[str, list[Run]] = {}
        for run in self.runs:
            out.setdefault(run.size, []).append(run)
        return out


def _fail(path: Path, key: str, message: str):
    raise GridError(f"{path}: `{key}`: {message}")


def _list(path: Path, raw: dict, key: str, kind, default=None) -> list:
    value = raw.get(key, default)
    if not isinstance(value, list):
        _fail(path, key, f"must be a list, got {value!r}")
    if not value:
        _fail(path, key, "is empty: a grid axis needs at least one value")
    out = []
    for item in value:
        if kind is float and isinstance(item, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                item = float(item)
            except ValueError:
                pass
        if kind is float and isinstance(item, int) and not isinstance(item, bool):
            item = float(item)
        if not isinstance(item, kind) or isinstance(item, bool):
            _fail(path, key, f"{item!r} is not a {kind.__name__}")
        out.append(item)
    if len(set(out)) != len(out):
        _fail(path, key, f"lists a value twice: {value!r}")
    return out


def _sets(path: Path, raw: dict) -> list[str]:
    value = raw.get("set", [])
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        _fail(path, "set", f"must be a list of key=value strings, got {value!r}")
    return value


def _positive(path: Path, raw: dict, key: str, default: int) -> int:
    value = raw.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        _fail(path, key, f"must be a whole number >= 1, got {value!r}")
    return value


def _size_label(recipe) -> str:
    return recipe.nominal_size.lower() if recipe.nominal_size else Path(recipe.source.split(" ")[0]).parent.name


def lr_text(lr: float) -> str:
    return f"{lr:g}"


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file; every run's recipe is loaded (without the environment check)."""
    path = Path(path)
    try:
        raw = read_mapping(path, "grid")
    except RecipeError as e:
        raise GridError(str(e)) from None
    return grid_from_mapping(raw, path)


def grid_from_mapping(raw: dict, path: str | Path = "<grid>") -> Grid:
    """A grid from its keys (a caller that builds one without a file, e.g. the demo); `path` names it in errors."""
    path = Path(path)
    unknown = [k for k in raw if k not in KEYS]
    if unknown:
        _fail(path, unknown[0], f"unknown key (known: {', '.join(KEYS)})")
    for key in REQUIRED:
        if key not in raw:
            _fail(path, key, "missing")
    name = raw["name"]
    if not isinstance(name, str) or not name or "/" in name or " " in name:
        _fail(path, "name", f"must be a word without '/' or spaces, got {name!r}")
    if not isinstance(raw["dir"], str) or not raw["dir"]:
        _fail(path, "dir", f"must be a path, got {raw['dir']!r}")
    grid = Grid(path=path, name=name, recipes=_list(path, raw, "recipes", str),
                placements=_list(path, raw, "placements", str), seeds=_list(path, raw, "seeds", int),
                lrs=_list(path, raw, "lrs", float), sets=_sets(path, raw), dir=Path(raw["dir"]), nodes=_positive(path, raw, "nodes", 1),
                gpus_per_node=_positive(path, raw, "gpus_per_node", 8))
    for p in grid.placements:
        if p not in PLACEMENTS:
            _fail(path, "placements", f"{p!r} is not one of {', '.join(PLACEMENTS)}")
    for lr in grid.lrs:
        if not lr > 0:
            _fail(path, "lrs", f"{lr!r} must be > 0")
    for item in grid.sets:
        key = item.split("=", 1)[0].strip()
        if "=" not in item:
            _fail(path, "set", f"{item!r}: expected key=value, e.g. train.steps=2000")
        if key in OWNED:
            _fail(path, "set", f"{item!r}: the ladder sets {key} itself (a grid axis or the run's directory)")
        if any(c.isspace() for c in item):
            _fail(path, "set", f"{item!r}: no spaces (Slurm's EXTRA_SETS splits on them; write lists as [a,b])")
    grid.runs = _runs(grid)
    return grid


def _runs(grid: Grid) -> list[Run]:
    path, world = grid.path, grid.nodes * grid.gpus_per_node
    runs: list[Run] = []
    seen: dict[str, str] = {}
    for recipe_path in grid.recipes:
        if not Path(recipe_path).is_file():
            _fail(path, "recipes", f"{recipe_path}: recipe file not found (paths are relative to the working directory)")
        try:
            base = load_recipe(recipe_path, list(grid.sets), world_size=world, check_environment=False)
        except RecipeError as e:
            _fail(path, "set", str(e))
        size = _size_label(base)
        if size in seen:
            _fail(path, "recipes", f"{recipe_path} and {seen[size]} are both size {size!r}: one recipe per size")
        seen[size] = recipe_path
        ratio = base.optim.min_lr / base.optim.lr
        for placement in grid.placements:
            for lr in grid.lrs:
                for seed in grid.seeds:
                    name = f"{size}-{placement}-lr{lr_text(lr)}-s{seed}"
                    if any(r.name == name for r in runs):
                        _fail(path, "lrs", f"two learning rates print as {lr_text(lr)}: runs are named from them")
                    run_dir = grid.dir / name
                    overrides = (*grid.sets, f"model.placement={placement}", f"train.seed={seed}",
                                 f"optim.lr={lr!r}", f"optim.min_lr={lr * ratio:.6g}", f"checkpoint.dir={run_dir}")
                    try:
                        load_recipe(recipe_path, list(overrides), world_size=world, check_environment=False)
                    except RecipeError as e:
                        _fail(path, "set", f"run {name}: {e}")
                    runs.append(Run(name=name, recipe=recipe_path, size=size, placement=placement, seed=seed,
                                    lr=lr, overrides=overrides, dir=run_dir, nodes=grid.nodes,
                                    gpus_per_node=grid.gpus_per_node))
    return runs


def run_recipe(run: Run):
    """The run's recipe with every override (no environment check: data may live elsewhere)."""
    return load_recipe(run.recipe, list(run.overrides), world_size=run.gpus, check_environment=False)
