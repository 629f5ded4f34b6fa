"""Layer specs: reference equivalence, TE spec structure, weight decay of norm gains, FP8 options."""

from __future__ import annotations


import pytest
import torch

from mcore_single import single_process  # noqa: F401 - autouse fixture
from te_spec_checks import assert_te_layer_slots, needs_gpu, needs_te_gpu
from reference_model import RefGPT, load_megatron_state

from periln_megatron.distributed import runtime
from periln_megatron.model import specs
from model_config import transformer_config
from periln_megatron.model.build import build_gpt_model

VOCAB, SEQ = 96, 24
SIZE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96)


def make_config(**kw):
    return transformer_config(**{**SIZE, "params_dtype": torch.float32, "pipeline_dtype": torch.float32, **kw})


def build(placement, backend="local", embedding_norm=False, **kw):
    runtime.seed_everything(0)
    return build_gpt_model(make_config(**kw), placement=placement, backend=backend, embedding_norm=embedding_norm,
                           vocab_size=VOCAB, max_sequence_length=SEQ)


def norm_params(model):
    return {n: p for n, p in model.named_parameters() if "norm" in n}


@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
@pytest.mark.parametrize("embedding_norm", [False, True])
@pytest.mark.parametrize("placement", specs.PLACEMENTS)
def test_matches_reference(placement, embedding_norm, normalization, bias=False):
    eps = 1e-5 if normalization == "RMSNorm" else 1e-6
    model = build(placement, embedding_norm=embedding_norm, normalization=normalization,
                  layernorm_epsilon=eps, add_bias_linear=bias)
    with torch.no_grad():  # norm gains start at 1; make them (and every bias) non-trivial
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
    ref = RefGPT(placement, VOCAB, SIZE["hidden_size"], SIZE["num_layers"], SIZE["num_attention_heads"],
                 SIZE["num_query_groups"], SIZE["ffn_hidden_size"], norm=normalization, eps=eps,
                 embedding_norm=embedding_norm, bias=bias)
    load_megatron_state(ref, model.state_dict())
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(2))
    model.eval()
    with torch.no_grad():
        got = model(tokens, torch.arange(SEQ).expand(2, SEQ), None)
        want = ref(tokens)
    assert got.shape == want.shape == (2, SEQ, VOCAB)
    assert want.abs().max() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("placement", ["peri", "output", "post"])
def test_matches_reference_with_linear_biases(placement):
    """The output norm sees the sublayer output including its bias."""
    test_matches_reference(placement, True, "LayerNorm", bias=True)


@pytest.mark.parametrize("placement", specs.PLACEMENTS)
def test_norm_gains_start_at_one_and_carry_sequence_parallel(placement):
    model = build(placement, embedding_norm=True)
    gains = {n: p for n, p in norm_params(model).items() if n.endswith("weight")}
    per_layer = {"peri": 4, "pre": 2, "post": 2, "output": 2}[placement]
    final = 0 if placement == "post" else 1
    assert len(gains) == 1 + SIZE["num_layers"] * per_layer + final
    assert ("decoder.final_layernorm.weight" in gains) == (placement != "post")
    for name, p in gains.items():
        assert torch.equal(p, torch.ones_like(p)), name
        assert p.sequence_parallel is False, name  # = config.sequence_parallel


