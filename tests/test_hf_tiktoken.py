"""TikTokenizer -> Hugging Face fast tokenizer: a .tiktoken file trained here (tests/tiktoken_fixture.py,
no download) is exported and must give tiktoken's ids on held-out text, its special tokens at their
ids, and the same text back; also through tools/convert_to_hf.py on a trained checkpoint. Real
tiktoken, real tokenizers/transformers, real megatron-core."""

from __future__ import annotations

import base64
import json
import sys
import time
from pathlib import Path

import pytest

from launch import REPO, run, run_torchrun
from tiktoken_fixture import make_tiktoken_file, megatron_json

PY = sys.executable
VOCAB = 3000
# OpenAI's cl100k_base special tokens (tiktoken_ext/openai_public.py): ids with gaps (100256, 100261-100275)
CL100K_SPECIALS = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                   "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}
EXTRA = ["Ünïcödé: ελληνικά, кириллица, 한국어 텍스트, 日本語の文章",
         "emoji 👍🏽 👨\u200d👩\u200d👧 e\u0301",
         "numbers 1234567 3.14159 0x1F 2025-01-31, CONTRACTIONS: DON'T WE'LL it's I'M they'VE",
         "spaces   \t\ttabs\r\nwindows\r\n\n\n   trailing   ", "specials as text: <|endoftext|> <|fim_prefix|> </s> <s>",
         "def f(x):\n    return {'a': [1, 2, 3]}  # code\n\n\n"]


@pytest.fixture(scope="module")
def corpus() -> tuple[list[str], list[str]]:
    """(training texts, held-out texts): docstrings of the standard library, as the demo's corpus;
    the held-out ones are never seen by the BPE trainer."""
    from periln_megatron.demo.corpus import stdlib_docstrings

    docs = list(stdlib_docstrings(500_000))
    train = docs[: len(docs) * 2 // 3]
    seen = set(train)
    held = [d for d in docs[len(train):] if d not in seen]
    assert len(held) > 100 and sum(map(len, held)) > 100_000
    return train, held + EXTRA


@pytest.fixture(scope="module")
def files(corpus, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tiktoken")
    train, _ = corpus
    t0 = time.perf_counter()
    out = {name: make_tiktoken_file(d / name, train, VOCAB) for name in ("cl100k_base.tiktoken", "plain.tiktoken")}
    assert (time.perf_counter() - t0) / 2 < 5, "the fixture must train in a few seconds"
    out["megatron.json"] = megatron_json(out["plain.tiktoken"], d / "megatron.json")
    return out


def _ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_text().splitlines():
        token, rank = line.split(" ")
        ranks[base64.b64decode(token, validate=True)] = int(rank)
    return ranks


def test_fixture_is_deterministic_bpe_consistent_tiktoken_file(corpus, files, tmp_path):
    train, _ = corpus
    again = make_tiktoken_file(tmp_path / "sub" / "again.tiktoken", train, VOCAB)
    assert again.read_bytes() == files["plain.tiktoken"].read_bytes() == files["cl100k_base.tiktoken"].read_bytes()
    ranks = _ranks(again)
    assert sorted(ranks.values()) == list(range(len(ranks))) and len(ranks) == VOCAB
    assert all(ranks[bytes([b])] == b for b in range(256))
    for token, rank in ranks.items():  # every merged token is two tokens of lower rank
        if rank >= 256:
            assert any(ranks.get(token[:i], rank) < rank and ranks.get(token[i:], rank) < rank
                       for i in range(1, len(token))), token
    small = make_tiktoken_file(tmp_path / "small.tiktoken", train[:50], 300)
    assert len(_ranks(small)) == 300


def _held_out_text(corpus) -> str:
    return "\n\n".join(corpus[1])


@pytest.mark.parametrize("name", ["cl100k_base.tiktoken", "plain.tiktoken", "megatron.json"])
def test_export_gives_tiktoken_ids_specials_and_text(name, files, corpus, tmp_path):
    from transformers import AutoTokenizer

    from periln_megatron.hf.tokenizer import export_tokenizer
    from periln_megatron.data.tokenizers import load_tokenizer

    path = files[name]
    tik = load_tokenizer("TikTokenizer", str(path))
    special = export_tokenizer("TikTokenizer", str(path), tmp_path / "hf", max_length=2048)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "hf" / f).is_file(), f
    fast = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))

    text = _held_out_text(corpus)
    want = tik.encode(text)
    assert len(want) > 20_000
    assert fast(text)["input_ids"] == want  # no BOS (nor EOS) added by default
    assert fast(text, add_special_tokens=False)["input_ids"] == want
    held = corpus[1]
    assert fast(held)["input_ids"] == tik.encode_batch(held)
    # decode round trip, both ways
    assert fast.decode(want) == text == tik.decode(want)

    specials = tik.enc._special_tokens
    if name == "cl100k_base.tiktoken":
        assert specials == CL100K_SPECIALS and tik.vocab_size == 100277 and tik.eod_id == 100257
        eod = "<|endoftext|>"
    elif name == "plain.tiktoken":
        assert specials == {"<|endoftext|>": VOCAB} and tik.eod_id == VOCAB
        eod = "<|endoftext|>"
    else:  # Megatron's layout: 1000 special tokens first, EOD = </s>
        assert specials["</s>"] == tik.eod_id == 2 and specials["<s>"] == 1 and len(specials) == 1000
        eod = "</s>"
        assert want[0] >= 1000
    for token, tid in specials.items():
        assert fast.convert_tokens_to_ids(token) == tid, token
        assert fast.decode([tid]) == token == tik.decode([tid])
    assert fast.eos_token == fast.bos_token == eod
    assert fast.eos_token_id == fast.bos_token_id == tik.eod_id and fast.pad_token_id is None
    assert special == {"bos_token_id": tik.eod_id, "eos_token_id": tik.eod_id}
    # a special token's text inside a document is ordinary text, as in training data
    assert fast(f"a {eod} b")["input_ids"] == tik.encode(f"a {eod} b") != [tik.eod_id]
    assert json.loads((tmp_path / "hf" / "special_tokens_map.json").read_text()) == {"bos_token": eod, "eos_token": eod}


