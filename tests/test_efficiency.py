"""Cluster efficiency on CPU: the FLOP count behind MFU, GPU peaks, throughput logging, the fusions a
CUDA run enables, and the per-GPU memory estimate (`periln-params --memory`) against measured memory."""

import dataclasses
import json
import sys

import pytest

from launch import REPO, run, run_torchrun

TINY = "recipes/tiny/peri_ln.yaml"


def recipe(path, *overrides):
    from periln_megatron.config import load_recipe

    return load_recipe(REPO / path, list(overrides), check_environment=False)


# ------------------------------------------------------------------------------------------ FLOPs

def test_flops_per_token_of_the_400m_recipe_by_hand():
    """Megatron-LM's num_floating_point_operations for recipes/peri_ln/400m.yaml, written out."""
    from periln_megatron.flops import training_flops_per_token
    from periln_megatron.train import model_flops_per_token

    # L=16 layers, h=1024, 16 heads of 64 (q = kv = 1024: no GQA), ffn=2816 (SwiGLU), s=2048,
    # V = cl100k's 100277 padded to a multiple of 128 = 100352.
    qkv = 1024 * (1024 + 2 * 1024)  # 3,145,728
    core_attention = 1024 * 2048 // 2 * 2  # QK^T and AV, causal half: 2,097,152
    out_proj = 1024 * 1024  # 1,048,576
    mlp = 3 * 1024 * 2816  # 8,650,752
    per_layer = qkv + core_attention + out_proj + mlp  # 14,942,208
    logits = 1024 * 100352  # 102,760,448 (the input embedding is a lookup: no FLOPs)
    expected = 6 * (16 * per_layer + logits)
    assert expected == 2_051_014_656
    r = recipe("recipes/peri_ln/400m.yaml")
    assert training_flops_per_token(r) == expected
    assert model_flops_per_token(r, r.padded_vocab_size()) == expected
    # The old 6N + 12*L*h*s counted the input embedding and the whole (non-causal) score matrix: +40%.
    from periln_megatron.param_count import count_parameters

    old = 6 * count_parameters(r)["total"] + 12 * 16 * 1024 * 2048
    assert old == 2_869_303_296 and round(old / expected, 2) == 1.40


def test_flops_formula_against_the_built_model(tmp_path):
    """torch's FlopCounterMode on a real forward+backward of the tiny GQA model (megatron-core's GPTModel,
    local backend): every matmul is counted. The unfused local attention computes the whole s x s
    score matrix, masked half included, so it does exactly 6*L*q*s FLOPs per token more than the
    formula's causal half; everything else must agree to the FLOP."""
    worker = tmp_path / "flops_worker.py"
    worker.write_text('''
import json, sys
import torch
from torch.utils.flop_counter import FlopCounterMode
from periln_megatron import runtime
from periln_megatron.config import load_recipe

runtime.initialize()
from periln_megatron.train import build_model_chunks, model_flops_per_token, transformer_config

recipe = load_recipe(sys.argv[1], sys.argv[2:])
vocab = recipe.padded_vocab_size()
(model,) = build_model_chunks(recipe, transformer_config(recipe), vocab)
b, s = 2, recipe.model.seq_length
tokens = torch.randint(0, vocab, (b, s))
with FlopCounterMode(display=False) as counter:
    model(tokens, torch.arange(s).expand(b, s), None, labels=tokens).sum().backward()
print("FLOPS " + json.dumps({"counted": counter.get_total_flops() / (b * s),
                             "formula": model_flops_per_token(recipe, vocab)}))
runtime.shutdown()
''')
    cases = {"gqa": ["model.num_query_groups=2"], "mha-tied": ["model.num_query_groups=null",
                                                               "model.untie_embeddings=false"]}
    for name, sets in cases.items():
        out = run([sys.executable, str(worker), TINY, *sets], timeout=240).stdout
        got = json.loads(next(line[6:] for line in out.splitlines() if line.startswith("FLOPS ")))
        r = recipe(TINY, *sets)
        m = r.model
        full_minus_causal = 6 * m.num_layers * m.hidden_size * m.seq_length
        assert got["counted"] == got["formula"] + full_minus_causal, (name, got)
    # by hand for the tiny GQA shape: L=4, h=64, 4 heads of 16, 2 groups (kv=32), ffn=128, s=64, V=256
    per_layer = 64 * (64 + 2 * 32) + 64 * 64 // 2 * 2 + 64 * 64 + 3 * 64 * 128
    from periln_megatron.flops import training_flops_per_token

    assert training_flops_per_token(recipe(TINY)) == 6 * (4 * per_layer + 64 * 256) == 1_081_344


