"""Hugging Face export/import: logits + greedy parity against megatron-core, bitwise round trips,
refusals, and the SentencePiece -> fast tokenizer conversion. Real transformers, real megatron."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import corpus
from launch import REPO, run, run_torchrun

PY = sys.executable


@pytest.fixture(scope="module")
def spm_model(spm1k) -> Path:
    """The session's SentencePiece BPE model (tests/fixtures.py)."""
    return spm1k


def _train(tmp: Path, recipe: str, nproc: int, sets: list[str]) -> Path:
    ckpt = tmp / "ckpt"
    run_torchrun(nproc, ["-m", "periln_megatron.train", "--recipe", str(REPO / "recipes/tiny" / recipe), "--set",
                         f"checkpoint.dir={ckpt}", "train.steps=4", "checkpoint.interval=0", *sets], timeout=240)
    return ckpt


def _export(ckpt: Path, out: Path, *extra) -> str:
    return run([PY, "tools/convert_to_hf.py", str(ckpt), str(out), *extra], timeout=120).stdout


def _parity(iter_dir: Path, hf_dir: Path, tmp: Path) -> dict:
    out = tmp / f"parity-{hf_dir.name}.json"
    run([PY, "tests/workers/hf_parity.py", str(iter_dir), str(hf_dir), str(out)], timeout=120)
    return json.loads(out.read_text())


def _latest(ckpt: Path) -> Path:
    return ckpt / f"iter_{int((ckpt / 'latest_checkpointed_iteration.txt').read_text()):07d}"


CASES = {  # name: recipe, processes, overrides, HF class
    "peri-tp2pp2-gqa": ("peri_ln.yaml", 4, ["parallel.tp=2", "parallel.pp=2"], "HyperCLOVAXForCausalLM"),
    "pre-pp2-tied": ("pre_ln.yaml", 2, ["parallel.pp=2", "model.untie_embeddings=false"], "LlamaForCausalLM"),
}


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, spm_model, tmp_path_factory):
    recipe, nproc, sets, cls = CASES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    ckpt = _train(tmp, recipe, nproc, [*sets, "tokenizer.type=SentencePieceTokenizer", f"tokenizer.model={spm_model}",
                                       "model.vocab_size=null", "optim.lr=0.02", "optim.warmup_steps=0"])
    hf = tmp / "hf"
    log = _export(ckpt, hf, "--max-shard-size", "100KB")
    return ckpt, hf, cls, log, tmp


def test_logits_and_greedy_parity(exported):
    ckpt, hf, cls, log, tmp = exported
    assert "[1/" in log and "wrote" in log  # per-tensor progress
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded, with an index
    config = json.loads((hf / "config.json").read_text())
    assert config["vocab_size"] == 1000  # trimmed from the padded 1024 rows
    assert config["architectures"] == [cls]
    r = _parity(_latest(ckpt), hf, tmp)
    assert r["arch"] == cls
    assert r["shape"][-1] == 1000
    assert r["max_abs_diff"] <= 1e-4, r
    assert r["megatron_greedy"] == r["hf_greedy"], r
    assert len(r["hf_greedy"]) == 8 + 20


def test_exported_tokenizer_matches_sentencepiece(exported, spm_model):
    import sentencepiece
    from transformers import AutoTokenizer

    _, hf, _, _, _ = exported
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    fast = AutoTokenizer.from_pretrained(str(hf))
    for name in (corpus.TINYSHAKESPEARE, corpus.WIKITEXT2_VALID):  # wikitext holds literal "<unk>"
        text = corpus.read_text(name)[:300_000]
        assert fast(text, add_special_tokens=False)["input_ids"] == sp.encode(text), name
    assert fast.decode(sp.encode("To be, or not to be")) == "To be, or not to be"
    config = json.loads((hf / "config.json").read_text())
    assert config["eos_token_id"] == sp.eos_id() and config["bos_token_id"] == sp.bos_id()


@pytest.mark.parametrize("normalization", ["identity", "nfkc", "nmt_nfkc"])
@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_tokenizer_conversion_across_sentencepiece_settings(tmp_path, normalization, model_type):
    """tools/train_tokenizer.py defaults to identity normalisation; every setting it offers must export."""
    import sentencepiece
    from transformers import AutoTokenizer

    from periln_megatron.hf.tokenizer import export_sentencepiece

    prefix = tmp_path / "spm"
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus.data_file(corpus.WIKITEXT2_VALID)), model_prefix=str(prefix), vocab_size=600,
        model_type=model_type, normalization_rule_name=normalization, byte_fallback=True, input_sentence_size=5000, minloglevel=2)
    export_sentencepiece(prefix.with_suffix(".model"), tmp_path / "hf", max_length=64)  # checks edge-case probes
    sp = sentencepiece.SentencePieceProcessor(model_file=str(prefix.with_suffix(".model")))
    fast = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = corpus.tinyshakespeare_text()[:100_000] + " \u2581x \u2581\u2581 ＡＢＣ ﬁ  end  \u2581"
    if model_type == "bpe":
        assert fast(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
    else:  # per line: over 100 kB, SentencePiece's float32 path scores lose the precision to break
        # near-ties the way tokenizers' float64 does (docs/hf.md)
        lines = text.splitlines()
        differ = [l for l in lines if fast(l, add_special_tokens=False)["input_ids"] != sp.encode(l)]
        assert not differ, differ[:3]


# ------------------------------------------------------------------------------- round trip

def _random_hf_model(arch: str, out: Path, tokenizer_dir: Path | None, tied: bool = False) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.for_model(
        arch, vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0}, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # not all ones, so a swapped norm would show
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(out))
    if tokenizer_dir is not None:
        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(out))