def test_export_refuses_what_it_cannot_convert_exactly(files, tmp_path, monkeypatch):
    from periln_megatron.hf import tokenizer as hf_tok
    from periln_megatron.hf.tokenizer import TokenizerExportError, export_tokenizer

    # the check compares ids with tiktoken: without the Oniguruma translation of cl100k's
    # possessive count (\p{N}{1,3}+) digits split differently, and the export is refused
    monkeypatch.setattr(hf_tok, "onig_pattern", lambda p: p)
    with pytest.raises(TokenizerExportError, match="disagrees with tiktoken on .*1234567"):
        export_tokenizer("TikTokenizer", str(files["plain.tiktoken"]), tmp_path / "a", max_length=64)
    monkeypatch.undo()
    # not a byte-level BPE: a byte without a rank
    ranks = _ranks(files["plain.tiktoken"])
    del ranks[b"\x00"]
    lines = sorted((r, base64.b64encode(t).decode()) for t, r in ranks.items())
    (tmp_path / "nobyte.tiktoken").write_text("".join(f"{t} {r}\n" for r, t in lines))
    with pytest.raises(TokenizerExportError, match="not a byte-level BPE"):
        export_tokenizer("TikTokenizer", str(tmp_path / "nobyte.tiktoken"), tmp_path / "b", max_length=64)


def test_onig_pattern_rewrites_possessive_counts_only():
    from periln_megatron.hf.tokenizer import onig_pattern

    assert (onig_pattern(r"\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$")
            == r"(?>\p{N}{1,3})| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$")
    assert onig_pattern(r"[a\]]{2}+(ab){1,}+\d{3}") == r"(?>[a\]]{2})(?>(ab){1,})\d{3}"


def test_convert_to_hf_exports_the_paper_tokenizer(files, corpus, tmp_path):
    """A tiny Peri-LN trained with a cl100k_base-named TikTokenizer (vocabulary 100277, as the
    paper recipes) exports to a model whose tokenizer and config agree with tiktoken's ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from periln_megatron.data.tokenizers import load_tokenizer

    path = files["cl100k_base.tiktoken"]
    ckpt, hf = tmp_path / "ckpt", tmp_path / "hf"
    run_torchrun(1, ["-m", "periln_megatron.train", "--recipe", str(REPO / "recipes/tiny/peri_ln.yaml"), "--set",
                     f"checkpoint.dir={ckpt}", "train.steps=2", "checkpoint.interval=0", "optim.warmup_steps=0",
                     "train.global_batch_size=2", "train.micro_batch_size=2", "tokenizer.type=TikTokenizer",
                     f"tokenizer.model={path}", "model.vocab_size=null"], timeout=300)
    out = run([PY, "tools/convert_to_hf.py", str(ckpt), str(hf), "--quiet"], timeout=180).stdout
    assert "wrote" in out, out
    config = json.loads((hf / "config.json").read_text())
    assert config["vocab_size"] == 100277
    assert config["eos_token_id"] == config["bos_token_id"] == 100257 and "pad_token_id" not in config
    gen = json.loads((hf / "generation_config.json").read_text())
    assert gen["eos_token_id"] == gen["bos_token_id"] == 100257

    tik = load_tokenizer("TikTokenizer", str(path))
    fast = AutoTokenizer.from_pretrained(str(hf))
    text = corpus[1][0]
    ids = fast(text, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == tik.encode(text)
    assert fast.eos_token_id == config["eos_token_id"] and fast.bos_token_id == config["bos_token_id"]
    model = AutoModelForCausalLM.from_pretrained(str(hf))
    assert model.config.eos_token_id == 100257
    with torch.no_grad():
        logits = model(ids[:, :32]).logits
    assert logits.shape == (1, min(32, ids.shape[1]), 100277) and torch.isfinite(logits).all()