def test_peak_flops_by_device_name_and_precision():
    from periln_megatron.flops import lookup_peak, matmul_dtype, peak_flops

    assert lookup_peak("NVIDIA H100 80GB HBM3", "bf16")[0] == 989e12  # SXM
    assert lookup_peak("NVIDIA H100 PCIe", "bf16")[0] == 756.5e12
    assert lookup_peak("NVIDIA H100 NVL", "fp8")[0] == 1670.5e12
    assert lookup_peak("NVIDIA GH200 480GB", "bf16")[0] == 989e12  # not mistaken for an H200 NVL/SXM row
    assert lookup_peak("NVIDIA GB200", "bf16")[0] == 2500e12  # not the B200 row
    assert lookup_peak("NVIDIA A100-SXM4-80GB", "tf32")[0] == 156e12
    peak, why = lookup_peak("NVIDIA A100 80GB PCIe", "fp8")
    assert peak is None and "no fp8 peak" in why
    assert lookup_peak("Some Future GPU", "bf16") == (None, "'Some Future GPU' is not in periln_megatron.flops.PEAK_TFLOPS")
    assert [matmul_dtype(p) for p in ("bf16", "fp16", "fp8", "fp32")] == ["bf16", "fp16", "fp8", "fp32"]
    assert matmul_dtype("fp32", tf32=True) == "tf32"

    r = recipe("recipes/peri_ln/400m.yaml")
    assert peak_flops(r, "NVIDIA H200")[0] == 989e12
    assert peak_flops(recipe("recipes/peri_ln/400m.yaml", "precision.preset=fp32"), "NVIDIA H200")[0] == 67e12
    peak, why = peak_flops(r, "Some Future GPU")
    assert peak is None and "set logging.peak_tflops" in why
    assert peak_flops(recipe("recipes/peri_ln/400m.yaml", "logging.peak_tflops=1234.5"), "NVIDIA H100 80GB HBM3")[0] \
        == 1234.5e12  # the recipe key wins over the table
    assert peak_flops(r, None)[0] is None  # CPU


@pytest.mark.parametrize("bad", ["0", "-5", ".nan", "fast"])
def test_peak_tflops_key_is_validated(bad):
    from periln_megatron.config import RecipeError

    with pytest.raises(RecipeError, match="logging.peak_tflops"):
        recipe(TINY, f"logging.peak_tflops={bad}")


def test_trainer_logs_throughput_per_gpu_and_mfu(tmp_path):
    """Two ranks on CPU with logging.peak_tflops: tokens/s/GPU is the global rate over 2, TFLOP/s/GPU
    is that times the model FLOPs per token, MFU that over the given peak."""
    from periln_megatron.flops import training_flops_per_token

    peak = 0.02
    out = run_torchrun(2, ["-m", "periln_megatron.train", "--recipe", TINY, "--set", "train.steps=3",
                           f"logging.run_dir={tmp_path}", f"logging.peak_tflops={peak}"], timeout=300).stdout
    per_token = training_flops_per_token(recipe(TINY))
    assert f"model FLOPs {per_token / 1e9:.4g} GFLOP/token (Megatron-LM's count); MFU against the " \
           f"logging.peak_tflops = {peak:g} TFLOP/s" in out
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["tokens_per_s_per_gpu"] == pytest.approx(r["tokens_per_s"] / 2)
        assert r["tflops_per_gpu"] == pytest.approx(r["tokens_per_s_per_gpu"] * per_token / 1e12)
        assert r["mfu"] == pytest.approx(r["tflops_per_gpu"] / peak)
        assert r["tokens_per_s"] == pytest.approx(8 * 64 / (r["ms_per_step"] / 1000))
    assert "mfu" in out  # the step line

    plain = tmp_path / "no_peak"
    out = run_torchrun(1, ["-m", "periln_megatron.train", "--recipe", TINY, "--set", "train.steps=1",
                           "optim.warmup_steps=0", f"logging.run_dir={plain}"], timeout=300).stdout
    assert "MFU not reported: no GPU (set logging.peak_tflops to report MFU)" in out
    (row,) = [json.loads(line) for line in (plain / "metrics.jsonl").read_text().splitlines()]
    assert "mfu" not in row and row["tflops_per_gpu"] > 0


