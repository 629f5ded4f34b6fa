"""tools/preprocess_data.py (periln_megatron.data.preprocess) writes the same bytes as Megatron-LM's tools/preprocess_data.py.

The reference (`megatron_reference`) is what Megatron-LM's script at tag core_v0.16.1 does, as
read in its source, rebuilt here from megatron-core 0.16.1 (installed): its tokenizers, as the
script builds them (``megatron.core.tokenizers``' build_tokenizer, the default; not
--legacy-tokenizer), and its ``IndexedDatasetBuilder``, which the script writes with:

1. Output names: ``OUTPUT_PREFIX_{key}_document.bin/.idx``, or ``..._{key}_sentence.bin/.idx``
   with --split-sentences. Token dtype: ``DType.optimal_dtype(tokenizer.vocab_size)`` (uint16
   below 65,500 entries, else int32).
2. Each JSONL line is a document. For each --json-keys key (each key its own builder) the text is
   one sequence, or with --split-sentences each of its sentences is: nltk's punkt for --lang
   (``nltk.load("tokenizers/punkt/{lang}.pickle")``, which nltk >= 3.9 serves from its punkt_tab
   data) applied to each 1,000,000 characters of the text in turn, the lists joined. With
   --keep-newlines the splitter is a ``PunktSentenceTokenizer`` of the same parameters whose
   period context takes the word before a sentence end and the whitespace after it (so newlines
   stay at the end of their sentence instead of being dropped).
3. Each sequence is tokenized on its own; sequences of no tokens are dropped; with --append-eod the
   EOD id is appended to the document's last remaining sequence. The document is written with
   ``add_document(ids, lengths)``: its sequences, then a document boundary — the same as
   ``add_item`` per sequence and ``end_document``, which the reference uses. A document of no
   tokens is a document boundary with no sequences (ours by default drops it:
   --keep-empty-documents writes it as Megatron-LM does).
4. --partitions N > 1: the input lines, all files in turn, are dealt into N partition files (line i
   to partition i mod N; with --keep-sequential-samples contiguous runs of ceil(lines / N) lines),
   each partition is written as above by its own builders, and the partitions' outputs are merged
   with ``add_index`` in partition order.

Tokenizers: GPT2BPETokenizer is megatron-core's ``MegatronHFTokenizer``, i.e. transformers'
GPT-2 tokenizer, whose algorithm (GPT-2's byte-level BPE; ``<|endoftext|>`` in the text is the
special token) `ReferenceGPT2` implements in plain Python from vocab.json + merges.txt;
`test_gpt2_bpe_matches_megatron_core` runs megatron-core's own class on the same files (offline:
it asks the Hub for "gpt2", served here from a local cache). HuggingFaceTokenizer and
SentencePieceTokenizer are megatron-core's classes themselves.

Not reproduced (so not compared): with several --json-keys Megatron-LM's script finalizes only the
last key's .idx (its loop variable after the loop); with --split-sentences and one partition a run
stops after writing INPUT_ss.jsonl and a second run tokenizes it; with --partitions it takes
``glob.glob(--input)`` in directory order (ours: the order of --input, each glob sorted); a blank
or malformed line stops it (ours: blank lines are skipped, --on-error decides the rest).

Test text: tests/data via tests/corpus.py; every tokenizer and the punkt model are trained here.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import corpus  # noqa: E402
from periln_megatron.data import preprocess  # noqa: E402

EOT = "<|endoftext|>"
SPLIT_CHARS = 1_000_000  # Megatron-LM splits sentences this many characters at a time
UNICODE_DOCS = [
    "Καλημέρα κόσμε, η γλώσσα μας είναι ελληνική. Δεύτερη πρόταση!",
    "我能吞下玻璃而不伤身体。 日本語のテキストも 大丈夫です。",
    "emoji: 😀 🚀🔥 👩‍👩‍👧 and flags 🇫🇷. Done.",
    "combining: e\u0301 a\u0308 \u00e9; maths: ∑ x² ≤ ∞",
]
EDGE_DOCS = [
    "",  # no tokens: a document of no sequences in Megatron-LM's output
    "   ",  # whitespace: tokens, but no sentence
    "\n\n",
    "Dr. Smith arrived at 3 p.m. and left. He left.\nThen: \"Why?\" she asked.  Done!\n\nNew paragraph here.",
    f"A literal {EOT} inside a document. Next{EOT}and after.",
    "It's they're we've I'm you'll he'd 12345 67.8 and   multiple   spaces\t\ttabs \u00a0nbsp",
]
# A document longer than SPLIT_CHARS: Megatron-LM cuts it at character 1,000,000, inside "Epsilon"
LONG_DOC = "Alpha beta. Gamma delta." + " " * (SPLIT_CHARS - 28) + "Epsilon zeta. Eta theta."


@pytest.fixture(scope="module")
def pp():
    return preprocess


def _docs() -> list[str]:
    return (corpus.shakespeare_speeches()[:300] + corpus.wikitext_paragraphs("test")[:150]
            + UNICODE_DOCS + EDGE_DOCS)


def _lines(docs) -> list[str]:
    """JSONL lines with two keys: the document and a short second text (its first words)."""
    return [json.dumps({"text": d, "title": " ".join(d.split()[:4]), "n": i}, ensure_ascii=False)
            for i, d in enumerate(docs)]


def _write(path: Path, lines) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------ reference
def megatron_reference(out_prefix, lines, keys, encode, eod, vocab_size, *, append_eod, splitter=None,
                       partitions=1, keep_sequential=False, drop_empty=False) -> dict[str, str]:
    """Write what Megatron-LM's preprocess_data.py writes for these JSONL `lines` (see the module
    docstring); `encode(text) -> ids` is the tokenizer's; return {key: output prefix}. `drop_empty`:
    leave out documents of no tokens instead (what ours does without --keep-empty-documents)."""
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    level = "sentence" if splitter else "document"
    dtype = DType.optimal_dtype(vocab_size)
    if partitions == 1:
        parts = [lines]
    elif keep_sequential:
        size = math.ceil(len(lines) / partitions)
        parts = [lines[p * size:(p + 1) * size] for p in range(partitions)]
    else:
        parts = [lines[p::partitions] for p in range(partitions)]

    def write(prefix, key, part_lines):
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
        for line in part_lines:
            text = json.loads(line)[key]
            if splitter is None:
                sentences = [text]
            else:
                sentences = [s for i in range(0, len(text), SPLIT_CHARS)
                             for s in splitter.tokenize(text[i:i + SPLIT_CHARS])]
            sequences = [ids for ids in map(encode, sentences) if len(ids) > 0]
            if sequences and append_eod:
                sequences[-1] = sequences[-1] + [eod]
            if not sequences and drop_empty:
                continue
            for ids in sequences:
                builder.add_item(torch.tensor(ids, dtype=torch.int64))
            builder.end_document()
        builder.finalize(prefix + ".idx")

    out = {}
    for key in keys:
        final = f"{out_prefix}_{key}_{level}"
        if partitions == 1:
            write(final, key, parts[0])
        else:
            for p, part_lines in enumerate(parts):
                write(f"{out_prefix}_{p}_{key}_{level}", key, part_lines)
            builder = IndexedDatasetBuilder(final + ".bin", dtype=dtype)
            for p in range(partitions):
                builder.add_index(f"{out_prefix}_{p}_{key}_{level}")
            builder.finalize(final + ".idx")
        out[key] = final
    return out


def assert_same_bytes(ours: str, reference: str) -> None:
    for suffix in (".idx", ".bin"):
        a, b = Path(ours + suffix).read_bytes(), Path(reference + suffix).read_bytes()
        assert len(a) == len(b) and a == b, f"{ours}{suffix} ({len(a)} bytes) != {reference}{suffix} ({len(b)} bytes)"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 byte values to printable characters."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class ReferenceGPT2:
    """GPT-2's byte-level BPE as published (OpenAI's encoder.py), in plain Python: the text is cut
    at ``<|endoftext|>`` (the special token, as transformers' GPT-2 tokenizer does), each piece by
    GPT-2's pattern; each part's UTF-8 bytes become GPT-2's characters and the adjacent pair of
    lowest merge rank is merged until none is left. merges.txt: its first line and whatever
    follows the last newline are not merges (as transformers and Megatron-LM read it)."""

    PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

    def __init__(self, vocab_path, merges_path):
        import regex

        self.pattern = regex.compile(self.PATTERN)
        self.encoder = json.loads(Path(vocab_path).read_text(encoding="utf-8"))
        merges = Path(merges_path).read_text(encoding="utf-8").split("\n")[1:-1]
        self.ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
        self.byte_chars = _bytes_to_unicode()
        self.eod, self.vocab_size, self.cache = self.encoder[EOT], len(self.encoder), {}

    def bpe(self, word: str) -> list[str]:
        if word in self.cache:
            return self.cache[word]
        parts = list(word)
        while len(parts) > 1:
            rank, pair = min((self.ranks.get(p, math.inf), p) for p in zip(parts, parts[1:]))
            if rank == math.inf:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self.cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        ids = []
        for n, piece in enumerate(text.split(EOT)):
            if n:
                ids.append(self.eod)
            for token in self.pattern.findall(piece):
                ids.extend(self.encoder[p] for p in self.bpe("".join(self.byte_chars[b] for b in token.encode())))
        return ids


# ------------------------------------------------------------------------------------ tokenizers
@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
    """A GPT-2 style vocab.json + merges.txt trained here (ByteLevel BPE, 700 merges), with
    <|endoftext|> as the last id as in GPT-2's own."""
    from tokenizers import ByteLevelBPETokenizer

    out = tmp_path_factory.mktemp("gpt2")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus.shakespeare_speeches()[1000:3000] + corpus.wikitext_paragraphs("valid")[:400],
                            vocab_size=956, min_frequency=2, show_progress=False)
    bpe.save_model(str(out))
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    vocab[EOT] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = (out / "merges.txt").read_text(encoding="utf-8")
    assert merges.startswith("#version") and merges.endswith("\n") and merges.count("\n") > 600
    return out / "vocab.json", out / "merges.txt"


