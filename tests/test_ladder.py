"""periln-ladder: grid files refused with one-line errors, plan on the shipped paper grids, and a
miniature grid run with --local whose report equals the numbers in each run's metrics.jsonl, a
diverged run counted as diverged."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from launch import REPO, run
from periln_megatron.commands.ladder import main as ladder_main
from periln_megatron.ladder.grid import GridError, load_grid
from periln_megatron.ladder.plan import PlanError, plan, totals

PAPER_GRIDS = sorted((REPO / "recipes/ladders").glob("paper-*.yaml"))
TINY = "recipes/tiny/peri_ln.yaml"
# a few steps, one evaluation and one diagnostics pass at the end, no checkpoint saves in between
MINI_SET = ["train.steps=3", "train.eval_interval=3", "train.eval_iters=1", "diagnostics.interval=3",
            "checkpoint.interval=0", "checkpoint.save_at_end=false"]


def write_grid(path: Path, **over) -> Path:
    grid = {"name": "mini", "recipes": [TINY], "placements": ["peri", "pre"], "seeds": [1, 2],
            "lrs": [3.0e-3, 1.0e-2], "set": MINI_SET, "dir": str(path.parent / "runs"), "nodes": 1,
            "gpus_per_node": 1}
    grid.update(over)
    grid = {k: v for k, v in grid.items() if v is not None}
    path.write_text(json.dumps(grid))  # JSON is YAML
    return path


def cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = ladder_main(list(argv))
    return code, out.getvalue(), err.getvalue()


# ----------------------------------------------------------------------------- grid files

@pytest.mark.parametrize("over, key, words", [
    ({"colour": "red"}, "colour", "unknown key"),
    ({"seeds": []}, "seeds", "empty"),
    ({"lrs": None}, "lrs", "missing"),
    ({"placements": ["peri", "sideways"]}, "placements", "'sideways' is not one of"),
    ({"lrs": ["fast"]}, "lrs", "not a float"),
    ({"set": ["model.no_such_key=1"]}, "set", "unknown key `model.no_such_key`"),
    ({"set": ["train.steps=-1"]}, "set", "train.steps"),
    ({"set": ["optim.lr=1"]}, "set", "the ladder sets optim.lr itself"),
    ({"set": ["data.prefixes=[a, b]"]}, "set", "no spaces"),
    ({"recipes": ["recipes/none.yaml"]}, "recipes", "recipe file not found"),
    ({"nodes": 0}, "nodes", ">= 1"),
    ({"lrs": [1e-3, 1.0000001e-3]}, "lrs", "two learning rates print as 0.001"),
])
def test_bad_grid_is_one_line_naming_file_and_key(tmp_path, over, key, words):
    path = write_grid(tmp_path / "grid.yaml", **over)
    with pytest.raises(GridError) as e:
        load_grid(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: `{key}`") and words in msg, msg
    code, out, err = cli("plan", str(path))
    assert code == 2 and out == "" and err.count("\n") == 1 and words in err, err


def test_grid_runs_named_from_coordinates_min_lr_scales(tmp_path):
    grid = load_grid(write_grid(tmp_path / "grid.yaml"))
    assert [r.name for r in grid.runs][:2] == ["tiny-peri-lr0.003-s1", "tiny-peri-lr0.003-s2"]
    assert len(grid.runs) == 8 and len({r.dir for r in grid.runs}) == 8
    run_ = next(r for r in grid.runs if r.name == "tiny-pre-lr0.01-s2")
    # recipes/tiny/peri_ln.yaml: lr 3e-3, min_lr 3e-4
    assert {"model.placement=pre", "train.seed=2", "optim.lr=0.01", "optim.min_lr=0.001"} <= set(run_.overrides)


# ----------------------------------------------------------------------------- plan

@pytest.mark.parametrize("path", PAPER_GRIDS, ids=lambda p: p.stem)
def test_plan_paper_grids(path):
    grid = load_grid(path.relative_to(REPO))
    rows = plan(grid)
    t = totals(rows)
    assert t["runs"] == len(grid.placements) * len(grid.seeds) * len(grid.lrs) >= 9
    assert all(0 < r.memory_gib < 79.6 and r.gpu_hours > 0 for r in rows)
    assert len(grid.seeds) == 3 and len(grid.lrs) >= 3
    # docs/ladder.md and the README record these totals
    doc = (REPO / "docs/ladder.md").read_text()
    assert f"| `{path.relative_to(REPO)}` | {t['runs']} | {t['gpu_hours']:,.0f} |" in doc


def test_plan_refuses_a_layout_that_does_not_fit(tmp_path):
    path = write_grid(tmp_path / "grid.yaml", recipes=["recipes/peri_ln/400m.yaml"], placements=["peri"],
                      seeds=[1], lrs=[1e-3], set=["train.micro_batch_size=128", "train.global_batch_size=1024"],
                      gpus_per_node=8)
    with pytest.raises(PlanError, match=r"needs an estimated [0-9.]+ GiB per GPU, over 79.6 GiB"):
        plan(load_grid(path))


def test_plan_cli_prints_rows_and_totals():
    code, out, _ = cli("plan", "recipes/ladders/paper-400m.yaml", "--mfu", "0.5")
    assert code == 0
    assert "400m-peri-lr0.002-s1234  recipes/peri_ln/400m.yaml" in out and "tp1 pp1 cp1 dp8" in out
    assert "total (paper-400m): 24 runs" in out and "50% MFU" in out


# ----------------------------------------------------------------------------- a miniature, --local

def _direct(run_dir: Path) -> dict[int, dict]:
    """The run's metrics.jsonl read line by line (no resume in these runs)."""
    out: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.setdefault(rec["step"], {}).update(rec)
    return out


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """The tiny recipe x {peri, pre} x 2 seeds x 2 LRs, and a one-run grid at lr 1e30 without clipping
    (non-finite grad norm at step 3: exit 3); submitted with --local, then reported."""
    root = tmp_path_factory.mktemp("ladder")
    (root / "mini").mkdir()
    (root / "div").mkdir()
    grid = write_grid(root / "mini" / "grid.yaml")
    div = root / "div"
    diverging = write_grid(div / "grid.yaml", name="div", placements=["pre"], seeds=[1], lrs=[1e30],
                           set=[*MINI_SET, "optim.clip_grad=0"])
    ladder = [sys.executable, "tools/ladder.py"]
    first = run([*ladder, "submit", str(grid), "--local", "--jobs", "2"], timeout=400)
    second = run([*ladder, "submit", str(grid), "--local", "--jobs", "2"], timeout=60)
    diverged = run([*ladder, "submit", str(diverging), "--local"], timeout=200, check=False)
    status = run([*ladder, "status", str(grid)], timeout=60)
    for g in (grid, diverging):
        run([*ladder, "report", str(g)], timeout=120)
    return {"grid": load_grid(grid), "div": load_grid(diverging), "first": first.stdout, "second": second.stdout,
            "diverged": diverged, "status": status.stdout}


