"""tools/evaluate.py on a real export of a tiny model trained here on real text, offline. Its
--text-file path (periln_megatron.hf.evaluation, batched windows) gives each held-out document the
log-likelihood megatron-core's trainer computes on the same token windows, and the same as real
lm-evaluation-harness (HFLM on CPU, --text-engine lm-eval) does; a benchmark whose dataset is not
cached fails in one line; argument errors and bad input are one line.

What is compared (docs/evaluation.md): lm-eval's loglikelihood_rolling windows, which the batched
path builds itself, score each document's
SentencePiece ids (the exported tokenizer adds no BOS) in windows of the context (64): the first
window is [prefix] + ids[:63] predicting ids[:64], each following full window predicts the next 64
ids from the previous id and the first 63 of them (one token of context), and a last partial window
predicts the remaining r ids from the 64 tokens ending before the document's end (scoring only its
last r positions). The megatron side builds those windows itself and runs the trainer's own forward
step and loss (periln_megatron.train._forward_step: masked mean of megatron's per-token cross
entropy) on the checkpoint the export came from. Both count every id of the document once.

The trainer's softmax runs over the padded vocabulary (1024 rows for the 1000-id tokenizer); the
export keeps the tokenizer's 1000 rows, so the evaluation's NLL is the trainer's minus log(1 + p_pad)
per token, p_pad the probability the trainer's model gives the 24 padding ids. The test checks the
harness against megatron's logits normalised over the 1000 ids (relative 1e-6 per document) and
that the trainer's loss exceeds it by a small positive amount, itself recomputed from the logits.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import corpus  # noqa: E402
from launch import load_tool, run  # noqa: E402

PY = sys.executable
SEQ = 64  # recipes/tiny


def _offline(tmp: Path) -> dict:
    """No network at test time: an empty Hugging Face cache of our own, and offline mode."""
    return {"HF_HOME": str(tmp / "hf_home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def trained(spm_run):
    """The session's spm_run (tests/fixtures.py): a SentencePiece tokenizer and 40 steps of the tiny
    Peri-LN recipe on the training text (never on wikitext2-test), exported to Hugging Face."""
    return spm_run


def held_out_documents() -> list[str]:
    """Held-out WikiText-2 test paragraphs: the first 16 (long: several 64-token windows each) and
    the 4 shortest (one partial window)."""
    paragraphs = corpus.wikitext_paragraphs("test")
    return paragraphs[:16] + sorted(paragraphs[16:], key=len)[:4]


def _evaluate(trained, *args, check=True):
    return run([PY, "tools/evaluate.py", str(trained["hf"]), "--device", "cpu", *args],
               env=_offline(trained["tmp"]), timeout=420, check=check)


def _megatron(trained, docs_file: Path) -> dict:
    out = trained["tmp"] / f"megatron-{docs_file.stem}.json"
    run([PY, __file__, "megatron-nll", str(trained["iteration"]), str(docs_file), str(trained["spm"]), str(out)],
        timeout=300)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def reference(trained):
    docs = held_out_documents()
    path = trained["tmp"] / "heldout.json"
    path.write_text(json.dumps(docs))
    return docs, _megatron(trained, path)


def _compare(harness: dict, megatron: list[dict], prefix: str) -> None:
    """Per document: the harness's -loglikelihood == megatron's NLL over the tokenizer's ids (1e-6),
    and the trainer's loss (softmax over the 1024 padded rows) exceeds it by the padded rows'
    probability mass, log(1 + p_pad) per token: positive and small."""
    assert [d["tokens"] for d in harness["per_document"]] == [d["tokens"] for d in megatron]
    for h, m in zip(harness["per_document"], megatron):
        assert -h["loglikelihood"] == pytest.approx(m[f"nll_{prefix}"], rel=1e-6), (h["doc_id"], prefix)
        assert 0 < m[f"trainer_{prefix}"] - m[f"nll_{prefix}"] < 0.01 * m["tokens"], (h["doc_id"], prefix)
    tokens = sum(d["tokens"] for d in megatron)
    assert harness["tokens"] == tokens
    assert harness["token_nll"] == pytest.approx(sum(d[f"nll_{prefix}"] for d in megatron) / tokens, rel=1e-7)
    trainer_loss = sum(d[f"trainer_{prefix}"] for d in megatron) / tokens
    assert 0 < trainer_loss - harness["token_nll"] < 0.01


def test_harness_loglikelihood_equals_trainer_loss_on_held_out_documents(trained, reference):
    docs, megatron = reference
    jsonl = trained["tmp"] / "heldout.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = trained["tmp"] / "eval-jsonl.json"
    log = _evaluate(trained, "--text-file", str(jsonl), "--output", str(out)).stdout
    result = json.loads(out.read_text())
    harness = result["token_level"]["periln_local_ppl"]
    assert result["max_length"] == SEQ and result["prefix_token_id"] == 2  # </s>: the end-of-document id
    assert harness["documents"] == len(docs) == 20
    assert sum(d["tokens"] > 3 * SEQ for d in megatron) >= 8 and sum(d["tokens"] < SEQ for d in megatron) >= 4
    _compare(harness, megatron, "eos")
    # a trained model: well below a uniform guess over the 1000 ids, and lm-eval's own metrics agree
    assert harness["token_nll"] < math.log(1000) - 0.5
    metrics = result["results"]["periln_local_ppl"]
    nbytes = sum(len(d.encode()) for d in docs)
    assert metrics["bits_per_byte,none"] == pytest.approx(harness["nll_sum"] / nbytes / math.log(2), rel=1e-9)
    assert f"token-level NLL {harness['token_nll']:.6f}" in log


def test_batched_path_equals_lm_eval_and_prints_one_progress_bar(trained, reference):
    """The default engine against lm-eval's own loglikelihood_rolling task on a few documents (long
    and short): the same tokens, per-document log-likelihoods (relative 1e-6) and lm-eval metrics.
    Its output has one progress bar, and neither lm-eval's per-batch bars, transformers' weight
    loading bar nor warnings about the task or long sequences."""
    docs, _ = reference
    jsonl = trained["tmp"] / "few.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:3] + docs[-3:]))
    results = {}
    for engine in ("batched", "lm-eval"):
        out = trained["tmp"] / f"few-{engine}.json"
        log = _evaluate(trained, "--text-file", str(jsonl), "--text-engine", engine, "--output", str(out)).stdout
        results[engine] = json.loads(out.read_text())
        if engine == "batched":
            assert log.count("scoring documents:") >= 1 and "Running loglikelihood requests" not in log, log[-3000:]
            assert "Loading weights" not in log and "Token indices sequence length" not in log, log[-3000:]
        else:
            assert "Running loglikelihood requests" in log, log[-3000:]  # it is the harness that ran
        assert "[Task: periln_local_ppl]" not in log, log[-3000:]  # the task's metrics are fully specified
    fast, harness = (results[e]["token_level"]["periln_local_ppl"] for e in ("batched", "lm-eval"))
    assert results["batched"]["text_engine"] == "batched" and results["lm-eval"]["text_engine"] == "lm-eval"
    assert fast["documents"] == harness["documents"] == 6
    assert [d["tokens"] for d in fast["per_document"]] == [d["tokens"] for d in harness["per_document"]]
    assert max(d["tokens"] for d in fast["per_document"]) > 3 * SEQ and min(d["tokens"] for d in fast["per_document"]) < SEQ
    for f, h in zip(fast["per_document"], harness["per_document"]):
        assert f["loglikelihood"] == pytest.approx(h["loglikelihood"], rel=1e-6), f["doc_id"]
    for metric in ("bits_per_byte,none", "byte_perplexity,none", "word_perplexity,none"):
        assert results["batched"]["results"]["periln_local_ppl"][metric] == pytest.approx(
            results["lm-eval"]["results"]["periln_local_ppl"][metric], rel=1e-6), metric
    assert results["batched"]["max_length"] == results["lm-eval"]["max_length"] == SEQ


def test_text_file_and_bos_prefix(trained, reference):
    """Plain text (documents between blank lines) with --prefix-token bos: the same tokens, only the
    first token of each document conditioned differently, and again equal to the trainer's loss."""
    docs, megatron = reference
    txt = trained["tmp"] / "heldout.txt"
    txt.write_text("\n\n".join(docs) + "\n")
    out = trained["tmp"] / "eval-txt.json"
    # small batches over 3 forked scorers: each document's windows are spread over the processes
    log = _evaluate(trained, "--text-file", str(txt), "--prefix-token", "bos", "--output", str(out),
                    "--workers", "3", "--batch-size", "2").stdout
    assert "3 process(es)" in log, log[-2000:]
    result = json.loads(out.read_text())
    assert result["prefix_token_id"] == 1  # <s>, which never occurs in the training data
    harness = result["token_level"]["periln_local_ppl"]
    assert harness["workers"] == 3
    _compare(harness, megatron, "bos")
    assert all(m["nll_bos"] != m["nll_eos"] for m in megatron)