def _hf_dir(path: Path) -> Path:
    """A Hugging Face tokenizer directory whose template adds a BOS (<|bos|>); eos <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=[EOT, "<|bos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(corpus.shakespeare_speeches()[1000:2500], trainer)
    hf.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=hf, eos_token=EOT, bos_token="<|bos|>").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return _hf_dir(tmp_path_factory.mktemp("hf") / "tok")


def megatron_core_tokenizer(library: str, path: str, **kwargs):
    """A megatron-core 0.16.1 tokenizer built as Megatron-LM's build_tokenizer(args) builds it."""
    from megatron.core.tokenizers import MegatronTokenizer

    if library in ("huggingface", "megatron"):
        kwargs = {"additional_special_tokens": [], "use_fast": False, "trust_remote_code": False,
                  "include_special_tokens": False, **kwargs}
    elif library == "sentencepiece":
        kwargs = {"legacy": False, "special_tokens": None, **kwargs}
    return MegatronTokenizer.from_pretrained(tokenizer_path=path, metadata_path={"library": library}, **kwargs)


# ------------------------------------------------------------------------------------ punkt
@pytest.fixture(scope="module")
def punkt(tmp_path_factory):
    """nltk's punkt trained here (PunktTrainer on the carried training text; nltk's own models are a
    download) and installed as an nltk data directory (tokenizers/punkt_tab/english/, the format
    nltk >= 3.9 loads). Returns (data directory, the trained parameters)."""
    pytest.importorskip("nltk", reason="--split-sentences needs nltk (pyproject.toml's test extra)")
    from nltk.tabdata import TabEncoder
    from nltk.tokenize.punkt import PunktTrainer

    trainer = PunktTrainer()
    trainer.train(corpus.tinyshakespeare_text()[:100_000] + "\n\n" + "\n".join(corpus.wikitext_paragraphs("valid")[:150])
                  + "\nDr. Who met Dr. No. Mr. Smith met Mrs. Jones at 3 p.m. on Monday.", finalize=True)
    params = trainer.get_params()
    root = tmp_path_factory.mktemp("nltk_data")
    lang = root / "tokenizers" / "punkt_tab" / "english"
    lang.mkdir(parents=True)
    enc = TabEncoder()
    (lang / "collocations.tab").write_text(enc.tups2tab(params.collocations), encoding="utf-8")
    (lang / "sent_starters.txt").write_text(enc.set2txt(params.sent_starters), encoding="utf-8")
    (lang / "abbrev_types.txt").write_text(enc.set2txt(params.abbrev_types), encoding="utf-8")
    (lang / "ortho_context.tab").write_text(enc.ivdict2tab(params.ortho_context), encoding="utf-8")
    return root, params