def test_weight_decay_skips_norm_gains():
    """megatron-core's optimizer puts 1-D params (norm gains, biases) in a wd_mult=0 group, so the
    param scheduler gives them weight_decay 0."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    model = build("peri", embedding_norm=True, normalization="LayerNorm")
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.1, bf16=False,
                                                 params_dtype=torch.float32), [ddp])
    OptimizerParamScheduler(opt, init_lr=0.0, max_lr=1e-3, min_lr=0.0, lr_warmup_steps=1, lr_decay_steps=10,
                            lr_decay_style="cosine", start_wd=0.1, end_wd=0.1, wd_incr_steps=10,
                            wd_incr_style="constant").step(1)
    group_of = {id(p): g for g in opt.optimizer.param_groups for p in g["params"]}
    names = [n for n, _ in ddp.module.named_parameters()]
    assert sum("norm" in n for n in names) >= 4
    for name, p in ddp.module.named_parameters():
        group = group_of[id(p)]
        no_wd = "norm" in name or name.endswith(".bias")
        assert (group["wd_mult"], group["weight_decay"]) == ((0.0, 0.0) if no_wd else (1.0, 0.1)), name


def test_te_spec_structure_without_te():
    """The te spec's slots name megatron's TE wrappers (importable here as placeholders)."""
    from megatron.core.extensions import transformer_engine as te_ext

    for placement in specs.PLACEMENTS:
        layer = specs.get_layer_spec(make_config(), placement, "te").submodules
        assert_te_layer_slots(layer, placement)
        if placement == "post":
            assert layer.self_attn_bda.module is specs.NormAfterAdd
            assert layer.self_attn_bda.submodules.norm is te_ext.TENorm
    assert specs.get_block_spec(make_config(), "peri", "te").layer_norm is te_ext.TENorm
    assert specs.get_block_spec(make_config(), "post", "te").layer_norm is None


def _te_parameter_names(spec, prefix: str, normalization: str) -> set[str]:
    """Parameter names a te model built from `spec` has, from the spec's TE classes and the
    parameters Transformer Engine gives them (LayerNormLinear: weight, layer_norm_weight,
    layer_norm_bias for LayerNorm; Linear without bias: weight; RMSNorm: weight; LayerNorm: weight, bias)."""
    from megatron.core.extensions import transformer_engine as te_ext
    from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
    from megatron.core.transformer.spec_utils import ModuleSpec

    norm = {"weight"} if normalization == "RMSNorm" else {"weight", "bias"}
    module = spec.module if isinstance(spec, ModuleSpec) else spec
    if module is te_ext.TELayerNormColumnParallelLinear:
        return {prefix + n for n in {"weight"} | {"layer_norm_" + n for n in norm}}
    if module in (te_ext.TEColumnParallelLinear, te_ext.TERowParallelLinear):
        return {prefix + "weight"}
    if module is te_ext.TENorm:
        return {prefix + n for n in norm}
    if module in (IdentityOp, IdentityFuncOp, te_ext.TEDotProductAttention) or not isinstance(module, type):
        return set()  # no parameters (bias-dropout-add functions, identity, attention kernel)
    if module is specs.RowParallelLinearWithOutNorm:
        return (_te_parameter_names(spec.params["linear"], prefix, normalization)
                | _te_parameter_names(spec.submodules.out_norm, prefix + "out_norm.", normalization))
    if module is specs.NormAfterAdd:
        return _te_parameter_names(spec.submodules.norm, prefix + "norm.", normalization)
    assert isinstance(spec, ModuleSpec) and spec.submodules is not None, f"{prefix}: unknown module {module}"
    names = set()
    for field, sub in vars(spec.submodules).items():
        if field != "sharded_state_dict_keys_map":
            names |= _te_parameter_names(sub, f"{prefix}{field}.", normalization)
    return names


@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
@pytest.mark.parametrize("placement", specs.PLACEMENTS)
def test_local_checkpoint_keys_are_the_te_names(placement, normalization):
    """A local-backend model (CPU runs, convert_from_hf.py) saves under the names the te model
    has, so its checkpoints load into te recipes (and back)."""
    model = build(placement, normalization=normalization)
    saved = {v.key for k, v in model.sharded_state_dict().items() if not k.endswith("_extra_state")}
    te_layer = _te_parameter_names(specs.get_layer_spec(make_config(normalization=normalization), placement, "te"),
                                   "", normalization)
    expected = {f"decoder.layers.{name}" for name in te_layer} | {"embedding.word_embeddings.weight", "output_layer.weight"}
    if placement != "post":
        expected |= {f"decoder.final_layernorm.{n}" for n in (["weight"] if normalization == "RMSNorm" else ["weight", "bias"])}
    assert saved == expected
    assert len(te_layer) >= 4


@needs_te_gpu
@pytest.mark.parametrize("placement", specs.PLACEMENTS)
def test_local_and_te_models_have_the_same_checkpoint_keys(placement):
    local = {v.key for k, v in build(placement).sharded_state_dict().items() if not k.endswith("_extra_state")}
    te = {v.key for k, v in build(placement, backend="te").cuda().sharded_state_dict().items()
          if not k.endswith("_extra_state")}
    assert local == te


@needs_gpu
@pytest.mark.parametrize("placement", specs.PLACEMENTS)
def test_local_model_lives_on_the_gpu_and_hf_side_model_on_the_cpu(placement):
    """Megatron's layers put their parameters on the current GPU unless use_cpu_initialization; the
    local Norm must follow, or the forward mixes devices. The HF importer's whole model stays on the CPU."""
    from periln_megatron.config import load_recipe
    from periln_megatron.hf import megatron_side

    model = build(placement, use_cpu_initialization=False)
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    tokens = torch.randint(0, VOCAB, (2, SEQ), device="cuda")
    assert torch.isfinite(model(tokens, torch.arange(SEQ, device="cuda").expand(2, SEQ), None)).all()
    recipe = load_recipe("recipes/tiny/peri_ln.yaml", [f"model.placement={placement}"], check_environment=False)
    hf_side = megatron_side.build_model(recipe, recipe.padded_vocab_size(), torch.float32)
    assert {p.device.type for p in hf_side.parameters()} == {"cpu"}