def test_benchmark_dataset_offline_is_one_line(trained):
    r = _evaluate(trained, "--tasks", "periln_paper", "--limit", "2", check=False)
    assert r.returncode == 2, r.stdout[-3000:]
    errors = [line for line in r.stdout.splitlines() if line.startswith("evaluate: error:")]
    assert len(errors) == 1, r.stdout[-3000:]
    assert "allenai/ai2_arc" in errors[0] and "HF_DATASETS_OFFLINE=1" in errors[0] and "network" in errors[0]
    assert "Traceback" not in r.stdout


@pytest.mark.parametrize("args,message", [
    ([], "nothing to evaluate"),
    (["--text-file", "/nonexistent/docs.jsonl"], "--text-file /nonexistent/docs.jsonl: not found"),
    (["--tasks", "periln_local_ppl"], "give its file with --text-file"),
    (["--text-file", "{bad}", "--text-key", "body"], "line 1 has no string 'body'"),
    (["--text-file", "{bad}", "--prefix-token", "sep"], "--prefix-token: eos, bos or a token id"),
])
def test_argument_errors_are_one_line(trained, tool, tmp_path, capsys, args, message):
    bad = tmp_path / "docs.jsonl"
    bad.write_text(json.dumps({"text": "a document"}) + "\n")
    args = [str(bad) if a == "{bad}" else a for a in args]
    rc = tool.main([str(trained["hf"]), "--device", "cpu", *args])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and not captured.out and lines[0].startswith("evaluate: error: "), captured
    assert message in lines[0]