@pytest.fixture
def nltk_data(punkt, monkeypatch):
    """nltk finds only the punkt model trained here (forked workers inherit the search path)."""
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(punkt[0])])
    return punkt


def reference_splitter(params, keep_newlines: bool):
    """punkt with `params`; keep_newlines: Megatron-LM's language variables, whose period context
    is word material, a sentence-end character, then *consumed* whitespace before the lookahead
    (other punctuation, or the next token) — the whitespace ends the sentence instead of being dropped."""
    from nltk.tokenize.punkt import PunktLanguageVars, PunktSentenceTokenizer

    class KeepNewlines(PunktLanguageVars):
        _period_context_fmt = r"""\S*%(SentEndChars)s\s*(?=(?P<after_tok>%(NonWord)s|(?P<next_tok>\S+)))"""

    if keep_newlines:
        return PunktSentenceTokenizer(train_text=params, lang_vars=KeepNewlines())
    return PunktSentenceTokenizer(params)


def _run(pp, *argv) -> int:
    return pp.main([*map(str, argv), "--quiet"])


# ------------------------------------------------------------------------------------ GPT-2 BPE
def test_gpt2_bpe_is_gpt2s_algorithm(gpt2_files, tmp_path):
    """Ours (the tokenizers library) gives GPT-2's BPE ids; vocab size and EOD as Megatron-LM's
    (entries in vocab.json, the id of <|endoftext|>); a malformed pair of files fails in one line."""
    from periln_megatron.data.tokenizers import load_tokenizer

    vocab, merges = gpt2_files
    ours = load_tokenizer("GPT2BPETokenizer", str(vocab), merge_file=str(merges))
    ref = ReferenceGPT2(vocab, merges)
    docs = _docs()
    assert ours.encode_batch(docs) == [ref.encode(d) for d in docs]
    assert (ours.vocab_size, ours.eod_id) == (957, 956) == (ref.vocab_size, ref.eod)
    assert ours.encode(f"a{EOT}b")[1] == 956 and ours.decode(ours.encode(UNICODE_DOCS[2])) == UNICODE_DOCS[2]
    assert load_tokenizer("GPT2BPETokenizer", str(vocab.parent)).encode_batch(docs[:50]) == ours.encode_batch(docs[:50])

    headless = tmp_path / "headless.txt"
    headless.write_text(merges.read_text(encoding="utf-8").split("\n", 1)[1], encoding="utf-8")
    with pytest.raises(ValueError, match=f"{headless}:1: expected a '#version' header"):
        load_tokenizer("GPT2BPETokenizer", str(vocab), merge_file=str(headless))
    no_eot = tmp_path / "vocab.json"
    no_eot.write_text(json.dumps({k: v for k, v in json.loads(vocab.read_text()).items() if k != EOT}))
    with pytest.raises(ValueError, match="no <\\|endoftext\\|> token"):
        load_tokenizer("GPT2BPETokenizer", str(no_eot), merge_file=str(merges))
    with pytest.raises(ValueError, match="merges file not found"):
        load_tokenizer("GPT2BPETokenizer", str(vocab), merge_file=str(tmp_path / "nope.txt"))


