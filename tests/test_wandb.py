"""Experiment tracking with real wandb in offline mode: the trainer's scalars, per-layer diagnostics
and recipe as written to the offline run's transaction log (run-<id>.wandb, read back record by
record), rank 0 only, a resumed run continuing the same W&B run; the recipe keys' validation; the
one-line messages when wandb or TensorBoard is enabled but not installed."""

from __future__ import annotations

import json
import struct
import sys
import zlib
from pathlib import Path

import pytest

from launch import REPO, run, run_torchrun
from periln_megatron.training.metrics import read_metrics

TINY = str(REPO / "recipes/tiny/peri_ln.yaml")


def offline(tmp: Path) -> dict:
    """wandb offline, quiet, with its config/cache/data dirs under tmp (not the user's home)."""
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(tmp / "wandb-config"),
            "WANDB_CACHE_DIR": str(tmp / "wandb-cache"), "WANDB_DATA_DIR": str(tmp / "wandb-data")}

WANDB_SETS = ["logging.wandb_project=periln-test", "logging.wandb_name=tiny-wandb", "diagnostics.interval=2",
              "train.eval_interval=2", "train.eval_iters=1", "checkpoint.interval=0"]


# ------------------------------------------------------------------- reading an offline run

def wandb_records(path: Path):
    """The records of a .wandb transaction log: a 7-byte header (':W&B', magic 0xBEE1, version 0),
    then LevelDB-log framing: 32 KiB blocks of chunks (crc32 of type+data, length, type: 1 full,
    2 first, 3 middle, 4 last), each record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left for a chunk header: zero padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, f"{path}: bad checksum at {pos}"
        pos += 7 + length
        if kind in (1, 2):
            pending = b""
        pending += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def _put(out: dict, item) -> None:
    """An item (history row or config update): `key`, or `nested_key` [outer, ..., inner] for a dict
    value that wandb flattened (a table's path, size, ...)."""
    keys = list(item.nested_key) or [item.key]
    for k in keys[:-1]:
        out = out.setdefault(k, {})
    out[keys[-1]] = json.loads(item.value_json)


def read_offline_run(run_dir: Path) -> dict:
    """{'run': the run record, 'config': {...}, 'history': {step: {key: value}}} of one offline run dir."""
    (log,) = run_dir.glob("run-*.wandb")
    out = {"run": None, "config": {}, "history": {}}
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run"] = record.run
        if kind in ("run", "config"):
            for update in getattr(record, kind).config.update if kind == "run" else record.config.update:
                _put(out["config"], update)
        elif kind == "history":
            row = out["history"].setdefault(record.history.step.num, {})
            for item in record.history.item:
                _put(row, item)
    return out


def metrics_records(run_dir: Path) -> dict[int, dict]:
    return read_metrics(run_dir)


# ------------------------------------------------------------------------------- the runs

@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    """4 steps on 2 ranks (DP=2), W&B offline, diagnostics and validation every 2 steps."""
    ckpt = tmp_path_factory.mktemp("wandb")
    result = run_torchrun(2, ["-m", "periln_megatron.train", "--recipe", TINY, "--set", f"checkpoint.dir={ckpt}",
                              "train.steps=4", *WANDB_SETS], env=offline(tmp_path_factory.mktemp("wandb-home")), timeout=300)
    return ckpt, result.stdout


def test_rank0_writes_one_offline_run_with_the_trainers_numbers(wandb_run):
    ckpt, log = wandb_run
    runs = sorted((ckpt / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs  # rank 0 only
    run_id = (ckpt / "wandb/periln_run_id").read_text().strip()
    assert runs[0].name.endswith(f"-{run_id}")
    got = read_offline_run(runs[0])
    assert got["run"].project == "periln-test" and got["run"].display_name == "tiny-wandb"
    assert got["run"].run_id == run_id

    # the recipe is the run's config, section by section
    recipe = __import__("yaml").safe_load((ckpt / "recipe.yaml").read_text())
    for section in ("model", "parallel", "optim", "train", "logging", "diagnostics"):
        assert got["config"][section] == recipe[section], section
    assert got["config"]["model"]["placement"] == "peri" and got["config"]["name"] == "tiny-peri-ln"

    expected = metrics_records(ckpt)
    history = got["history"]
    assert sorted(history) == sorted(expected) == [1, 2, 3, 4]
    for step, record in expected.items():
        row = history[step]
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "ms_per_step"):
            assert row[key] == pytest.approx(record[key], rel=1e-12), (step, key)
        assert ("valid_loss" in row) == ("valid_loss" in record) == (step in (2, 4))
        for key in ("spike_total", "spike_rate", "rollbacks"):  # the stability score, every step
            assert row[key] == record[key], (step, key)
    assert history[4]["final_valid_loss"] == pytest.approx(expected[4]["final_valid_loss"], rel=1e-12)
    assert "skipped" not in history[1] and "spike" not in history[1]  # flags stay in metrics.jsonl

    # per-layer diagnostics: one scalar per layer on measured steps, `key/layer_NN` (list index)
    for step in (2, 4):
        for key in ("layer_variance", "layer_max_abs", "layer_grad_norm"):
            values = expected[step][key]
            assert len(values) >= 4
            for i, value in enumerate(values):
                if value is not None:
                    assert history[step][f"{key}/layer_{i:02d}"] == pytest.approx(value, rel=1e-12), (step, key, i)
            assert f"{key}/layer_{len(values):02d}" not in history[step]
    assert not any(k.startswith("layer_variance/") for k in history[1])  # not measured at step 1
    assert "layer_variance/layer_03" in set().union(*history.values())


def test_depth_profiles_are_line_series_tables(wandb_run):
    ckpt, _ = wandb_run
    (run_dir,) = (ckpt / "wandb").glob("offline-run-*")
    got = read_offline_run(run_dir)
    chart = got["history"][4]["depth/layer_variance_table"]
    assert chart["_type"] == "table-file"
    table = json.loads((run_dir / "files" / chart["path"]).read_text())
    assert table["columns"] == ["step", "lineKey", "lineVal"]  # wandb.plot.line_series: x, line, y
    expected = metrics_records(ckpt)
    lines = {}
    for x, line, y in table["data"]:
        lines.setdefault(line, {})[x] = y
    assert sorted(lines) == ["step 2", "step 4"]
    for step in (2, 4):
        want = {i: v for i, v in enumerate(expected[step]["layer_variance"]) if v is not None}
        assert lines[f"step {step}"] == pytest.approx(want, rel=1e-12)


def test_resumed_run_continues_the_same_wandb_run(wandb_run, tmp_path):
    """A run resumed from the checkpoint (here: on to 6 steps, in one process) logs into the same W&B
    run: the id kept in <run dir>/wandb/periln_run_id, resume="allow"."""
    import shutil

    ckpt, _ = wandb_run
    resumed = tmp_path / "resumed"
    shutil.copytree(ckpt, resumed)
    run([sys.executable, "-m", "periln_megatron.train", "--recipe", TINY, "--set", f"checkpoint.dir={resumed}",
         "train.steps=6", "checkpoint.on_schedule_change=checkpoint", *WANDB_SETS], env=offline(tmp_path), timeout=300)
    run_id = (ckpt / "wandb/periln_run_id").read_text().strip()
    assert (resumed / "wandb/periln_run_id").read_text().strip() == run_id
    runs = sorted((resumed / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs)
    second = read_offline_run(max(runs, key=lambda r: r.stat().st_mtime_ns))
    assert second["run"].run_id == run_id
    assert sorted(second["history"]) == [5, 6]
    assert second["history"][6]["loss"] == pytest.approx(metrics_records(resumed)[6]["loss"], rel=1e-12)


# ------------------------------------------------------------------------------- the recipe keys

@pytest.mark.parametrize("sets,key,message", [
    (["logging.wandb_mode=online2"], "logging.wandb_mode", "must be one of"),
    (["logging.wandb_entity=team"], "logging.wandb_entity", "logging.wandb_project is not"),
    (["logging.wandb_mode=offline"], "logging.wandb_mode", "logging.wandb_project is not"),
    (["logging.wandb_project="], None, None),  # null: off
    (["logging.wandb_project=''"], "logging.wandb_project", "empty string"),
    (["logging.wandb_project=p", "logging.wandb_name=' '"], "logging.wandb_name", "empty string"),
    (["logging.wandb_project=[a]"], "logging.wandb_project", "must be str"),
    (["logging.wandb_project=p", "logging.wandb_mode=disabled", "logging.wandb_dir=/tmp/x"], None, None),
])
def test_wandb_keys_are_validated(sets, key, message):
    from periln_megatron.config import RecipeError, load_recipe

    if key is None:
        load_recipe(TINY, sets)
        return
    with pytest.raises(RecipeError) as e:
        load_recipe(TINY, sets)
    assert f"`{key}`" in str(e.value) and message in str(e.value)


def _cli(code: str, tmp_path: Path, *sets: str, env: dict | None = None):
    """The trainer in one process with `code` run first (to make a package unimportable)."""
    script = (f"import sys\n{code}\nfrom periln_megatron.cli import train_main\n"
              f"sys.exit(train_main(['--recipe', {TINY!r}, '--set', 'checkpoint.dir={tmp_path}', *{list(sets)!r}]))")
    return run([sys.executable, "-c", script], env=env, check=False, timeout=240)


def test_wandb_enabled_but_not_installed_is_one_line_before_training(tmp_path):
    r = _cli("sys.modules['wandb'] = None  # not importable, as where it is not installed", tmp_path,
             "logging.wandb_project=p", env=offline(tmp_path))
    assert r.returncode == 2, r.stdout
    errors = [line for line in r.stdout.splitlines() if "error" in line]
    assert len(errors) == 1 and "`logging.wandb_project` is set but wandb is not installed" in errors[0]
    assert "pip install wandb" in errors[0]
    assert not (tmp_path / "metrics.jsonl").exists()


def test_tensorboard_enabled_but_not_installed_warns_once_and_trains(tmp_path):
    r = _cli("sys.modules['tensorboard'] = None", tmp_path, "logging.tensorboard=true", "train.steps=3",
             "checkpoint.save_at_end=false")
    assert r.returncode == 0, r.stdout[-3000:]
    warnings = [line for line in r.stdout.splitlines() if "tensorboard is not installed" in line]
    assert warnings == ["periln-train: warning: logging.tensorboard is true but tensorboard is not installed "
                        "(pip install tensorboard); metrics go to metrics.jsonl only"]
    assert sorted(metrics_records(tmp_path)) == [1, 2, 3]
    assert not (tmp_path / "tensorboard").exists()