@pytest.fixture(scope="module")
def tool():
    return load_tool("evaluate")


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_text_file_not_utf8_is_one_line_naming_file_and_byte(trained, tool, tmp_path, capsys, suffix):
    good = (json.dumps({"text": "a document"}) + "\n").encode() if suffix == ".jsonl" else b"a document\n\n"
    bad = b'{"text": "caf\xe9"}\n' if suffix == ".jsonl" else b"caf\xe9 latin-1\n"
    path = tmp_path / f"docs{suffix}"
    path.write_bytes(good * 2 + bad + good)
    offset, line = len(good) * 2 + bad.index(b"\xe9"), good.count(b"\n") * 2 + 1
    out = tmp_path / "result.json"
    rc = tool.main([str(trained["hf"]), "--text-file", str(path), "--device", "cpu", "--output", str(out)])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and not captured.out, captured
    assert lines[0] == (f"evaluate: error: --text-file {path}: not UTF-8: byte {offset} (line {line}) "
                        "is b'\\xe9'; save the file as UTF-8"), lines[0]
    assert not out.exists()


def test_prefix_token_beyond_the_vocabulary_is_one_line(trained, tool, tmp_path, capsys, monkeypatch):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": "a document"}) + "\n")
    out = tmp_path / "result.json"
    for value in ("5000", "1000", "-1"):
        rc = tool.main([str(trained["hf"]), "--text-file", str(docs), "--prefix-token", value, "--device", "cpu",
                        "--output", str(out)])
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and not captured.out, captured
        assert lines[0] == (f"evaluate: error: --prefix-token {value}: id {value} is outside the model's "
                            "vocabulary (vocab_size 1000: ids 0..999)"), lines[0]
        assert not out.exists()
    for name, value in {**_offline(trained["tmp"]), "OMP_WAIT_POLICY": "PASSIVE"}.items():
        monkeypatch.setenv(name, value)  # what the tool would set in this process, undone after the test
    assert tool.main([str(trained["hf"]), "--text-file", str(docs), "--prefix-token", "999", "--device", "cpu",
                      "--output", str(out)]) == 0  # the last id is fine
    assert json.loads(out.read_text())["prefix_token_id"] == 999