@needs_te_gpu
@pytest.mark.parametrize("placement", specs.PLACEMENTS)
def test_te_model_modules(placement):
    from megatron.core.extensions import transformer_engine as te_ext

    model = build(placement, backend="te", embedding_norm=True).cuda()
    layer = model.decoder.layers[0]
    if placement in ("peri", "pre"):
        assert isinstance(layer.self_attention.linear_qkv, te_ext.TELayerNormColumnParallelLinear)
        assert isinstance(layer.mlp.linear_fc1, te_ext.TELayerNormColumnParallelLinear)
        names = {n for n, _ in model.named_parameters()}
        assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in names
        assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in names
    if placement in ("peri", "output"):
        assert isinstance(layer.self_attention.linear_proj, te_ext.TERowParallelLinear)
        assert type(layer.self_attention.linear_proj.out_norm).__module__.startswith("transformer_engine")
    tokens = torch.randint(0, VOCAB, (2, SEQ), device="cuda")
    model(tokens, torch.arange(SEQ, device="cuda").expand(2, SEQ), None).float().mean().backward()


@needs_te_gpu
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise", "mxfp8"])
def test_fp8_step(recipe):
    bf16_ends = recipe != "delayed"
    kw = dict(fp8="hybrid", fp8_recipe=recipe, first_last_layers_bf16=bf16_ends, num_layers=4,
              params_dtype=torch.bfloat16, bf16=True, hidden_size=128, num_attention_heads=4, ffn_hidden_size=256)
    try:
        specs.check_fp8_options(fp8="hybrid", fp8_recipe=recipe, first_last_layers_bf16=bf16_ends, num_layers=4)
    except specs.SpecError as e:
        pytest.skip(f"not runnable here: {e}")
    model = build("peri", backend="te", **kw).cuda()
    tokens = torch.randint(0, VOCAB, (2, 32), device="cuda")
    loss = model(tokens, torch.arange(32, device="cuda").expand(2, 32), None, labels=tokens).float().mean()
    loss.backward()
    assert torch.isfinite(loss)


def test_fp8_options():
    ok = dict(fp8="hybrid", te_version="2.8.0", num_layers=8)
    for recipe in specs.FP8_RECIPES:
        if recipe != "mxfp8" or not torch.cuda.is_available():
            specs.check_fp8_options(fp8_recipe=recipe, **ok)
    specs.check_fp8_options(fp8=None)
    specs.check_fp8_options(fp8_recipe="tensorwise", first_last_layers_bf16=True, num_layers_at_start_in_bf16=2,
                            num_layers_at_end_in_bf16=0, **ok)
    bad = [
        (dict(fp8_recipe="delayed", first_last_layers_bf16=True, **ok), "first_last_layers_bf16 with fp8_recipe 'delayed'"),
        (dict(fp8_recipe="tensorwise", first_last_layers_bf16=True, num_layers_at_end_in_bf16=5,
              pipeline_parallel=2, **ok), "num_layers_at_end_in_bf16=5"),
        (dict(fp8_recipe="delayed", backend="local", **ok), "needs backend 'te'"),
        (dict(fp8_recipe="custom", **ok), "fp8_recipe must be one of"),
        (dict(fp8="e5m2", te_version="2.8.0"), "fp8 format must be one of"),
        (dict(fp8="e4m3", fp8_recipe="blockwise", te_version="2.2.0"), "blockwise' needs Transformer Engine >= 2.3"),
        (dict(fp8=None, first_last_layers_bf16=True), "only applies with fp8"),
    ]
    for kwargs, message in bad:
        with pytest.raises(specs.SpecError, match=message.replace("(", r"\(")):
            specs.check_fp8_options(**kwargs)


def test_fp8_needs_te_backend_in_builder():
    with pytest.raises(specs.SpecError, match="needs backend 'te'"):
        build("peri", backend="local", fp8="hybrid", fp8_recipe="tensorwise")


@pytest.mark.skipif(specs.HAVE_TE, reason="checks the error raised where TE is missing")
def test_te_backend_without_te_is_a_clear_error():
    with pytest.raises(specs.SpecError, match="needs Transformer Engine"):
        build("peri", backend="te")


def test_bad_options():
    with pytest.raises(specs.SpecError, match="placement"):
        specs.get_layer_spec(make_config(), "sandwich", "local")
    with pytest.raises(specs.SpecError, match="backend"):
        specs.get_layer_spec(make_config(), "peri", "apex")