def test_local_grid_runs_every_run_once(mini):
    assert "submitting 8" in mini["first"] and mini["first"].count(": exit 0") == 8, mini["first"]
    assert "8 runs (8 finished); submitting 0" in mini["second"], mini["second"]
    rows = {line.split()[0]: line.split()[1:5] for line in mini["status"].splitlines()[1:-1]}
    assert rows == {r.name: ["finished", "-", "3", rows[r.name][3]] for r in mini["grid"].runs}, mini["status"]


def test_report_means_and_stds_equal_the_runs_metrics(mini):
    grid = mini["grid"]
    rows = list(csv.DictReader((grid.dir / "summary.csv").open()))
    assert list(rows[0])[:7] == ["recipe", "placement", "lr", "n_seeds", "val_loss_mean", "val_loss_std", "n_diverged"]
    assert len(rows) == 4
    for row in rows:
        runs = [r for r in grid.runs if r.placement == row["placement"] and f"{r.lr:g}" == row["lr"]]
        records = [_direct(r.dir) for r in runs]
        losses = [rec[3]["final_valid_loss"] for rec in records]
        assert row["recipe"] == TINY and int(row["n_seeds"]) == 2 and int(row["n_diverged"]) == 0
        assert float(row["val_loss_mean"]) == pytest.approx(statistics.fmean(losses), rel=1e-12)
        assert float(row["val_loss_std"]) == pytest.approx(statistics.stdev(losses), rel=1e-12)
        last_var = statistics.fmean(rec[3]["layer_variance"][-1] for rec in records)
        assert float(row["last_layer_variance"]) == pytest.approx(last_var, rel=1e-12)
        assert int(row["tokens"]) == 2 * 3 * 8 * 64  # seeds x steps x batch x sequence
        assert (row["rollbacks"], row["skipped_batches"]) == ("0", "0")  # counted by rollback_counts (test_stability)
    from periln_megatron.ladder.report import collect, losses_by_lr, summarize

    by_lr = losses_by_lr(summarize(collect(grid)), TINY, "pre")
    assert by_lr == {r.lr: [_direct(x.dir)[3]["final_valid_loss"] for x in grid.runs
                            if x.placement == "pre" and x.lr == r.lr] for r in grid.runs}
    report = (grid.dir / "report.md").read_text()
    assert "| lr | Peri-LN | Pre-LN |" in report and "best LR for Peri-LN:" in report
    assert (grid.dir / "lr_sensitivity.png").stat().st_size > 0 and (grid.dir / "variance_by_depth.png").is_file()


def test_diverged_run_counted_as_diverged(mini):
    result, grid = mini["diverged"], mini["div"]
    assert result.returncode == 1 and "exit 3" in result.stdout, result.stdout
    (row,) = list(csv.DictReader((grid.dir / "summary.csv").open()))
    assert (row["n_seeds"], row["n_diverged"], row["val_loss_mean"]) == ("0", "1", "")
    assert "1 diverged" in (grid.dir / "report.md").read_text()
    code, out, _ = cli("status", str(grid.path))
    assert code == 0 and "diverged" in out and "1 diverged" in out
    code, out, _ = cli("submit", str(grid.path), "--local")  # a diverged run is done, not resubmitted
    assert code == 0 and "submitting 0" in out
    assert not math.isnan(float(row["tokens"]))