def _fake_hub_cache(hub: Path, repo: str, files: dict[str, Path | str], missing=()) -> None:
    """`repo` in a Hugging Face Hub cache directory, as a download leaves it (files of one snapshot,
    refs/main, and the files the Hub does not have recorded under .no_exist)."""
    commit = "0" * 40
    root = hub / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, src in files.items():
        if isinstance(src, Path):
            shutil.copy(src, snap / name)
        else:
            (snap / name).write_text(src)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    (root / ".no_exist" / commit).mkdir(parents=True)
    for name in missing:
        (root / ".no_exist" / commit / name).write_text("")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache, offline (huggingface_hub reads these at each call; forked workers inherit them)."""
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


def test_gpt2_bpe_matches_megatron_core(gpt2_files, hub_cache):
    """megatron-core's own GPT2BPETokenizer (what Megatron-LM 0.16.1's script builds) on the same
    files gives the same ids, EOD and vocab size. It loads transformers' GPT-2 tokenizer of the Hub
    id "gpt2" with --vocab-file, but its --merge-file goes to an argument transformers does not
    know (`merge_files`): the merges are the Hub's gpt2's. With GPT-2's own files the two agree;
    here the cached "gpt2" holds our pair so that the comparison is offline and meaningful."""
    vocab, merges = gpt2_files
    _fake_hub_cache(hub_cache, "gpt2", {"vocab.json": vocab, "merges.txt": merges,
                                        "config.json": '{"model_type": "gpt2"}',
                                        "tokenizer_config.json": '{"model_max_length": 1024}'},
                    missing=("tokenizer.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja"))
    megatron = megatron_core_tokenizer("megatron", "GPT2BPETokenizer", vocab_file=str(vocab), merges_file=str(merges))
    ref = ReferenceGPT2(vocab, merges)
    assert (megatron.vocab_size, megatron.eod) == (ref.vocab_size, ref.eod)
    for doc in _docs():
        assert megatron.tokenize(doc) == ref.encode(doc), doc[:80]


@pytest.mark.parametrize("append_eod", [True, False])
def test_gpt2_documents_byte_identical(pp, gpt2_files, tmp_path, append_eod):
    """--tokenizer-type GPT2BPETokenizer --vocab-file --merge-file, two --json-keys, 2 workers over
    many small blocks: both keys' .bin/.idx byte-identical to Megatron-LM's (--keep-empty-documents);
    by default the same less the documents of no tokens."""
    vocab, merges = gpt2_files
    ref = ReferenceGPT2(vocab, merges)
    lines = _lines(_docs())
    path = _write(tmp_path / "in.jsonl", lines)
    flags = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab, "--merge-file", merges,
             "--json-keys", "text", "title", "--workers", 2, "--chunk-bytes", 20_000] + ["--append-eod"] * append_eod
    assert _run(pp, "--input", path, "--output-prefix", tmp_path / "ours", "--keep-empty-documents", *flags) == 0
    expect = megatron_reference(str(tmp_path / "ref"), lines, ["text", "title"], ref.encode, ref.eod, ref.vocab_size,
                                append_eod=append_eod)
    for key, prefix in expect.items():
        assert_same_bytes(f"{tmp_path}/ours_{key}_document", prefix)

    assert _run(pp, "--input", path, "--output-prefix", tmp_path / "drop", *flags) == 0
    expect = megatron_reference(str(tmp_path / "refdrop"), lines, ["text", "title"], ref.encode, ref.eod,
                                ref.vocab_size, append_eod=append_eod, drop_empty=True)
    for key, prefix in expect.items():
        assert_same_bytes(f"{tmp_path}/drop_{key}_document", prefix)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(f"{tmp_path}/ours_text_document")
    assert ds.index.dtype == np.uint16 and len(ds.document_indices) == len(lines) + 1
    empty = _docs().index("")
    assert ds.document_indices[empty] == ds.document_indices[empty + 1]  # a document of no sequences


def test_gpt2_large_vocabulary_is_int32(pp, gpt2_files, tmp_path):
    """At 65,500 vocabulary entries or more the tokens are int32 (DType.optimal_dtype), as Megatron-LM's."""
    vocab, merges = gpt2_files
    big = json.loads(vocab.read_text(encoding="utf-8"))
    big.update({f"<|unused_{i}|>": len(big) + i for i in range(65_600 - len(big))})
    (tmp_path / "vocab.json").write_text(json.dumps(big, ensure_ascii=False), encoding="utf-8")
    ref = ReferenceGPT2(tmp_path / "vocab.json", merges)
    lines = _lines(_docs()[:200])
    path = _write(tmp_path / "in.jsonl", lines)
    assert _run(pp, "--input", path, "--output-prefix", tmp_path / "ours", "--tokenizer-type", "GPT2BPETokenizer",
                "--vocab-file", tmp_path / "vocab.json", "--merge-file", merges, "--append-eod", "--workers", 1) == 0
    expect = megatron_reference(str(tmp_path / "ref"), lines, ["text"], ref.encode, ref.eod, ref.vocab_size,
                                append_eod=True)
    assert_same_bytes(f"{tmp_path}/ours_text_document", expect["text"])
    from periln_megatron.data.indexed import read_index_header

    assert read_index_header(f"{tmp_path}/ours_text_document.idx")[0] == np.int32


