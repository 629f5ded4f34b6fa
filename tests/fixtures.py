"""Session-wide artefacts that many test modules need, built once per `pytest` process (conftest.py
imports these fixtures). A test that changes one works on a copy (`copy_run`).

    spm1k         a SentencePiece BPE model (1000 pieces, byte fallback) trained on tinyshakespeare
    tiny_run      recipes/tiny/peri_ln.yaml, 2 ranks (TP=1, DP=2), 4 steps, diagnostics every step,
                  checkpoints at 2 and 4; the run dir is the checkpoint dir (metrics.jsonl, recipe.yaml)
    spm_run       40 steps of the tiny Peri-LN recipe with spm1k on real text (WikiText-2 valid and
                  Shakespeare, never wikitext2-test), exported to Hugging Face: a dict of tmp (a
                  directory the module's tests may write into), spm, ckpt (the checkpoint root),
                  iteration (its iter_0000040) and hf (the export)
    stock_llama   a random stock transformers Llama (vocab 256): <dir>/single (one safetensors file)
                  and <dir>/sharded (an index and several shards)
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

import corpus
from launch import REPO, load_tool, run, run_torchrun

TINY_RUN_STEPS = 4


@pytest.fixture(scope="session")
def spm1k(tmp_path_factory) -> Path:
    import sentencepiece

    prefix = tmp_path_factory.mktemp("spm1k") / "spm1k"
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus.data_file(corpus.TINYSHAKESPEARE)), model_prefix=str(prefix), vocab_size=1000,
        model_type="bpe", byte_fallback=True, input_sentence_size=20000, shuffle_input_sentence=True,
        minloglevel=2, num_threads=2)
    return prefix.with_suffix(".model")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    ckpt = tmp_path_factory.mktemp("tiny_run") / "ckpt"
    run_torchrun(2, ["-m", "periln_megatron.train", "--recipe", str(REPO / "recipes/tiny/peri_ln.yaml"), "--set",
                     f"train.steps={TINY_RUN_STEPS}", "diagnostics.interval=1", "checkpoint.interval=2",
                     f"checkpoint.dir={ckpt}"], timeout=300)
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(TINY_RUN_STEPS)
    assert (ckpt / "iter_0000002").is_dir()
    return ckpt


@pytest.fixture(scope="session")
def spm_run(spm1k, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("spm_run")
    docs = corpus.wikitext_paragraphs("valid") + corpus.shakespeare_speeches()
    (tmp / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    assert load_tool("preprocess_data").main([
        "--input", str(tmp / "train.jsonl"), "--output-prefix", str(tmp / "corpus"), "--tokenizer-type",
        "SentencePieceTokenizer", "--tokenizer-model", str(spm1k), "--append-eod", "--workers", "1",
        "--quiet"]) == 0
    ckpt = tmp / "ckpt"
    run([sys.executable, "-m", "periln_megatron.train", "--recipe", "recipes/tiny/peri_ln.yaml", "--set",
         f"checkpoint.dir={ckpt}", "data.synthetic=false", f"data.prefixes=[{tmp / 'corpus_text_document'}]",
         "data.split=98,2,0", "tokenizer.type=SentencePieceTokenizer", f"tokenizer.model={spm1k}",
         "model.vocab_size=null", "train.steps=40", "optim.lr=0.01", "checkpoint.interval=0"], timeout=300)
    hf = tmp / "hf"
    assert load_tool("convert_to_hf").main([str(ckpt), str(hf), "--quiet"]) == 0
    return {"tmp": tmp, "spm": spm1k, "ckpt": ckpt, "iteration": ckpt / "iter_0000040", "hf": hf}


@pytest.fixture(scope="session")
def stock_llama(tmp_path_factory) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama", vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = tmp_path_factory.mktemp("stock_llama")
    model.save_pretrained(str(out / "single"))
    model.save_pretrained(str(out / "sharded"), max_shard_size="40KB")
    assert (out / "sharded" / "model.safetensors.index.json").is_file()
    return out


def copy_run(run_dir: Path, dst: Path) -> Path:
    """A copy of a shared run that a test may damage, resume or export into."""
    shutil.copytree(run_dir, dst)
    return dst