# ----------------------------------------------------------------------------- states

def _run_dir(root: Path, name: str, losses: list[float], code: int | None) -> Path:
    d = root / name
    d.mkdir()
    if losses:
        (d / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": x}) + "\n"
                                                 for i, x in enumerate(losses, 1)))
    if code is not None:
        (d / "ladder-exit").write_text(f"{code}\n")
    return d


def test_run_states_from_exit_status_metrics_and_queue(tmp_path):
    from periln_megatron.ladder.state import run_state

    def state(name, losses, code, job="-", queued=None):
        return run_state(_run_dir(tmp_path, name, losses, code), 3, job, queued)

    assert state("new", [], None).state == "unsubmitted"
    done = state("done", [3.0, 2.5, 2.0], 0, "7_0")
    assert (done.state, done.job, done.step, done.loss) == ("finished", "7_0", 3, 2.0)
    assert state("nan", [3.0], 3).state == "diverged"
    assert state("inf-logged", [3.0, float("inf")], None, "7_1").state == "diverged"
    crashed = state("crashed", [3.0], 1, "7_2")
    assert (crashed.state, crashed.note) == ("failed", "exit 1")
    assert state("stopped", [3.0, 2.5], 0, "7_3").state == "failed"  # exit 0 before train.steps, no job left
    requeued = state("requeued", [3.0, 2.5], 0, "7_4", queued="pending")
    assert (requeued.state, requeued.step) == ("pending", 2)
    assert state("lost", [], None, "7_5").state == "failed"  # left the queue without training


# ----------------------------------------------------------------------------- report --eval

def test_report_eval_scores_every_finished_run_and_averages_over_seeds(spm1k, tmp_path):
    """report --eval: each finished run exported to <ladder dir>/hf/<run> and scored by tools/evaluate.py. Offline the
    paper's task group cannot load its datasets, so every run is scored on --eval-text's documents; the
    report's mean and seed spread are those of the runs' own scores, and a run's score is what
    tools/evaluate.py prints for its export."""
    import corpus

    grid = write_grid(tmp_path / "grid.yaml", name="evalmini", lrs=[1e-2],
                      set=["train.steps=3", "train.eval_interval=3", "train.eval_iters=1", "diagnostics.interval=0",
                           "checkpoint.interval=0",
                           "tokenizer.type=SentencePieceTokenizer", f"tokenizer.model={spm1k}", "model.vocab_size=null"])
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus.wikitext_paragraphs("test")[:12]))
    ladder = [sys.executable, "tools/ladder.py"]
    offline = {"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run([*ladder, "submit", str(grid), "--local", "--jobs", "2"], timeout=300)
    out = run([*ladder, "report", str(grid), "--eval", "--eval-text", str(docs)], env=offline, timeout=600).stdout
    assert "--eval-tasks periln_paper cannot be evaluated here" in out and f"scored on {docs} instead" in out, out

    runs = load_grid(grid).runs
    scores = {r.name: json.loads((r.dir / "eval.json").read_text())["score"] for r in runs}
    assert all(s["metric"] == "docs.jsonl token NLL" and not s["higher_is_better"] for s in scores.values()), scores
    for row in csv.DictReader((load_grid(grid).dir / "summary.csv").open()):
        mine = [scores[r.name]["value"] for r in runs if r.placement == row["placement"]]
        assert row["eval_metric"] == "docs.jsonl token NLL" and row["eval_n"] == "2"
        assert float(row["eval_mean"]) == pytest.approx(statistics.fmean(mine), rel=1e-12)
        assert float(row["eval_std"]) == pytest.approx(statistics.stdev(mine), rel=1e-12)
    report = (load_grid(grid).dir / "report.md").read_text()
    assert "## Downstream evaluation" in report and "docs.jsonl token NLL" in report

    first = runs[0]
    assert (first.dir.parent / "hf" / first.name / "config.json").is_file()  # beside the runs, never inside one
    direct = run([sys.executable, "tools/evaluate.py", str(first.dir.parent / "hf" / first.name), "--text-file", str(docs)],
                 env=offline, timeout=300).stdout
    nll = float(re.search(r"token-level NLL (\S+) nats/token", direct).group(1))
    assert nll == pytest.approx(scores[first.name]["value"], abs=1e-6)
    again = run([*ladder, "report", str(grid), "--eval", "--eval-text", str(docs)], env=offline, timeout=120).stdout
    assert "scoring" not in again and "exporting" not in again  # kept from eval.json


def test_report_eval_one_line_errors(tmp_path):
    grid = write_grid(tmp_path / "grid.yaml")
    code, _, err = cli("report", str(grid), "--eval", "--eval-text", str(tmp_path / "none.jsonl"))
    assert code == 2 and err.strip().splitlines() == [f"periln-ladder: error: --eval-text {tmp_path / 'none.jsonl'}: "
                                                      "no such file"], err