# ------------------------------------------------------------------------------------ sentences
@pytest.mark.parametrize("keep_newlines", [False, True])
def test_split_sentences_byte_identical(pp, gpt2_files, nltk_data, tmp_path, keep_newlines):
    """--split-sentences [--keep-newlines] --lang english with punkt trained here: one sequence per
    sentence, EOD on each document's last, outputs ..._sentence; byte-identical to Megatron-LM's.
    Without --keep-newlines a document longer than 1,000,000 characters is split piecewise as
    Megatron-LM does (a sentence cut at character 1,000,000 becomes two)."""
    vocab, merges = gpt2_files
    ref = ReferenceGPT2(vocab, merges)
    splitter = reference_splitter(nltk_data[1], keep_newlines)
    docs = _docs() + ([] if keep_newlines else [LONG_DOC])  # (its million spaces would be one token)
    if keep_newlines:
        assert splitter.tokenize("One here.\nTwo there!\n\nThree.") == ["One here.\n", "Two there!\n\n", "Three."]
        assert sum(s.endswith("\n") for d in docs for s in splitter.tokenize(d)) > 50
    else:
        assert splitter.tokenize("We met at 3 p.m. and left. Washington, D.C. is big.") \
            == ["We met at 3 p.m. and left.", "Washington, D.C. is big."]  # learnt abbreviations
        assert [s for i in range(0, len(LONG_DOC), SPLIT_CHARS) for s in splitter.tokenize(LONG_DOC[i:i + SPLIT_CHARS])] \
            == ["Alpha beta.", "Gamma delta.", "Epsi", "lon zeta.", "Eta theta."]
    lines = _lines(docs)
    path = _write(tmp_path / "in.jsonl", lines)
    assert _run(pp, "--input", path, "--output-prefix", tmp_path / "ours", "--tokenizer-type", "GPT2BPETokenizer",
                "--vocab-file", vocab, "--merge-file", merges, "--json-keys", "text", "title", "--append-eod",
                "--split-sentences", "--lang", "english", "--workers", 2, "--chunk-bytes", 50_000,
                "--keep-empty-documents", *(["--keep-newlines"] if keep_newlines else [])) == 0
    expect = megatron_reference(str(tmp_path / "ref"), lines, ["text", "title"], ref.encode, ref.eod, ref.vocab_size,
                                append_eod=True, splitter=splitter)
    for key, prefix in expect.items():
        assert_same_bytes(f"{tmp_path}/ours_{key}_sentence", prefix)
    assert not list(tmp_path.glob("ours_*_document.*"))
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(f"{tmp_path}/ours_text_sentence")
    assert len(ds) > 2 * len(docs) and len(ds.document_indices) == len(docs) + 1