# ---------------------------------------------------------------------------------------- fusions

FUSIONS = ("gradient_accumulation_fusion", "bias_dropout_fusion", "bias_activation_fusion", "apply_rope_fusion",
           "masked_softmax_fusion", "persist_layer_norm", "cross_entropy_loss_fusion")


def _config_fields(config) -> dict:
    # init methods are fresh functools.partial objects per config: compare them by what they call
    return {f.name: repr(getattr(config, f.name)) if callable(getattr(config, f.name)) else getattr(config, f.name)
            for f in dataclasses.fields(config)}


@pytest.mark.parametrize("path", ["recipes/peri_ln/400m.yaml", "recipes/pre_ln/3.2b.yaml", "recipes/post_ln/400m.yaml"])
def test_cuda_config_enables_megatron_lm_fusions_and_cpu_config_has_none(path):
    from periln_megatron.train import transformer_config, transformer_config_kwargs

    r = recipe(path)
    cpu = transformer_config(r)  # this machine: no CUDA, no TE, no apex
    assert all(getattr(cpu, name) is False for name in FUSIONS) and cpu.use_cpu_initialization
    assert cpu.cross_entropy_fusion_impl == "native"
    assert _config_fields(cpu) == _config_fields(transformer_config(r, cuda=False, have_te=True, have_apex=True))

    # A CUDA node with apex but no TE: a real TransformerConfig (RoPE fusion needs TE, so it stays off)
    apex_only = transformer_config(r, cuda=True, have_te=False, have_apex=True)
    assert {name: getattr(apex_only, name) for name in FUSIONS} == {name: name != "apply_rope_fusion" for name in FUSIONS}
    assert apex_only.cross_entropy_fusion_impl == "native" and not apex_only.use_cpu_initialization
    changed = {k for k, v in _config_fields(apex_only).items() if _config_fields(cpu)[k] != v}
    assert changed == set(FUSIONS) - {"apply_rope_fusion"} | {"use_cpu_initialization"}

    # The container (TE + apex): everything on, TE's cross-entropy. TransformerConfig itself checks
    # that TE's fused RoPE is importable, so only its arguments can be built here.
    full = transformer_config_kwargs(r, cuda=True, have_te=True, have_apex=True)
    assert {name: full[name] for name in FUSIONS} == dict.fromkeys(FUSIONS, True)
    assert full["cross_entropy_fusion_impl"] == "te"
    # without apex's fused_weight_gradient_mlp_cuda megatron's LM head (a ColumnParallelLinear under
    # either backend) refuses gradient_accumulation_fusion, and its local attention would import the
    # missing masked-softmax kernels: both stay off
    te_only = transformer_config_kwargs(r, cuda=True, have_te=True, have_apex=False)
    assert not te_only["gradient_accumulation_fusion"] and not te_only["masked_softmax_fusion"]
    assert te_only["apply_rope_fusion"] and te_only["cross_entropy_loss_fusion"]
    off = transformer_config_kwargs(recipe(path, "model.cross_entropy_fusion=false"), cuda=True, have_te=True,
                                    have_apex=True)
    assert off["cross_entropy_loss_fusion"] is False and off["apply_rope_fusion"] is True

