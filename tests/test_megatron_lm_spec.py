"""periln_megatron.megatron_lm: the module-level specs for Megatron-LM's `pretrain_gpt.py --spec`.

Each spec is fetched the way Megatron-LM core_v0.16.1's `gpt_builders.gpt_builder` fetches it
(`import_module(args.spec)`, args.spec being argparse's `nargs='*'` list) and handed to `GPTModel`
with gpt_builder's arguments; the model must compute what periln_megatron's own builder computes
from the same weights, and save under the same checkpoint keys.
"""

from __future__ import annotations

import os

import pytest
import torch

from mcore_single import single_process  # noqa: F401 - autouse fixture
from te_spec_checks import assert_te_layer_slots, needs_te_gpu

from periln_megatron import megatron_lm
from periln_megatron.distributed import runtime
from periln_megatron.model import specs
from model_config import transformer_config
from periln_megatron.model.build import build_gpt_model

VOCAB, SEQ = 96, 24
SIZE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96)
NORM_EPS = {"RMSNorm": 1e-5, "LayerNorm": 1e-6}  # a non-default eps: it must reach every norm


def fetch_spec(name: str):
    """As gpt_builders.py: `transformer_layer_spec = import_module(args.spec)`."""
    from megatron.core.transformer.spec_utils import import_module

    return import_module(["periln_megatron.megatron_lm", name])


def make_config(normalization="RMSNorm", **kw):
    return transformer_config(**{**SIZE, "normalization": normalization, "layernorm_epsilon": NORM_EPS[normalization],
                                 "params_dtype": torch.float32, "pipeline_dtype": torch.float32, **kw})


def megatron_lm_model(config, name: str):
    """GPTModel exactly as Megatron-LM core_v0.16.1's gpt_builder builds it with `--spec MODULE NAME`
    (--untie-embeddings-and-output-weights, --position-embedding-type rope, no MTP)."""
    from megatron.core.models.gpt import GPTModel

    runtime.seed_everything(0)
    return GPTModel(
        config=config, transformer_layer_spec=fetch_spec(name), vocab_size=VOCAB, max_sequence_length=SEQ,
        pre_process=True, post_process=True, fp16_lm_cross_entropy=False, parallel_output=True,
        share_embeddings_and_output_weights=False, position_embedding_type="rope", rotary_percent=1.0,
        rotary_base=10000, rope_scaling=False, mtp_block_spec=None, vp_stage=None, pg_collection=None,
    )


def builder_model(config, placement: str, backend: str = "local"):
    runtime.seed_everything(1)
    return build_gpt_model(config, placement=placement, backend=backend, embedding_norm=False,
                           vocab_size=VOCAB, max_sequence_length=SEQ)


def randomize_norms(model, seed=3):
    """Norm gains start at 1 (biases at 0): make them non-trivial so a misplaced norm shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))


def tensors(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.endswith("_extra_state")}


def test_module_exposes_the_specs_and_no_post():
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer

    assert set(megatron_lm.SPEC_NAMES) == {"peri_te", "peri_local", "pre_te", "pre_local", "output_te", "output_local"}
    for name in megatron_lm.SPEC_NAMES:
        spec = fetch_spec(name)
        assert isinstance(spec, ModuleSpec) and spec.module is TransformerLayer, name
    for name in ("post_te", "post_local"):  # left out by design (module docstring)
        with pytest.raises(KeyError):
            fetch_spec(name)
    with pytest.raises(specs.SpecError, match="post"):
        specs.get_layer_spec(None, "post", "local")


def _classes(spec) -> set:
    """Every class a spec names, through ModuleSpec params/submodules."""
    from dataclasses import fields, is_dataclass

    from megatron.core.transformer.spec_utils import ModuleSpec

    found = set()
    if isinstance(spec, ModuleSpec):
        found.add(spec.module)
        found |= {v for v in spec.params.values() if isinstance(v, type) or type(v).__name__ == "MagicMock"}
        spec = spec.submodules
    elif spec is not None and not isinstance(spec, dict):
        found.add(spec)
    if is_dataclass(spec):
        for f in fields(spec):
            found |= _classes(getattr(spec, f.name))
    return found


def test_te_specs_reference_te_classes():
    """The te specs name megatron's TE wrappers (placeholders here without TE), the local ones none."""
    from megatron.core.extensions import transformer_engine as te_ext

    te_classes = {te_ext.TENorm, te_ext.TELayerNormColumnParallelLinear, te_ext.TEColumnParallelLinear,
                  te_ext.TERowParallelLinear, te_ext.TEDotProductAttention}
    for placement in megatron_lm.PLACEMENTS:
        layer = fetch_spec(f"{placement}_te").submodules
        assert_te_layer_slots(layer, placement)
        local = _classes(fetch_spec(f"{placement}_local"))
        assert not local & te_classes, placement
        assert specs.LocalNorm in local, placement