def test_split_sentences_needs_punkt_and_nltk(pp, gpt2_files, tmp_path, monkeypatch, capsys):
    """Without the punkt model (nltk downloads it; we never do) or without nltk: exit 1, one line
    saying what to install, no output files."""
    pytest.importorskip("nltk")
    import nltk

    vocab, merges = gpt2_files
    path = _write(tmp_path / "in.jsonl", _lines(_docs()[:5]))
    argv = ["--input", path, "--output-prefix", tmp_path / "o", "--tokenizer-type", "GPT2BPETokenizer",
            "--vocab-file", vocab, "--merge-file", merges, "--split-sentences", "--workers", 1]
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "no_nltk_data")])
    assert _run(pp, *argv, "--lang", "english") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "punkt model for --lang english is not installed" in err and "nltk.downloader punkt_tab" in err, err
    monkeypatch.setitem(sys.modules, "nltk", None)  # `import nltk` fails
    assert _run(pp, *argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--split-sentences needs nltk (pip install nltk)" in err, err
    assert not list(tmp_path.glob("o_*"))


# ------------------------------------------------------------------------------------ partitions
@pytest.mark.parametrize("partitions,keep_sequential,split", [(3, False, False), (3, True, False), (2, False, True)])
def test_partitions_byte_identical(pp, gpt2_files, punkt, monkeypatch, tmp_path, partitions, keep_sequential, split):
    """--partitions N [--keep-sequential-samples]: Megatron-LM's document order (lines dealt
    round-robin over the partitions, counted across input files; or contiguous runs), written
    partition after partition; byte-identical. With --keep-sequential-samples that is the order of
    one partition."""
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(punkt[0])])
    vocab, merges = gpt2_files
    ref = ReferenceGPT2(vocab, merges)
    lines = _lines(_docs())
    first = _write(tmp_path / "a.jsonl", lines[:101])  # the count goes on across files
    second = _write(tmp_path / "b.jsonl", lines[101:])
    flags = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab, "--merge-file", merges, "--append-eod",
             "--json-keys", "text", "title", "--workers", 2, "--chunk-bytes", 30_000, "--keep-empty-documents"]
    flags += ["--split-sentences"] * split
    assert _run(pp, "--input", first, second, "--output-prefix", tmp_path / "ours", "--partitions", partitions,
                *flags, *(["--keep-sequential-samples"] if keep_sequential else [])) == 0
    expect = megatron_reference(str(tmp_path / "ref"), lines, ["text", "title"], ref.encode, ref.eod, ref.vocab_size,
                                append_eod=True, splitter=reference_splitter(punkt[1], False) if split else None,
                                partitions=partitions, keep_sequential=keep_sequential)
    level = "sentence" if split else "document"
    for key, prefix in expect.items():
        assert_same_bytes(f"{tmp_path}/ours_{key}_{level}", prefix)
    assert sorted(p.name for p in tmp_path.glob("ours*")) == sorted(
        f"ours_{k}_{level}{s}" for k in ("text", "title") for s in (".bin", ".idx"))  # no partition files left
    if keep_sequential:
        assert _run(pp, "--input", first, second, "--output-prefix", tmp_path / "one", *flags) == 0
        assert_same_bytes(f"{tmp_path}/one_text_{level}", f"{tmp_path}/ours_text_{level}")
    else:
        one = megatron_reference(str(tmp_path / "one"), lines, ["text"], ref.encode, ref.eod, ref.vocab_size,
                                 append_eod=True, splitter=reference_splitter(punkt[1], False) if split else None)
        assert Path(one["text"] + ".bin").read_bytes() != Path(f"{tmp_path}/ours_text_{level}.bin").read_bytes()