@pytest.mark.parametrize("arch,tied", [("hyperclovax", False), ("llama", True)])
def test_round_trip_is_bitwise(arch, tied, tmp_path, spm_model):
    from safetensors import safe_open

    from periln_megatron.hf.mapping import ARCH_KEYS
    from periln_megatron.hf.tokenizer import export_sentencepiece

    tok = tmp_path / "tok"
    tok.mkdir()
    export_sentencepiece(spm_model, tok, 64)
    src, ckpt, back = tmp_path / "src", tmp_path / "ckpt", tmp_path / "back"
    _random_hf_model(arch, src, tok, tied)
    run([PY, "tools/convert_from_hf.py", str(src), str(ckpt), "--recipe-out", str(tmp_path / "r.yaml")], timeout=120)
    recipe = (tmp_path / "r.yaml").read_text()
    assert "HuggingFaceTokenizer" in recipe and "iter_0000000" in recipe
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    _export(ckpt, back)

    def tensors(d):
        with safe_open(str(d / "model.safetensors"), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    a, b = tensors(src), tensors(back)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.bfloat16, k
        assert torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)), k
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (src, back))
    for k in ARCH_KEYS + ("dtype", "bos_token_id", "eos_token_id", "max_position_embeddings"):
        assert ca.get(k) == cb.get(k), (k, ca.get(k), cb.get(k))
    # megatron-core, loading the imported checkpoint, computes what transformers computes
    r = _parity(ckpt / "iter_0000000", src, tmp_path)
    assert r["max_abs_diff"] <= 1e-4 and r["megatron_greedy"] == r["hf_greedy"], r


# ------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("change,message", [
    ({"placement": "post"}, "placement=post (Post-LN"),
    ({"placement": "output"}, "placement=output"),
    ({"normalization": "LayerNorm"}, "normalization=LayerNorm"),
    ({"embedding_norm": True}, "embedding_norm=true"),
])
def test_export_refuses_unfaithful_models(change, message):
    from periln_megatron.config import ModelConfig
    from periln_megatron.hf.mapping import UnsupportedModelError, arch_for

    model = ModelConfig(**change)
    with pytest.raises(UnsupportedModelError, match="cannot export faithfully") as e:
        arch_for(model)
    assert message in str(e.value)


def test_export_cli_refuses_post_ln_checkpoint(tmp_path):
    """The CLI reads the checkpoint's recipe and stops before writing anything."""
    iter_dir = tmp_path / "ckpt" / "iter_0000001"
    iter_dir.mkdir(parents=True)
    (iter_dir / ".metadata").write_bytes(b"")
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("1\n")
    recipe = (REPO / "recipes/tiny/peri_ln.yaml").read_text().replace("placement: peri", "placement: post")
    (iter_dir / "recipe.yaml").write_text(recipe)
    r = run([PY, "tools/convert_to_hf.py", str(tmp_path / "ckpt"), str(tmp_path / "out")], check=False, timeout=60)
    assert r.returncode == 2 and "placement=post" in r.stdout and "custom modeling file" in r.stdout
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == [tmp_path / "ckpt"]


BASE = {"model_type": "hyperclovax", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 1000, "use_post_norm": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}


@pytest.mark.parametrize("change,message", [
    ({"embedding_multiplier": 2.0}, "embedding_multiplier=2.0"),
    ({"residual_multiplier": 0.5}, "residual_multiplier=0.5"),
    ({"logits_scaling": 0.1}, "logits_scaling=0.1"),
    ({"attention_multiplier": 0.0625}, "attention_multiplier=0.0625"),
    ({"attention_bias": True}, "attention_bias=true"),
    ({"mlp_bias": True}, "mlp_bias=true"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope scaling type 'yarn'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}, "model_type": "llama"}, "rope scaling type 'llama3'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"use_post_norm": False}, "use_post_norm=false"),
    ({"model_type": "mistral"}, "only 'hyperclovax'"),
])
def test_import_refusals(change, message):
    from periln_megatron.hf.mapping import UnsupportedModelError, shape_from_hf_config

    with pytest.raises(UnsupportedModelError) as e:
        shape_from_hf_config({**BASE, **change})
    assert message in str(e.value)


def test_import_accepts_neutral_multipliers():
    from periln_megatron.hf.mapping import shape_from_hf_config

    s = shape_from_hf_config({**BASE, "attention_multiplier": 16 ** -0.5, "embedding_multiplier": 1.0})
    assert (s.placement, s.groups, s.head_dim) == ("peri", 2, 16)


def test_import_cli_refusal_names_the_file(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({**BASE, "residual_multiplier": 0.25}))
    r = run([PY, "tools/convert_from_hf.py", str(src), str(tmp_path / "ckpt")], check=False, timeout=60)
    assert r.returncode == 2
    assert f"{src}/config.json" in r.stdout and "residual_multiplier=0.25" in r.stdout
    assert not (tmp_path / "ckpt").exists()


def test_synthetic_tiny_run_exports_its_synthetic_vocabulary(tmp_path):
    """The tiny recipe's model.vocab_size is null: a synthetic run's saved recipe names no tokenizer, and
    the export trims the embedding to data.synthetic_vocab_size (what the run trained on)."""
    from periln_megatron.config import load_recipe
    from periln_megatron.hf.export import true_vocab_size

    saved = tmp_path / "recipe.yaml"
    saved.write_text(load_recipe(REPO / "recipes/tiny/peri_ln.yaml", check_environment=False).to_yaml())
    recipe = load_recipe(saved, ["data.synthetic=true", "data.prefixes=[]"], check_environment=False)
    assert recipe.model.vocab_size is None and recipe.tokenizer.model is None
    assert (true_vocab_size(recipe), recipe.padded_vocab_size()) == (256, 256)