@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
@pytest.mark.parametrize("placement", megatron_lm.PLACEMENTS)
def test_local_spec_matches_builder(placement, normalization):
    """Same weights, same logits, same gradients: the GPTModel Megatron-LM builds from
    `--spec periln_megatron.megatron_lm <placement>_local` is periln_megatron's model. One module-level
    spec serves both normalisations (the norms read the config when built)."""
    config = make_config(normalization)
    ours = builder_model(config, placement)
    randomize_norms(ours)
    theirs = megatron_lm_model(config, f"{placement}_local")
    ours_state, theirs_state = tensors(ours.state_dict()), tensors(theirs.state_dict())
    assert set(ours_state) == set(theirs_state)
    assert any(k.endswith("norm.bias") for k in theirs_state) == (normalization == "LayerNorm")
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert theirs.decoder.final_layernorm.eps == NORM_EPS[normalization]

    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(2))
    position_ids = torch.arange(SEQ).expand(2, SEQ)
    for model in (ours, theirs):
        model.eval()
        model.zero_grad()
    got = theirs(tokens, position_ids, None)
    want = ours(tokens, position_ids, None)
    assert got.shape == (2, SEQ, VOCAB) and want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    got.float().square().mean().backward()
    want.float().square().mean().backward()
    ours_grads = {n: p.grad for n, p in ours.named_parameters()}
    for name, p in theirs.named_parameters():
        torch.testing.assert_close(p.grad, ours_grads[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("placement", megatron_lm.PLACEMENTS)
def test_local_spec_checkpoint_keys_match_builder(placement):
    """dist_checkpointing keys (TE names, as the builder's) are the same: checkpoints are interchangeable."""
    config = make_config()
    ours = {v.key for k, v in builder_model(config, placement).sharded_state_dict().items()}
    theirs = {v.key for k, v in megatron_lm_model(config, f"{placement}_local").sharded_state_dict().items()}
    assert ours == theirs
    if placement in ("peri", "pre"):
        assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in theirs
    if placement in ("peri", "output"):
        assert "decoder.layers.mlp.linear_fc2.out_norm.weight" in theirs


@needs_te_gpu
@pytest.mark.parametrize("placement", megatron_lm.PLACEMENTS)
def test_te_spec_matches_builder(placement):
    config = make_config()
    ours = builder_model(config, placement, "te").cuda()
    randomize_norms(ours)
    theirs = megatron_lm_model(config, f"{placement}_te").cuda()
    assert set(tensors(ours.state_dict())) == set(tensors(theirs.state_dict()))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    tokens = torch.randint(0, VOCAB, (2, SEQ), device="cuda")
    position_ids = torch.arange(SEQ, device="cuda").expand(2, SEQ)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens, position_ids, None), ours(tokens, position_ids, None))


# ------------------------------------------------------------------ the documented command line

MEGATRON_LM_DIR = os.environ.get("MEGATRON_LM_DIR")