# ------------------------------------------------------------------------------------ Hugging Face
@pytest.mark.parametrize("include_special,split", [(False, False), (True, False), (True, True)])
def test_huggingface_byte_identical(pp, hf_dir, punkt, monkeypatch, tmp_path, include_special, split):
    """HuggingFaceTokenizer from a local directory, with and without
    --tokenizer-hf-include-special-tokens (the template's BOS on every sequence, or none): byte-identical
    to Megatron-LM's with megatron-core's HuggingFaceTokenizer as the tokenizer."""
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(punkt[0])])
    megatron = megatron_core_tokenizer("huggingface", str(hf_dir), include_special_tokens=include_special)
    lines = _lines(_docs())
    path = _write(tmp_path / "in.jsonl", lines)
    assert _run(pp, "--input", path, "--output-prefix", tmp_path / "ours", "--tokenizer-type", "HuggingFaceTokenizer",
                "--tokenizer-model", hf_dir, "--append-eod", "--workers", 2, "--chunk-bytes", 40_000,
                "--keep-empty-documents", *(["--tokenizer-hf-include-special-tokens"] * include_special),
                *(["--split-sentences"] * split)) == 0
    expect = megatron_reference(str(tmp_path / "ref"), lines, ["text"], megatron.tokenize, megatron.eod,
                                megatron.vocab_size, append_eod=True,
                                splitter=reference_splitter(punkt[1], False) if split else None)
    level = "sentence" if split else "document"
    assert_same_bytes(f"{tmp_path}/ours_text_{level}", expect["text"])
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(f"{tmp_path}/ours_text_{level}")
    firsts = {int(ds[i][0]) for i in range(len(ds))}
    assert (firsts == {1}) if include_special else (1 not in firsts)  # <|bos|> is id 1
    assert megatron.eod == 0 and int(ds[len(ds) - 1][-1]) == 0


