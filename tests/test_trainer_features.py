"""Trainer options on CPU: interleaved pipeline, activation recompute, mixed precision, NaN stop."""

import json
import math

import pytest

from launch import run_torchrun
from periln_megatron.training.metrics import read_metrics, series

TRAIN = ["-m", "periln_megatron.train", "--recipe", "recipes/tiny/peri_ln.yaml", "--set"]


def records(run_dir):
    return list(read_metrics(run_dir).values())


def train(tmp_path, nproc, *overrides, check=True):
    from periln_megatron.config import combine_overrides

    sets = combine_overrides([f"checkpoint.dir={tmp_path}", "train.steps=4"], overrides)  # a case's train.steps wins
    return run_torchrun(nproc, [*TRAIN, *sets], timeout=240, check=check)


def losses(tmp_path):
    return list(series(read_metrics(tmp_path), "loss").values())


def test_interleaved_pipeline(tmp_path):
    out = train(tmp_path, 2, "parallel.pp=2", "parallel.vpp=2").stdout
    assert "vpp=2" in out
    assert len(losses(tmp_path)) == 4 and all(math.isfinite(l) for l in losses(tmp_path))


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_recompute_gives_the_same_losses(tmp_path, mode):
    train(tmp_path / "plain", 1)
    train(tmp_path / mode, 1, f"model.recompute={mode}")
    assert losses(tmp_path / mode) == pytest.approx(losses(tmp_path / "plain"), abs=1e-6)


@pytest.mark.parametrize("preset", ["bf16", "fp16"])
def test_mixed_precision_presets(tmp_path, preset):
    train(tmp_path, 2, "parallel.tp=2", f"precision.preset={preset}")
    got = losses(tmp_path)
    assert len(got) == 4 and all(math.isfinite(l) for l in got)
    assert (tmp_path / "iter_0000004").is_dir()


def test_validation_loss_is_logged(tmp_path):
    train(tmp_path, 1, "train.eval_interval=2", "train.eval_iters=1")
    recs = records(tmp_path)
    assert [r["step"] for r in recs if "valid_loss" in r] == [2, 4]
    assert "final_valid_loss" in recs[-1]


def test_nonfinite_loss_stops_without_checkpoint(tmp_path):
    result = train(tmp_path, 1, "optim.lr=1.0e+30", "optim.min_lr=0", "optim.warmup_steps=0",
                   "optim.clip_grad=0.0", "train.steps=50", "checkpoint.interval=1", check=False)
    assert result.returncode != 0
    assert "loss=nan" in result.stdout or "loss=inf" in result.stdout or "grad_norm=nan" in result.stdout, \
        result.stdout[-3000:]
    bad_step = int(result.stdout.split("error: step ")[1].split(":")[0])
    saved = sorted(int(p.name[5:]) for p in tmp_path.glob("iter_*"))
    assert all(s < bad_step for s in saved)


@pytest.fixture(scope="module")
def indexed_data(spm1k, tmp_path_factory):
    """Real prefixes made with tools/preprocess_data.py (in this process) and the session's
    SentencePiece model from tests/data: Shakespeare, WikiText, and a one-document prefix."""
    import corpus
    from launch import load_tool

    work = tmp_path_factory.mktemp("data")
    speeches = corpus.shakespeare_speeches()
    docs = {"tinyshakespeare": speeches, "wikitext2-valid": corpus.wikitext_paragraphs("valid"),
            "one_document": speeches[:1]}
    preprocess = load_tool("preprocess_data")
    prefixes = []
    for name, texts in docs.items():
        (work / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:400]))
        assert preprocess.main(["--input", str(work / f"{name}.jsonl"), "--output-prefix", str(work / name),
                                "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(spm1k),
                                "--append-eod", "--workers", "1", "--quiet"]) == 0
        prefixes.append(str(work / f"{name}_text_document"))
    return spm1k, prefixes


def test_trains_on_weighted_blend_of_indexed_prefixes(tmp_path, indexed_data):
    spm, (a, b, _) = indexed_data
    train(tmp_path, 1, "data.synthetic=false", f"data.prefixes=[0.3, {a}, 0.7, {b}]", "model.vocab_size=null",
          "tokenizer.type=SentencePieceTokenizer", f"tokenizer.model={spm}",
          "train.eval_interval=2", "train.eval_iters=1", "data.split=90,10,0")
    recs = records(tmp_path)
    assert [r["step"] for r in recs if "valid_loss" in r] == [2, 4]
    assert recs[0]["loss"] > 5.0  # ln(1024) ~ 6.9 at the start: real tokens over the padded vocab


def test_truncated_bin_fails_before_training(tmp_path, indexed_data):
    import shutil

    spm, (a, _, _) = indexed_data
    broken = tmp_path / "broken_text_document"
    shutil.copy(a + ".idx", str(broken) + ".idx")
    data = open(a + ".bin", "rb").read()
    (tmp_path / "broken_text_document.bin").write_bytes(data[: len(data) // 2])
    result = train(tmp_path / "run", 1, "data.synthetic=false", f"data.prefixes=[{broken}]",
                   "model.vocab_size=null", "tokenizer.type=SentencePieceTokenizer",
                   f"tokenizer.model={spm}", check=False)
    assert result.returncode != 0
    assert f"{broken}.bin" in result.stdout and "periln-train: error:" in result.stdout
    assert "step 1/" not in result.stdout


def test_overlapped_grad_reduce_and_param_gather_match_plain_dp(tmp_path):
    """The paper recipes overlap DP communication with compute; the result must not change."""
    common = ["parallel.distributed_optimizer=true", "train.steps=3"]
    train(tmp_path / "plain", 2, *common)
    train(tmp_path / "overlap", 2, *common, "parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true")
    assert losses(tmp_path / "overlap") == pytest.approx(losses(tmp_path / "plain"), abs=1e-5)


@pytest.mark.parametrize("evaluation", [["train.eval_interval=2", "train.eval_iters=1"], []], ids=["eval", "no-eval"])
def test_split_without_documents_fails_naming_the_prefix(tmp_path, indexed_data, evaluation):
    """megatron-core would count epochs forever over an empty validation split, built even when unused."""
    spm, (_, _, single) = indexed_data
    result = train(tmp_path, 1, "data.synthetic=false", f"data.prefixes=[{single}]", "model.vocab_size=null",
                   "tokenizer.type=SentencePieceTokenizer", f"tokenizer.model={spm}",
                   *evaluation, "data.split=90,10,0", check=False)
    assert result.returncode != 0 and "step 1/" not in result.stdout
    assert f"{single}: data.split '90,10,0' leaves the valid split 0 of its 1 documents" in result.stdout
