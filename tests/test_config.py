"""Recipe schema: every validation error names the file and the key; shipped recipes validate."""

import json
from pathlib import Path

import pytest
import yaml

from launch import REPO, run, run_torchrun
from periln_megatron.config import RecipeError, load_recipe, parse_overrides

# recipes/ladders/ holds grid files (periln-ladder), checked by tests/test_ladder.py
RECIPES = sorted(p for p in (REPO / "recipes").glob("*/*.yaml") if p.parent.name != "ladders")
NOMINAL = sorted(p for p in RECIPES if p.parent.name != "tiny")


def write(tmp_path, data, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def tiny(**sections):
    base = yaml.safe_load((REPO / "recipes/tiny/peri_ln.yaml").read_text())
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return base


@pytest.mark.parametrize("sections,world,key,message", [
    ({"model": {"num_layerz": 4}}, None, "model.num_layerz", "unknown key"),
    ({"model": {"num_layers": "four"}}, None, "model.num_layers", "must be int"),
    ({"model": {"hidden_dropout": "x"}}, None, "model.hidden_dropout", "must be float"),
    ({"parallel": {"tp": 8}}, None, "parallel.tp", "larger than model.num_attention_heads"),
    ({"model": {"num_attention_heads": 4, "num_query_groups": 4, "hidden_size": 64}, "parallel": {"tp": 3}},
     None, "parallel.tp", "not divisible by parallel.tp"),
    ({"parallel": {"pp": 3}}, None, "parallel.pp", "num_layers=4 is not divisible by parallel.pp*vpp"),
    ({"parallel": {"pp": 2, "vpp": 4}}, None, "parallel.vpp", "not divisible by parallel.pp*vpp = 8"),
    ({"train": {"global_batch_size": 6}}, 4, "train.global_batch_size", "not divisible by train.micro_batch_size"),
    ({"parallel": {"tp": 2}}, 3, "parallel.tp", "world size 3 is not divisible"),
    ({"model": {"placement": "sandwich"}}, None, "model.placement", "must be one of peri, pre, post, output"),
    ({"model": {"vocab_size": 100}, "tokenizer": {"vocab_size": 1000}}, None, "model.vocab_size", "smaller than"),
    ({"data": {"synthetic_vocab_size": 0}}, None, "data.synthetic_vocab_size", ">= 1"),
    ({"precision": {"preset": "fp8"}}, None, "model.backend", "needs backend 'te'"),
    ({"model": {"backend": "te"}, "precision": {"preset": "fp8", "fp8_recipe": "delayed",
                                                 "fp8_bf16_first_last_layers": 1}},
     None, "precision.fp8_bf16_first_last_layers", "delayed"),
    ({"model": {"backend": "te"}, "precision": {"preset": "fp8"}}, None, "precision.preset",
     "needs Transformer Engine"),
    ({"model": {"backend": "te"}}, None, "model.backend", "needs Transformer Engine"),
    ({"data": {"synthetic": False}}, None, "data.prefixes", "is empty"),
    ({"data": {"synthetic": False, "prefixes": ["/nonexistent/corpus"]}}, None, "data.prefixes",
     "/nonexistent/corpus.bin not found"),
    ({"tokenizer": {"type": "SentencePieceTokenizer", "model": "/nonexistent.model"}}, None, "tokenizer.model",
     "file not found"),
    ({"checkpoint": {"keep": 0}}, None, "checkpoint.keep", ">= 1"),
    ({"train": {"steps": 0}}, None, "train.steps", ">= 1"),
    ({"train": {"steps": 2}, "optim": {"warmup_steps": 2}}, None, "optim.warmup_steps", "below train.steps = 2"),
    ({"optim": {"min_lr": 1.0}}, None, "optim.min_lr", "at most optim.lr"),
    ({"parallel": {"overlap_param_gather": True, "distributed_optimizer": False}}, None, "parallel.overlap_param_gather",
     "needs parallel.distributed_optimizer"),
])
def test_validation_error_names_file_and_key(tmp_path, sections, world, key, message):
    path = write(tmp_path, tiny(**sections))
    with pytest.raises(RecipeError) as err:
        load_recipe(path, world_size=world)
    text = str(err.value)
    assert str(path) in text and f"`{key}`" in text and message in text, text


def test_unknown_section_and_override_errors(tmp_path):
    path = write(tmp_path, tiny())
    with pytest.raises(RecipeError, match=r"unknown key `optimiser`"):
        load_recipe(path, ["optimiser.lr=1"])
    with pytest.raises(RecipeError, match=r"expected key=value"):
        load_recipe(path, ["model.num_layers"])
    with pytest.raises(RecipeError, match=r"recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_overrides_and_base_merge(tmp_path):
    assert parse_overrides(["model.num_layers=8", "parallel.tp=2", "data.prefixes=[0.3, a, 0.7, b]"]) == {
        "model": {"num_layers": 8}, "parallel": {"tp": 2}, "data": {"prefixes": [0.3, "a", 0.7, "b"]}}
    recipe = load_recipe(REPO / "recipes/tiny/pre_ln.yaml", ["model.num_layers=8"])
    assert (recipe.model.placement, recipe.model.num_layers, recipe.model.hidden_size) == ("pre", 8, 64)
    assert "with --set model.num_layers=8" in recipe.source
    # the resolved recipe round-trips through YAML
    again = write(tmp_path, yaml.safe_load(recipe.to_yaml()))
    assert load_recipe(again).to_dict() == recipe.to_dict()


def test_base_resolves_as_docs_recipes_md_says(tmp_path, monkeypatch):
    """A relative `base:` is relative to the file naming it; keys merge per section, lists are replaced
    whole; --set comes last, each key once."""
    (tmp_path / "shared").mkdir()
    (tmp_path / "exp").mkdir()
    write(tmp_path / "shared", tiny(train={"exit_signals": ["SIGTERM", "SIGUSR1"], "steps": 30}), "root.yaml")
    write(tmp_path / "shared", {"base": "root.yaml", "model": {"num_layers": 6}}, "mid.yaml")
    leaf = write(tmp_path / "exp", {"base": "../shared/mid.yaml", "train": {"exit_signals": ["SIGUSR2"]},
                                    "model": {"hidden_size": 96, "num_attention_heads": 4}})
    monkeypatch.chdir(tmp_path / "exp")  # not where the bases are
    with pytest.raises(RecipeError, match="model.num_layers: given twice"):
        load_recipe(leaf, ["model.num_layers=2", "model.num_layers=8"])
    recipe = load_recipe(leaf, ["model.num_layers=8"])
    assert (recipe.model.num_layers, recipe.model.hidden_size, recipe.model.seq_length) == (8, 96, 64)
    assert (recipe.train.exit_signals, recipe.train.steps) == (["SIGUSR2"], 30)
    write(tmp_path / "shared", {"base": "mid.yaml"}, "root.yaml")
    with pytest.raises(RecipeError, match=r"`base` chain loops back to itself"):
        load_recipe(leaf)


def test_vocab_padding_is_layout_independent():
    r1 = load_recipe(REPO / "recipes/tiny/peri_ln.yaml", ["model.vocab_size=1000"])
    r2 = load_recipe(REPO / "recipes/tiny/peri_ln.yaml", ["model.vocab_size=1000", "parallel.tp=2"])
    assert r1.padded_vocab_size() == r2.padded_vocab_size() == 1024


def test_vocabulary_unknown_without_tokenizer_or_synthetic_data(tmp_path):
    path = write(tmp_path, tiny(data={"synthetic": False, "prefixes": ["corpus_text_document"]}))
    with pytest.raises(RecipeError, match=r"`model.vocab_size` is unknown: give tokenizer.model"):
        load_recipe(path, check_environment=False)


def test_tiny_recipe_sizes_its_vocabulary_from_the_tokenizer_or_synthetic_data():
    synthetic = load_recipe(REPO / "recipes/tiny/peri_ln.yaml")
    assert synthetic.model.vocab_size is None
    assert (synthetic.data_vocab_size(), synthetic.padded_vocab_size()) == (256, 256)
    wider = load_recipe(REPO / "recipes/tiny/pre_ln.yaml", ["data.synthetic_vocab_size=300"])
    assert (wider.data_vocab_size(), wider.padded_vocab_size()) == (300, 384)
    fixed = load_recipe(REPO / "recipes/tiny/peri_ln.yaml", ["model.vocab_size=1000"])
    assert (fixed.data_vocab_size(), fixed.padded_vocab_size()) == (1000, 1024)


@pytest.fixture(scope="module")
def spm_400(tmp_path_factory):
    """A byte-fallback SentencePiece model of 400 pieces (every such model has more than 256)."""
    import sentencepiece

    from corpus import TINYSHAKESPEARE, read_text

    tmp = tmp_path_factory.mktemp("spm")
    (tmp / "text.txt").write_text(read_text(TINYSHAKESPEARE)[:100_000])
    sentencepiece.SentencePieceTrainer.train(input=str(tmp / "text.txt"), model_prefix=str(tmp / "spm"),
                                             vocab_size=400, model_type="bpe", byte_fallback=True,
                                             minloglevel=2)
    return tmp / "spm.model"


def test_tiny_recipe_takes_a_real_tokenizer(spm_400):
    from periln_megatron.data.datasets import resolve_tokenizer, with_tokenizer_size

    recipe = load_recipe(REPO / "recipes/tiny/peri_ln.yaml",
                         ["tokenizer.type=SentencePieceTokenizer", f"tokenizer.model={spm_400}"])
    info = resolve_tokenizer(recipe)
    assert (info.vocab_size, info.eod) == (400, 2)
    resolved = with_tokenizer_size(recipe, info)
    assert (resolved.data_vocab_size(), resolved.padded_vocab_size()) == (400, 512)
    assert resolved.tokenizer.vocab_size == 400 and "vocab_size: 400" in resolved.to_yaml()


def test_resolving_the_tokenizer_leaves_the_validated_recipe_unchanged(spm_400):
    import copy

    from periln_megatron.data.datasets import resolve_tokenizer, with_tokenizer_size

    recipe = load_recipe(REPO / "recipes/tiny/peri_ln.yaml",
                         ["tokenizer.type=SentencePieceTokenizer", f"tokenizer.model={spm_400}"])
    before = copy.deepcopy(recipe)
    info = resolve_tokenizer(recipe)
    resolved = with_tokenizer_size(recipe, info)
    assert recipe == before and recipe.to_yaml() == before.to_yaml()
    assert recipe.tokenizer.vocab_size is None and resolved is not recipe and resolved.tokenizer is not recipe.tokenizer
    assert resolved.tokenizer.vocab_size == 400 and resolved != recipe


def test_too_small_fixed_vocabulary_names_the_tokenizer_file_its_size_and_the_key(spm_400, capsys):
    from periln_megatron.cli import train_main

    code = train_main(["--recipe", str(REPO / "recipes/tiny/peri_ln.yaml"), "--set", "model.vocab_size=256",
                       "tokenizer.type=SentencePieceTokenizer", f"tokenizer.model={spm_400}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "`model.vocab_size` = 256 is smaller than the 400 tokens of tokenizer.model " \
        f"{spm_400} (SentencePieceTokenizer)" in err, err
    assert "model.vocab_size to null" in err and "512" in err, err


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_recipe_validates(path):
    recipe = load_recipe(path, check_environment=False)
    if path.parent.name != "tiny":
        assert recipe.model.backend == "te" and recipe.tokenizer.vocab_size == 100277
        assert recipe.padded_vocab_size() == 100352
        tokens = recipe.train.steps * recipe.train.global_batch_size * recipe.model.seq_length
        assert 29.5e9 < tokens < 30.5e9  # the paper's 30B tokens


def test_periln_params_reports_counts_within_10_percent():
    out = run([str(Path(__import__("sys").executable)), "-m", "periln_megatron.params", "--json",
               *map(str, NOMINAL)]).stdout
    rows = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    assert len(rows) == len(NOMINAL)
    for row in rows:
        assert abs(row["deviation"]) <= 0.10, row
        assert row["non_embedding"] < row["total"]
    big = next(r for r in rows if r["recipe"].endswith("peri_ln/3.2b.yaml"))
    # 3.2B fits one H100-80GB per replica with the distributed optimizer (the recipe's header gives the estimate)
    assert load_recipe(big["recipe"], check_environment=False).parallel.distributed_optimizer


def test_param_count_matches_built_model():
    variants = [[], ["model.placement=pre"], ["model.placement=post"], ["model.placement=output"],
                ["model.embedding_norm=true"], ["model.normalization=LayerNorm"], ["model.untie_embeddings=false"]]
    out = run_torchrun(1, ["tests/workers/param_count_worker.py", json.dumps(variants)], timeout=240).stdout
    rows = [json.loads(l[6:]) for l in out.splitlines() if l.startswith("COUNT ")]
    assert len(rows) == len(variants)
    for row in rows:
        assert row["built"] == row["counted"], row
