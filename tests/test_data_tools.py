"""Data tools: train_tokenizer, preprocess_data, inspect_data (periln_megatron.data.tokenizers.train,
periln_megatron.data.preprocess, periln_megatron.data.inspect), periln_megatron.data.tokenizers / indexed.

Real SentencePiece / tokenizers / tiktoken / megatron-core throughout; tokenizers are trained
once per module on the text carried in tests/data (tests/corpus.py).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
sys.path.insert(0, str(REPO))

import corpus  # noqa: E402
from launch import run  # noqa: E402
from periln_megatron.data import preprocess  # noqa: E402
from periln_megatron.data.indexed import DataPrefixError, verify_prefix  # noqa: E402
from periln_megatron.data.tokenizers import load_tokenizer  # noqa: E402
from periln_megatron.data.tokenizers import train as train_tokenizer  # noqa: E402

SP = "SentencePieceTokenizer"
UNICODE_DOCS = [
    "Καλημέρα κόσμε, η γλώσσα μας είναι ελληνική.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "我能吞下玻璃而不伤身体。 日本語のテキストも 大丈夫です。",
    "emoji: 😀 🚀🔥 👩‍👩‍👧 and flags 🇫🇷",
    "مرحبا بالعالم — עברית — हिन्दी — ภาษาไทย",
    "combining: e\u0301 a\u0308 \u00e9; maths: ∑ x² ≤ ∞",
]


@pytest.fixture(scope="module")
def pp():
    return preprocess


def _docs() -> list[str]:
    """1,500 Shakespeare speeches, then 1,000 held-out WikiText-2 test paragraphs."""
    return (corpus.shakespeare_speeches()[:1500] + corpus.wikitext_paragraphs("test"))[:2500]


def _write_jsonl(path: Path, docs, key="text"):
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({key: d, "meta": 1}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "bpe1k"
    rc = train_tokenizer.main([
        "--input", *(str(corpus.data_file(name)) for name in corpus.TRAINING_FILES),
        "--model-prefix", str(out), "--vocab-size", "1000", "--special-tokens", "<|pad|>",
        "--user-defined-symbols", "<|im_start|>", "--input-sentence-size", "20000"])
    assert rc == 0
    record = json.loads(Path(f"{out}.json").read_text())
    assert record["settings"]["byte_fallback"] and record["vocab_size"] == 1000 and record["eod_id"] == 2
    assert record["special_ids"]["<|pad|>"] == 3 and record["user_defined_ids"]["<|im_start|>"] == 4
    return str(out) + ".model"


@pytest.fixture(scope="module")
def docs_jsonl(tmp_path_factory):
    docs = _docs()
    return docs, _write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", docs)


def _run_pp(pp, *argv):
    return pp.main([*map(str, argv), "--quiet"])


def test_carried_corpus_is_complete_and_fails_loudly(tmp_path, monkeypatch):
    """The test text lives in the repository (tests/data), unaltered and documented; a missing or
    altered file is an error, never a skip."""
    assert corpus.DATA_DIR == REPO / "tests" / "data"
    readme = (corpus.DATA_DIR / "README.md").read_text()
    for name, (size, digest) in corpus.FILES.items():
        assert corpus.verify(name) == corpus.DATA_DIR / name
        assert f"| `{name}` | {size:,} | `{digest[:8]}\u2026{digest[-8:]}` |" in readme, name
    assert sorted(p.name for p in corpus.DATA_DIR.glob("*.txt")) == sorted(corpus.FILES)
    assert "CC BY-SA 3.0" in readme and "Merity" in readme and "public domain" in readme
    speeches = corpus.shakespeare_speeches()
    assert len(speeches) > 7000 and speeches[0].startswith("First Citizen:\n")
    for split in ("valid", "test"):
        paragraphs = corpus.wikitext_paragraphs(split)
        assert len(paragraphs) > 1800 and "<unk>" in "".join(paragraphs)
        assert not any("\n" in p or p != p.strip() or re.fullmatch("=.*=", p) for p in paragraphs)
    assert corpus.wikitext_paragraphs()[0].startswith("Homarus gammarus , known as the European lobster")
    assert not set(corpus.wikitext_paragraphs("test")) & set(corpus.wikitext_paragraphs("valid"))

    monkeypatch.setattr(corpus, "DATA_DIR", tmp_path)
    with pytest.raises(corpus.CorpusError, match=re.escape(f"{tmp_path}/tinyshakespeare.txt is missing")):
        corpus.data_file(corpus.TINYSHAKESPEARE)
    (tmp_path / corpus.WIKITEXT2_TEST).write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(corpus.CorpusError, match="not the committed 1,256,449"):
        corpus.data_file(corpus.WIKITEXT2_TEST)
    with pytest.raises(corpus.CorpusError, match="not carried"):
        corpus.data_file("wikitext103.txt")


def test_tokenizer_adapter(spm_model):
    tok = load_tokenizer(SP, spm_model)
    assert (tok.vocab_size, tok.eod_id) == (1000, 2) and tok.segment_cache
    tricky = ["", " ", "a  b ", "\ttab\tand\nnew line ", "x\u00a0 y \u3000z", "\u2581lit\u2581eral \u2581",
              "<|im_start|>user hi", "don't  stop  me now", *UNICODE_DOCS]
    assert tok.encode_batch(tricky) == tok.sp.encode(tricky)
    assert tok.encode_batch(_docs()) == tok.sp.encode(_docs())
    plain = load_tokenizer(SP, spm_model, segment_cache=False)
    assert not plain.segment_cache and plain.encode_batch(tricky) == tok.encode_batch(tricky)
    with pytest.raises(ValueError, match="not found"):
        load_tokenizer(SP, "/nonexistent.model")


def test_roundtrip_indexed_dataset_and_gpt_dataset(pp, spm_model, docs_jsonl, tmp_path):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import DType, IndexedDataset

    from periln_megatron.data import indexed as indexed_data

    assert {c: DType.dtype_from_code(c) for c in indexed_data.DTYPE_CODES} == indexed_data.DTYPE_CODES
    docs, path = docs_jsonl
    tok = load_tokenizer(SP, spm_model)
    expected = tok.sp.encode(docs)
    for workers, eod in ((2, True), (1, False)):
        out = tmp_path / f"w{workers}"
        args = ["--input", path, "--output-prefix", out, "--tokenizer-type", SP, "--tokenizer-model", spm_model,
                "--workers", workers, "--chunk-bytes", 50_000] + (["--append-eod"] if eod else [])
        assert _run_pp(pp, *args) == 0
        prefix = f"{out}_text_document"
        ds = IndexedDataset(prefix)
        assert len(ds) == len(docs) and ds.index.dtype == np.uint16
        for i, ids in enumerate(expected):
            assert ds[i].tolist() == ids + ([tok.eod_id] if eod else []), f"document {i}"
        assert verify_prefix(prefix) == (len(docs), sum(map(len, expected)) + eod * len(docs))
        assert tok.decode(ds[5][:-1] if eod else ds[5]) == tok.sp.decode(expected[5])

    class Tok:  # what GPTDataset needs of a tokenizer
        vocab_size, eod, unique_identifiers = tok.vocab_size, tok.eod_id, {"class": "Tok"}

    config = GPTDatasetConfig(random_seed=1, sequence_length=64, blend=([f"{tmp_path}/w2_text_document"], None),
                              split="90,10,0", path_to_cache=str(tmp_path / "cache"), tokenizer=Tok(),
                              reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                              create_attention_mask=False, mmap_bin_files=True)
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, [200, 20, 0], lambda: True, config).build()
    sample = train[0]
    assert len(train) >= 200 and len(valid) >= 20 and sample["tokens"].shape == (64,)
    assert int(sample["tokens"].max()) < tok.vocab_size


def test_unicode_roundtrip_with_byte_fallback(pp, spm_model, tmp_path):
    tok = load_tokenizer(SP, spm_model)
    path = _write_jsonl(tmp_path / "uni.jsonl", UNICODE_DOCS)
    assert _run_pp(pp, "--input", path, "--output-prefix", tmp_path / "u", "--tokenizer-type", SP,
                   "--tokenizer-model", spm_model, "--workers", 1, "--append-eod") == 0
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(f"{tmp_path}/u_text_document")
    byte_ids = {i for i in range(tok.vocab_size) if tok.sp.is_byte(i)}
    for i, text in enumerate(UNICODE_DOCS):
        ids = ds[i].tolist()
        assert ids[-1] == tok.eod_id and ids[:-1] == tok.sp.encode(text)
        assert tok.decode(ids[:-1]) == text
    assert byte_ids & set(np.concatenate([ds[i] for i in range(len(ds))]).tolist()), "byte fallback never used"


BAD_LINES = [  # (line, expected message part, reason counted in skip mode)
    ('{"text": "fine"', "malformed JSON", "malformed JSON"),
    ('{"other": "no text here"}', "missing key 'text'", "missing key"),
    ('{"text": 42}', "key 'text' holds int, not a string", "not a string"),
    ('["a", "list"]', "expected a JSON object", "not a JSON object"),
    (b'{"text": "bad utf-8 \xff"}', "malformed JSON", "malformed JSON"),
]


@pytest.mark.parametrize("case", range(len(BAD_LINES)))
def test_bad_input_fail_names_file_and_line(pp, spm_model, tmp_path, capsys, case):
    bad, message, _ = BAD_LINES[case]
    path = tmp_path / "bad.jsonl"
    good = b'{"text": "hello world"}\n'
    path.write_bytes(good * 3 + (bad if isinstance(bad, bytes) else bad.encode()) + b"\n" + good)
    rc = _run_pp(pp, "--input", path, "--output-prefix", tmp_path / "b", "--tokenizer-type", SP,
                 "--tokenizer-model", spm_model, "--workers", 1, "--on-error", "fail")
    err = capsys.readouterr().err
    assert rc == 1 and f"{path}:4: " in err and message in err, err
    assert not list(tmp_path.glob("b_*")), "a failed run left files behind"


def test_bad_input_skip_counts(pp, spm_model, tmp_path):
    lines = [b'{"text": "one"}', *(b if isinstance(b, bytes) else b.encode() for b, _, _ in BAD_LINES),
             b"", b'{"text": ""}', b'{"text": "two", "n": 1}', b'{"text": "   "}']
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines))  # no final newline either
    summary = tmp_path / "summary.json"
    assert _run_pp(pp, "--input", path, "--output-prefix", tmp_path / "m", "--tokenizer-type", SP,
                   "--tokenizer-model", spm_model, "--workers", 2, "--on-error", "skip",
                   "--summary-json", summary) == 0
    stats = json.loads(summary.read_text())
    assert stats["skipped"] == {"malformed JSON": 2, "not a JSON object": 1, "missing key": 1, "not a string": 1,
                                "lone surrogate": 0}
    assert (stats["documents"], stats["empty_documents"], stats["blank_lines"]) == (2, 2, 1)
    assert verify_prefix(f"{tmp_path}/m_text_document")[0] == 2


def test_merge_gz_and_keep_separate(pp, spm_model, tmp_path):
    docs = _docs()[:300]
    a = _write_jsonl(tmp_path / "a.jsonl", docs[:100])
    b = _write_jsonl(tmp_path / "b.jsonl.gz", docs[100:])
    common = ["--tokenizer-type", SP, "--tokenizer-model", spm_model, "--workers", 2, "--append-eod"]
    assert _run_pp(pp, "--input", a, b, "--output-prefix", tmp_path / "all", *common) == 0
    assert verify_prefix(f"{tmp_path}/all_text_document")[0] == 300
    assert _run_pp(pp, "--input", a, b, "--output-prefix", tmp_path / "sep", "--keep-separate", *common) == 0
    assert verify_prefix(f"{tmp_path}/sep_a_text_document")[0] == 100
    assert verify_prefix(f"{tmp_path}/sep_b_text_document")[0] == 200


def test_sigkill_mid_write_leaves_no_complete_output(spm_model, tmp_path):
    path = _write_jsonl(tmp_path / "big.jsonl", _docs() * 12)
    prefix = tmp_path / "k_text_document"
    proc = subprocess.Popen([sys.executable, str(TOOLS / "preprocess_data.py"), "--input", str(path),
                             "--output-prefix", str(tmp_path / "k"), "--tokenizer-type", SP, "--tokenizer-model",
                             spm_model, "--workers", "1", "--chunk-bytes", "20000", "--no-segment-cache",
                             "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 90
    try:
        while time.time() < deadline and proc.poll() is None:
            tmp = list(tmp_path.glob("k_text_document.bin.tmp-*"))
            if tmp and tmp[0].stat().st_size > 100_000:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read().decode()}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (Path(f"{prefix}.bin").exists() and Path(f"{prefix}.idx").exists())
    assert not Path(f"{prefix}.idx").exists()
    with pytest.raises(DataPrefixError, match="file not found"):
        verify_prefix(prefix)


def test_truncated_files_detected(pp, spm_model, docs_jsonl, tmp_path):
    _, path = docs_jsonl
    assert _run_pp(pp, "--input", path, "--output-prefix", tmp_path / "t", "--tokenizer-type", SP,
                   "--tokenizer-model", spm_model, "--workers", 2, "--append-eod") == 0
    prefix = f"{tmp_path}/t_text_document"
    _, tokens = verify_prefix(prefix)
    inspect = [sys.executable, str(TOOLS / "inspect_data.py"), prefix, "--tokenizer-type", SP,
               "--tokenizer-model", spm_model, "--show", "1"]
    ok = run(inspect, timeout=120)
    assert f"tokens: {tokens:,}" in ok.stdout and "First Citizen" in ok.stdout, ok.stdout
    size = os.path.getsize(prefix + ".bin")
    os.truncate(prefix + ".bin", size - 10)
    with pytest.raises(DataPrefixError) as exc:
        verify_prefix(prefix)
    assert f"{prefix}.bin" in str(exc.value) and f"{size} bytes" in str(exc.value) and f"{size - 10}" in str(exc.value)
    bad = subprocess.run(inspect, capture_output=True, text=True, timeout=120)  # the error on stderr
    assert bad.returncode == 1 and f"{prefix}.bin" in bad.stderr and "truncated" in bad.stderr, bad.stderr
    os.truncate(prefix + ".idx", 100)
    with pytest.raises(DataPrefixError, match=re.escape(f"{prefix}.idx")):
        verify_prefix(prefix)


def test_huggingface_tokenizer_dir(pp, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(_docs()[:500], trainer)
    tok_dir = tmp_path / "hf"
    transformers.PreTrainedTokenizerFast(tokenizer_object=hf, eos_token="<|endoftext|>").save_pretrained(tok_dir)
    tok = load_tokenizer("HuggingFaceTokenizer", str(tok_dir))
    assert tok.eod_id == 0 and tok.vocab_size == 600
    docs = _docs()[:200] + UNICODE_DOCS
    path = _write_jsonl(tmp_path / "d.jsonl", docs)
    assert _run_pp(pp, "--input", path, "--output-prefix", tmp_path / "h", "--tokenizer-type",
                   "HuggingFaceTokenizer", "--tokenizer-model", tok_dir, "--workers", 2, "--append-eod") == 0
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(f"{tmp_path}/h_text_document")
    ref = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    for i, text in enumerate(docs):
        assert ds[i].tolist() == ref(text)["input_ids"] + [0]
        assert tok.decode(ds[i][:-1]) == text


def test_tiktoken_local_file(pp, tmp_path):
    tiktoken = pytest.importorskip("tiktoken")
    import base64

    merges = [b"th", b"he", b"the", b" t", b" the", b"in", b"an", b"and", b" a", b" and", b"er", b"on"]
    ranks = {bytes([i]): i for i in range(256)} | {m: 256 + j for j, m in enumerate(merges)}
    path = tmp_path / "tiny.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    tok = load_tokenizer("TikTokenizer", str(path))
    assert (tok.vocab_size, tok.eod_id) == (269, 268)
    docs = ["the cat and the hat", "then <|endoftext|> in", *UNICODE_DOCS]
    data = _write_jsonl(tmp_path / "t.jsonl", docs)
    assert _run_pp(pp, "--input", data, "--output-prefix", tmp_path / "tt", "--tokenizer-type", "TikTokenizer",
                   "--tokenizer-model", path, "--workers", 1, "--append-eod") == 0
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(f"{tmp_path}/tt_text_document")
    for i, text in enumerate(docs):
        ids = ds[i].tolist()
        assert ids == tok.enc.encode_ordinary(text) + [268] and tok.decode(ids[:-1]) == text
    assert ds[0].tolist()[:1] == [258]  # "the" merged
    path.write_text("not base64!! x\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:1:")):
        load_tokenizer("TikTokenizer", str(path))


def test_one_protobuf_reader_reads_sentencepiece_models(spm_model):
    """periln_megatron/data/tokenizers/protobuf.py is the one reader: the SentencePiece tokenizer and
    the HF export both read the model through it, and agree with SentencePiece's own view of it."""
    import sentencepiece

    from periln_megatron.data.tokenizers import protobuf
    from periln_megatron.data.tokenizers.sentencepiece import _sentencepiece_model_type
    from periln_megatron.hf import tokenizer as hf_tokenizer

    assert hf_tokenizer.fields is protobuf.fields and hf_tokenizer.last_values is protobuf.last_values
    model = Path(spm_model).read_bytes()
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    pieces = [value for field, wire, value in protobuf.fields(model) if field == 1 and wire == 2]
    assert [protobuf.last_values(p)[1].decode() for p in pieces] == [sp.id_to_piece(i) for i in range(1000)]
    assert _sentencepiece_model_type(model) == 2 == hf_tokenizer.read_spm(spm_model)["model_type"]  # BPE
    assert [p for p, _, _ in hf_tokenizer.read_spm(spm_model)["pieces"]] == [sp.id_to_piece(i) for i in range(1000)]
    # field 1 varint 150 (two bytes), field 2 the string "hi", field 3 fixed32
    message = b"\x08\x96\x01" + b"\x12\x02hi" + b"\x1d\x01\x02\x03\x04"
    assert list(protobuf.fields(message)) == [(1, 0, 150), (2, 2, b"hi"), (3, 5, b"\x01\x02\x03\x04")]
    for bad, what in ((b"\x0b", "wire type 3 at byte 1"), (b"\x08\x96", "varint runs past the end"),
                      (b"\x12\x05hi", "field 2 runs past the end")):
        with pytest.raises(protobuf.ProtobufError, match=what):
            list(protobuf.fields(bad))