def _documented_cpu_argv() -> list[str]:
    """The argv after `pretrain_gpt.py` of docs/megatron_lm.md's CPU command."""
    import re
    import shlex
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "megatron_lm.md").read_text()
    block = re.search(r"<!-- megatron-lm-cpu-command -->\n```bash\n(.*?)```", doc, re.S).group(1)
    argv = shlex.split(block.replace("\\\n", " "))
    return argv[argv.index("pretrain_gpt.py") + 1:]


def _import_megatron_training(root: str):
    """Megatron-LM's `megatron.training.arguments` and `gpt_builders` from a checkout, without
    `megatron/training/__init__.py` (it imports the whole trainer, triton included): the package is
    registered by path and given the few globals those two modules import from it."""
    import sys
    import types

    if root not in sys.path:
        sys.path.insert(0, root)
    if "megatron.training" not in sys.modules:
        pkg = types.ModuleType("megatron.training")
        pkg.__path__ = [os.path.join(root, "megatron", "training")]
        sys.modules["megatron.training"] = pkg
        import importlib

        global_vars = importlib.import_module("megatron.training.global_vars")
        for name in dir(global_vars):
            if name.startswith(("get_", "set_")):
                setattr(pkg, name, getattr(global_vars, name))
        pkg.print_rank_0 = importlib.import_module("megatron.training.utils").print_rank_0
    from megatron.training import arguments

    import gpt_builders

    return arguments, gpt_builders


@pytest.mark.skipif(not MEGATRON_LM_DIR, reason="set MEGATRON_LM_DIR to a Megatron-LM core_v0.16.1 checkout "
                                                "(its megatron/training needs `six`)")
def test_documented_cpu_command_line(monkeypatch):
    """docs/megatron_lm.md's CPU command line through Megatron-LM's own parse_args, validate_args,
    core_transformer_config_from_args and gpt_builder: the model is build_gpt_model's for
    recipes/tiny/peri_ln.yaml (same parameter names and shapes, same logits from the same weights)."""
    import sys
    from pathlib import Path

    from periln_megatron.config import load_recipe
    from periln_megatron.model.build import transformer_config_kwargs

    arguments, gpt_builders = _import_megatron_training(MEGATRON_LM_DIR)
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *_documented_cpu_argv()])
    for var, value in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(var, value)
    args = arguments.parse_args()
    arguments.validate_args(args, {})
    assert args.spec == ["periln_megatron.megatron_lm", "peri_local"]
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "peri_ln.yaml", [],
                         check_environment=False)
    vocab = recipe.padded_vocab_size()
    args.padded_vocab_size = vocab  # set by Megatron-LM's tokenizer setup (NullTokenizer 255 + EOD -> 256)
    runtime.seed_everything(0)
    theirs = gpt_builders.gpt_builder(args, True, True)

    m = recipe.model
    config = transformer_config(**transformer_config_kwargs(recipe, cuda=False, have_te=False, have_apex=False))
    runtime.seed_everything(1)
    ours = build_gpt_model(config, placement=m.placement, backend=m.backend, embedding_norm=m.embedding_norm,
                           vocab_size=vocab, max_sequence_length=m.seq_length, rotary_base=m.rotary_base,
                           share_embeddings_and_output_weights=not m.untie_embeddings)
    shapes = lambda model: {n: tuple(p.shape) for n, p in model.named_parameters()}  # noqa: E731
    assert shapes(theirs) == shapes(ours)
    assert sum(p.numel() for p in theirs.parameters()) == 181_312  # as docs/megatron_lm.md says
    randomize_norms(ours)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    tokens = torch.randint(0, vocab, (2, m.seq_length), generator=torch.Generator().manual_seed(4))
    position_ids = torch.arange(m.seq_length).expand(2, m.seq_length)
    theirs.eval(), ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens, position_ids, None), ours(tokens, position_ids, None),
                                   atol=1e-6, rtol=0)
