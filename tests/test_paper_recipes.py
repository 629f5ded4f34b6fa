"""The paper recipes' own flags on CPU: overlapped parameter gather, backend-independent checkpoints."""

import json

import pytest
import torch

from launch import run_torchrun

TINY = ["-m", "periln_megatron.train", "--recipe", "recipes/tiny/peri_ln.yaml", "--set"]


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoint_tensors(iter_dir) -> dict[str, torch.Tensor]:
    from periln_megatron.hf.reader import TorchDistReader

    reader = TorchDistReader(iter_dir)
    return {key: reader.read(key) for key in reader.tensors}


def test_overlapped_param_gather_saves_and_evaluates_gathered_weights(tmp_path):
    """With overlap_param_gather (all paper recipes) the DP all-gather after a step is deferred to
    the next forward; every save and evaluation must still see the updated weights of all shards."""
    common = ["parallel.distributed_optimizer=true", "parallel.overlap_grad_reduce=true", "precision.preset=bf16",
              "train.steps=5", "checkpoint.interval=2", "checkpoint.keep=5", "train.eval_interval=2",
              "train.eval_iters=1", "optim.warmup_steps=0"]
    for gather in ("false", "true"):
        run_torchrun(2, [*TINY, f"checkpoint.dir={tmp_path / gather}", *common,
                         f"parallel.overlap_param_gather={gather}"], timeout=300)
    plain, overlapped = records(tmp_path / "false"), records(tmp_path / "true")
    assert [r.get("valid_loss") for r in overlapped] == [r.get("valid_loss") for r in plain]
    assert sum("valid_loss" in r for r in plain) == 2
    for iteration in (2, 4, 5):
        name = f"iter_{iteration:07d}"
        expected, got = checkpoint_tensors(tmp_path / "false" / name), checkpoint_tensors(tmp_path / "true" / name)
        assert sorted(got) == sorted(expected)
        model_keys = [k for k in expected if not k.startswith("optimizer")]
        assert len(model_keys) > 10
        for key in expected:
            assert torch.equal(got[key], expected[key]), f"{name}: {key} differs"


def test_huggingface_tokenizer_adds_no_bos_like_megatron_lm(tmp_path):
    """Megatron-LM 0.16's preprocessing encodes a document without the tokenizer's template tokens
    (no BOS) unless --tokenizer-hf-include-special-tokens; ours matches, compared with megatron-core's
    own HuggingFaceTokenizer library class on a tokenizer whose template adds <s>."""
    from megatron.core.tokenizers.text.libraries.huggingface_tokenizer import HuggingFaceTokenizer as MegatronHF
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from periln_megatron.tokenizer import load_tokenizer

    words = ["the", "cat", "sat", "on", "mat", "a", "dog", "."]
    vocab = {tok: i for i, tok in enumerate(["<unk>", "<s>", "</s>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>") \
        .save_pretrained(tmp_path)

    text = "the cat sat on a mat . the dog"
    ours = load_tokenizer("HuggingFaceTokenizer", str(tmp_path))
    megatron = MegatronHF(str(tmp_path))  # Megatron-LM's default: include_special_tokens=False
    assert ours.encode(text) == megatron.text_to_ids(text) == [vocab[w] for w in text.split()]
    with_bos = load_tokenizer("HuggingFaceTokenizer", str(tmp_path), include_special_tokens=True)
    assert with_bos.encode(text) == MegatronHF(str(tmp_path), include_special_tokens=True).text_to_ids(text)
    assert with_bos.encode(text)[0] == 1 and ours.eod_id == 2