def test_module_commands_are_the_tools(spm_model, tmp_path):
    """`python -m periln_megatron.data.preprocess` / `.data.tokenizers.train` / `.data.inspect` take the
    tools' flags and write the same bytes; the console scripts in pyproject.toml are the same mains."""
    import importlib
    import tomllib

    from periln_megatron.data import inspect as inspect_data

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for script, module in (("periln-preprocess", preprocess), ("periln-train-tokenizer", train_tokenizer),
                           ("periln-inspect-data", inspect_data)):
        name, _, attr = scripts[script].partition(":")
        assert getattr(importlib.import_module(name), attr) is module.main, script

    text = tmp_path / "text.txt"
    text.write_text("\n".join(_docs()[:400]))
    data = _write_jsonl(tmp_path / "d.jsonl", _docs()[:200])
    outs = {}
    for how, tool in (("tool", [str(TOOLS / "train_tokenizer.py")]),
                      ("module", ["-m", "periln_megatron.data.tokenizers.train"])):
        # one prefix for both: the model records it
        run([sys.executable, *tool, "--input", str(text), "--model-prefix", str(tmp_path / "sp"),
             "--vocab-size", "500", "--threads", "1"], cwd=tmp_path, timeout=120)
        outs[how] = (tmp_path / "sp.model").read_bytes()
        (tmp_path / "sp.model").unlink()
    assert outs["tool"] == outs["module"]
    for how, tool in (("tool", [str(TOOLS / "preprocess_data.py")]),
                      ("module", ["-m", "periln_megatron.data.preprocess"])):
        run([sys.executable, *tool, "--input", str(data), "--output-prefix", str(tmp_path / how / "c"),
             "--tokenizer-type", SP, "--tokenizer-model", str(spm_model), "--workers", "1", "--append-eod",
             "--quiet"], cwd=tmp_path, timeout=120)
        outs[how] = [(tmp_path / how / f"c_text_document{s}").read_bytes() for s in (".bin", ".idx")]
    assert outs["tool"] == outs["module"] and verify_prefix(f"{tmp_path}/module/c_text_document")[0] == 200
    shown = {}
    for how, tool in (("tool", [str(TOOLS / "inspect_data.py")]), ("module", ["-m", "periln_megatron.data.inspect"])):
        r = run([sys.executable, *tool, f"{tmp_path}/{how}/c_text_document", "--show", "1"], cwd=tmp_path,
                timeout=120)
        shown[how] = r.stdout.replace(f"{tmp_path}/{how}/", "")
    assert shown["tool"] == shown["module"] and "documents: 200" in shown["module"]
    helps = {how: run([sys.executable, *tool, "--help"], timeout=60).stdout
             for how, tool in (("tool", [str(TOOLS / "preprocess_data.py")]),
                               ("module", ["-m", "periln_megatron.data.preprocess"]))}
    assert helps["module"].startswith("usage: python -m periln_megatron.data.preprocess ")
    flags = {how: sorted(set(re.findall(r"--[a-z][a-z-]+", h))) for how, h in helps.items()}
    assert flags["tool"] == flags["module"] and "--keep-empty-documents" in flags["module"]