def test_huggingface_hub_id(pp, hf_dir, hub_cache, tmp_path, monkeypatch, capsys):
    """--tokenizer-model ORG/NAME: a Hub id is loaded from the local Hub cache (the same bytes as from
    the directory); one that is not cached fails in one line when offline (HF_HUB_OFFLINE) and when
    the Hub's host does not resolve, naming the id; nothing is downloaded."""
    from huggingface_hub import constants

    _fake_hub_cache(hub_cache, "periln-test/tiny-bpe", {p.name: p for p in hf_dir.iterdir()}, missing=("config.json",))
    lines = _lines(_docs()[:300])
    path = _write(tmp_path / "in.jsonl", lines)
    common = ["--tokenizer-type", "HuggingFaceTokenizer", "--append-eod", "--workers", 2, "--keep-empty-documents"]
    assert _run(pp, "--input", path, "--output-prefix", tmp_path / "hub", "--tokenizer-model", "periln-test/tiny-bpe",
                *common) == 0
    assert _run(pp, "--input", path, "--output-prefix", tmp_path / "dir", "--tokenizer-model", hf_dir, *common) == 0
    assert_same_bytes(f"{tmp_path}/hub_text_document", f"{tmp_path}/dir_text_document")
    megatron = megatron_core_tokenizer("huggingface", str(hf_dir))
    expect = megatron_reference(str(tmp_path / "ref"), lines, ["text"], megatron.tokenize, megatron.eod,
                                megatron.vocab_size, append_eod=True)
    assert_same_bytes(f"{tmp_path}/hub_text_document", expect["text"])
    capsys.readouterr()

    argv = ["--input", path, "--output-prefix", tmp_path / "x", "--tokenizer-model", "periln-test/not-cached", *common]
    assert _run(pp, *argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "'periln-test/not-cached' is not in the local cache" in err and "HF_HUB_OFFLINE is set" in err, err
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://periln-test.invalid")
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    assert _run(pp, *argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "periln-test.invalid cannot be reached (offline?" in err, err
    assert not list(tmp_path.glob("x_*"))


# ------------------------------------------------------------------------------------ SentencePiece
def test_sentencepiece_sentences_and_partitions(pp, punkt, monkeypatch, tmp_path):
    """SentencePieceTokenizer (segment cache on) with --split-sentences --partitions 2: byte-identical
    with megatron-core's SentencePieceTokenizer as the tokenizer."""
    import sentencepiece as spm

    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(punkt[0])])
    model = tmp_path / "sp"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus.shakespeare_speeches()[2000:4000]),
                                   model_prefix=str(model), vocab_size=500, model_type="bpe", byte_fallback=True,
                                   character_coverage=1.0, minloglevel=2)
    megatron = megatron_core_tokenizer("sentencepiece", f"{model}.model")
    lines = _lines(_docs())
    path = _write(tmp_path / "in.jsonl", lines)
    assert _run(pp, "--input", path, "--output-prefix", tmp_path / "ours", "--tokenizer-type", "SentencePieceTokenizer",
                "--tokenizer-model", f"{model}.model", "--append-eod", "--split-sentences", "--partitions", 2,
                "--workers", 2, "--keep-empty-documents") == 0
    expect = megatron_reference(str(tmp_path / "ref"), lines, ["text"], megatron.tokenize, megatron.eod,
                                megatron.vocab_size, append_eod=True, splitter=reference_splitter(punkt[1], False),
                                partitions=2)
    assert_same_bytes(f"{tmp_path}/ours_text_sentence", expect["text"])


# ------------------------------------------------------------------------------------ flags
def test_tokenizer_flag_combinations(pp, gpt2_files, tmp_path, capsys):
    """GPT2BPETokenizer needs --vocab-file and --merge-file and no --tokenizer-model; the others need
    --tokenizer-model and no vocab/merge files (exit 2); a flag without effect is a warning."""
    vocab, merges = gpt2_files
    path = _write(tmp_path / "in.jsonl", _lines(_docs()[:3]))
    base = ["--input", path, "--output-prefix", tmp_path / "o"]
    for argv, message in [
        (["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab], "needs --vocab-file and --merge-file"),
        (["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab, "--merge-file", merges,
          "--tokenizer-model", vocab], "--tokenizer-model is not for GPT2BPETokenizer"),
        (["--tokenizer-type", "HuggingFaceTokenizer"], "HuggingFaceTokenizer needs --tokenizer-model"),
        (["--tokenizer-type", "TikTokenizer", "--tokenizer-model", vocab, "--merge-file", merges],
         "--merge-file is only for --tokenizer-type GPT2BPETokenizer"),
    ]:
        with pytest.raises(SystemExit) as exc:
            _run(pp, *base, *argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err, argv
    assert _run(pp, *base, "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab, "--merge-file", merges,
                "--keep-newlines", "--keep-sequential-samples", "--workers", 1) == 0
    err = capsys.readouterr().err
    assert "--keep-newlines has no effect without --split-sentences" in err
    assert "--keep-sequential-samples has no effect with one partition" in err