def test_missing_model_dir(tool, tmp_path, capsys):
    assert tool.main([str(tmp_path / "nope"), "--text-file", str(tmp_path)]) == 2
    assert "nope: does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------- megatron side (subprocess)

def rolling_windows(ids: list[int], prefix: int, seq: int):
    """(input ids, target ids, number of scored positions at the end) covering every id once, as
    lm-eval's loglikelihood_rolling with context_len=1 scores them (written out independently)."""
    first = min(seq, len(ids))
    yield [prefix] + ids[:first - 1], ids[:first], first
    done = first
    while done < len(ids):
        scored = min(seq, len(ids) - done)
        end = done + scored
        yield ids[end - seq - 1:end - 1], ids[end - seq:end], scored
        done = end


def megatron_nll(iter_dir: str, docs_file: str, spm_model: str, out: str) -> None:
    import sentencepiece
    import torch

    sys.path.insert(0, str(REPO))
    from periln_megatron import checkpoint
    from periln_megatron.hf import megatron_side
    from periln_megatron.hf.export import load_checkpoint_recipe
    from periln_megatron.training.loop import _forward_step

    recipe = load_checkpoint_recipe(Path(iter_dir))
    recipe.model.backend = "local"
    megatron_side.init_single_process()
    model = megatron_side.build_model(recipe, megatron_side.single_process_recipe(recipe).padded_vocab_size(),
                                      torch.float32)
    checkpoint.load(Path(iter_dir), [model], None, None)
    model.eval()
    sp = sentencepiece.SentencePieceProcessor(model_file=spm_model)
    seq, vocab = recipe.model.seq_length, sp.get_piece_size()
    results = []
    for doc in json.loads(Path(docs_file).read_text()):
        ids = sp.encode(doc)
        row = {"tokens": len(ids)}
        for name, prefix in (("eos", sp.eos_id()), ("bos", sp.bos_id())):
            trainer = real = 0.0
            for inputs, targets, scored in rolling_windows(ids, prefix, seq):
                n = len(inputs)
                mask = torch.zeros(1, n)
                mask[0, n - scored:] = 1
                batch = {"tokens": torch.tensor([inputs]), "labels": torch.tensor([targets]), "loss_mask": mask,
                         "position_ids": torch.arange(n).unsqueeze(0)}
                with torch.no_grad():  # the trainer's validation step: forward with labels, masked mean loss
                    output, loss_func = _forward_step(iter([batch]), model)
                    loss, _ = loss_func(output)
                    logits = megatron_side.logits(model, batch["tokens"])[0, n - scored:].double()
                trainer += loss.double().item() * scored
                # the same positions normalised over the tokenizer's ids only (the export's 1000 rows,
                # not the 1024 padded rows the trainer's softmax runs over)
                picked = logits[torch.arange(scored), torch.tensor(targets[n - scored:])]
                real += (torch.logsumexp(logits[:, :vocab], -1) - picked).sum().item()
                full = (torch.logsumexp(logits, -1) - picked).sum().item()
                assert abs(full - loss.double().item() * scored) <= 1e-4 * scored, (full, loss.item() * scored)
            row[f"trainer_{name}"], row[f"nll_{name}"] = trainer, real
        results.append(row)
    Path(out).write_text(json.dumps(results))


if __name__ == "__main__" and sys.argv[1:2] == ["megatron-nll"]:
    megatron_nll(*sys.argv[2:6])
