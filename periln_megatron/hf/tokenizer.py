"""Tokenizer files for an HF export: a SentencePiece .model becomes a fast tokenizer (tokenizer.json
built with `tokenizers` from the model's own pieces, merges and normalizer settings, checked id
for id against SentencePiece); a tiktoken encoding (a .tiktoken file, or Megatron's .json
vocabulary) becomes a byte-level BPE tokenizer.json with the encoding's split pattern and special
tokens at their ids, checked id for id against tiktoken; a Hugging Face tokenizer is carried over
as it is."""

from __future__ import annotations

import re
import struct
from pathlib import Path

from periln_megatron.config.choices import SENTENCEPIECE_TYPES
from periln_megatron.data.tokenizers.protobuf import fields, last_values

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
PROBES = ("Hello world", "  leading and  double  spaces ", "tabs\tand\nnewlines\n\nx", "ÉtÉ café naïve",
          "中文 测试 😀", "<unk> <s> </s> literally", "1234567 3.14159", "a\u00a0b\u3000c", "", " ", "\u2581x \u2581\u2581")


class TokenizerExportError(ValueError):
    pass


def read_spm(path: str | Path) -> dict:
    """Pieces (piece, score, type) plus the trainer/normalizer settings that decide encoding."""
    pieces, trainer, normalizer = [], {}, {}
    for field, _, value in fields(Path(path).read_bytes()):
        if field == 1:
            p = {1: b"", 2: struct.pack("<f", 0.0), 3: NORMAL}
            p.update(last_values(value))
            pieces.append((p[1].decode("utf-8"), struct.unpack("<f", p[2])[0], p[3]))
        elif field == 2:
            trainer = last_values(value)
        elif field == 3:
            normalizer = last_values(value)
    return {
        "pieces": pieces,
        "model_type": trainer.get(3, 1),  # 1 unigram, 2 bpe
        "byte_fallback": bool(trainer.get(35, 0)),
        "treat_whitespace_as_suffix": bool(trainer.get(24, 0)),
        "precompiled_charsmap": normalizer.get(2, b""),
        "add_dummy_prefix": bool(normalizer.get(3, 1)),
        "remove_extra_whitespaces": bool(normalizer.get(4, 1)),
        "escape_whitespaces": bool(normalizer.get(5, 1)),
    }


def build_fast_from_spm(model_path: str | Path):
    """A `tokenizers.Tokenizer` that encodes like SentencePiece (no BOS/EOS added, as megatron's
    SentencePieceTokenizer encodes documents)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    spm = read_spm(model_path)
    if spm["treat_whitespace_as_suffix"]:
        raise TokenizerExportError(f"{model_path}: treat_whitespace_as_suffix is not supported")
    pieces = spm["pieces"]
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    unk = next((i for i, (_, _, t) in enumerate(pieces) if t == UNKNOWN), None)
    unknown = []
    if spm["model_type"] == 2:
        from transformers.tokenization_utils_base import generate_merges

        # SentencePiece BPE merges the pair whose result scores highest; scores fall with the id
        scores = {p: s for p, s, t in pieces if t in (NORMAL, USER_DEFINED)}
        model = models.BPE(vocab=vocab, merges=generate_merges(vocab, scores), unk_token=pieces[unk][0] if unk is not None else None,
                           fuse_unk=True, byte_fallback=spm["byte_fallback"], dropout=None)
    elif spm["model_type"] == 1:
        # SentencePiece never matches control/unknown/unused pieces ("<s>", "<unk>") in text; a
        # Unigram lattice would. A score below any normal segmentation stops that, except where
        # the alternative needs an unknown character, whose penalty is lower still: those
        # characters are isolated before the model (exact, as no normal piece holds them).
        never = min(s for _, s, t in pieces if t == NORMAL) - 1e6
        known = {p for p, _, t in pieces if t in (NORMAL, USER_DEFINED) and len(p) == 1}
        unknown = sorted({c for p, _, t in pieces if t in (UNKNOWN, CONTROL, UNUSED) for c in p} - known)
        model = models.Unigram([(p, s if t in (NORMAL, USER_DEFINED, BYTE) else never) for p, s, t in pieces],
                               unk_id=unk, byte_fallback=spm["byte_fallback"])
    else:
        raise TokenizerExportError(f"{model_path}: SentencePiece model type {spm['model_type']} (word/char) is not supported")
    tok = Tokenizer(model)
    steps = []
    if spm["precompiled_charsmap"]:
        steps.append(normalizers.Precompiled(spm["precompiled_charsmap"]))
    if spm["remove_extra_whitespaces"]:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if spm["add_dummy_prefix"]:
        steps.append(normalizers.Prepend(" "))
    if spm["escape_whitespaces"]:
        steps.append(normalizers.Replace(" ", "\u2581"))
        if spm["remove_extra_whitespaces"]:  # SentencePiece drops trailing U+2581s, literal ones included
            steps.append(normalizers.Replace(Regex("\u2581+\\z"), ""))
    tok.normalizer = normalizers.Sequence(steps)
    # Pieces never span a word boundary when no piece holds "\u2581" after its first character:
    # then splitting at "\u2581" first is exact, and keeps BPE's work per word.
    if spm["model_type"] == 2 and not any("\u2581" in p[1:] for p, _, t in pieces if t == NORMAL):
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)
    elif spm["model_type"] == 1 and unknown:
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("|".join(re.escape(c) for c in unknown)), behavior="isolated")
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spm["add_dummy_prefix"]:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)
    # user-defined symbols are always one piece (SentencePiece matches them in text);
    # control symbols (<s>, </s>, ...) are never produced from text, so they are not added tokens
    user = [AddedToken(p, normalized=False, special=False) for p, _, t in pieces if t == USER_DEFINED]
    if user:
        tok.add_tokens(user)
    return tok, spm


def _special_tokens(pieces) -> dict:
    names = {}
    for i, (p, _, t) in enumerate(pieces):
        if t == UNKNOWN:
            names.setdefault("unk_token", p)
        elif t == CONTROL and p in ("<s>", "<bos>", "<|begin_of_text|>"):
            names.setdefault("bos_token", p)
        elif t == CONTROL and p in ("</s>", "<eos>", "<|endoftext|>", "<eod>", "<EOD>"):
            names.setdefault("eos_token", p)
        elif t == CONTROL and p in ("<pad>", "<PAD>"):
            names.setdefault("pad_token", p)
    return names


def export_sentencepiece(model_path: str | Path, out_dir: Path, max_length: int) -> dict:
    import sentencepiece
    from transformers import PreTrainedTokenizerFast

    tok, spm = build_fast_from_spm(model_path)
    special = _special_tokens(spm["pieces"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, clean_up_tokenization_spaces=False,
                                   split_special_tokens=True, **special)
    fast.save_pretrained(str(out_dir))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
    check_ids(sp, PreTrainedTokenizerFast.from_pretrained(str(out_dir)), PROBES, str(model_path))
    return {f"{k[:-6]}_token_id": sp.piece_to_id(v) for k, v in special.items() if k != "unk_token"}


def check_ids(sp, fast, texts, name: str, source: str = "SentencePiece", add_special_tokens: bool = False) -> None:
    """``fast`` must give ``sp.encode(text)`` for every text (``add_special_tokens=True``: also when
    called as ``fast(text)``, i.e. the export adds no BOS/EOS of its own)."""
    for text in texts:
        want, got = sp.encode(text), fast(text, add_special_tokens=add_special_tokens)["input_ids"]
        if want != got:
            at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
            raise TokenizerExportError(
                f"{name}: the converted fast tokenizer disagrees with {source} on {text[:80]!r} at token {at}: "
                f"{want[at:at + 5]} vs {got[at:at + 5]}")


# ------------------------------------------------------------------------------------- tiktoken
TIKTOKEN_PROBES = PROBES + (
    "Don't you'LL see? WE'VE SAID it's 'd 'M done", "trailing spaces   ", "  \n\n  \t x  \n", "x\r\ny\r\n\r\nz",
    "12345678901 a1b22c333 0.5e-10", "\u03c0\u03bf\u03bb\u03cd \u0435\u043b\u043b\u0438\u043d "
    "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8 \u65e5\u672c\u8a9e",
    "\U0001f44d\U0001f3fd \U0001f468\u200d\U0001f469\u200d\U0001f467 e\u0301",
    "\x00\x01\x7f tab\t\tend", "def f(x):\n    return x  # comment\n\n\n", "http://example.com/a/b?c=d&e=f",
    "<|endoftext|> <|fim_prefix|>x<|fim_middle|> <|endofprompt|> <s> </s> <unk> <pad> <SPECIAL_7>",
    "<|endoftext|>", " <|endoftext|>\n")


def _byte_encoder() -> dict[int, str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def tiktoken_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level vocabulary and BPE merges that encode as tiktoken does (as transformers'
    TikTokenConverter builds them): every split of a token into two tokens is a merge, ranked by the
    rank of their concatenation, so the lowest-rank pair merges first, as in tiktoken."""
    enc = _byte_encoder()
    table = [enc[b] for b in range(256)]

    def text(b: bytes) -> str:
        return "".join(table[c] for c in b)

    vocab, merges = {}, []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[text(token)] = rank
        local = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        local.sort(key=lambda lr: (ranks[lr[0]], ranks[lr[1]]))
        merges += [(text(l), text(r)) for l, r in local]
    return vocab, merges


def onig_pattern(pattern: str) -> str:
    """tiktoken's split pattern (Rust regex/fancy-regex syntax) for `tokenizers`' Oniguruma (Ruby
    syntax), which reads ``X{m,n}+`` not as a possessive count but as ``(?:X{m,n})+`` (so cl100k's
    ``\\p{N}{1,3}+`` would take any run of digits): such counts become atomic groups, ``(?>X{m,n})``,
    which is what possessive means. ``?+``, ``*+`` and ``++`` are possessive in both."""
    atom = r"(\\[pP]\{[^}]*\}|\\.|\[(?:\\.|[^\]\\])*\]|\((?:\\.|[^()\\])*\)|[^\\])"
    return re.sub(atom + r"(\{\d+(?:,\d*)?\})\+", r"(?>\1\2)", pattern)


def build_fast_from_tiktoken(enc):
    """A `tokenizers.Tokenizer` equivalent to a ``tiktoken.Encoding``'s ``encode_ordinary`` (the
    encoding's split pattern, then byte-level BPE), its special tokens at their ids (added tokens
    that live in the model's vocabulary, so ids with gaps, as cl100k's, are kept)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    ranks, specials, pattern = enc._mergeable_ranks, enc._special_tokens, enc._pat_str
    if len(ranks) < 256 or any(bytes([b]) not in ranks for b in range(256)):
        raise TokenizerExportError(f"{enc.name}: not a byte-level BPE (some of the 256 single bytes have no rank)")
    try:
        split = Regex(onig_pattern(pattern))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception
        raise TokenizerExportError(f"{enc.name}: the split pattern {pattern!r} is not one Oniguruma (tokenizers) "
                                   f"can compile: {exc}") from exc
    vocab, merges = tiktoken_vocab_and_merges(ranks)
    if len(vocab) != len(ranks) or len(set(vocab.values())) != len(vocab):
        raise TokenizerExportError(f"{enc.name}: ranks are not one distinct id per token")
    ids = set(vocab.values())
    for token, tid in specials.items():
        if token in vocab:
            raise TokenizerExportError(f"{enc.name}: special token {token!r} is also an ordinary token")
        if tid in ids:
            raise TokenizerExportError(f"{enc.name}: special token {token!r} has id {tid}, which another token has")
        vocab[token] = tid
        ids.add(tid)
    model = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=True)  # whole pieces first, as tiktoken
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(split, behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in sorted(specials, key=specials.get)])
    return tok


def export_tiktoken(path: str | Path, out_dir: Path, max_length: int) -> dict:
    """The fast tokenizer of a TikTokenizer file, as periln_megatron.data.tokenizers loads it: a file named
    after an OpenAI encoding keeps that encoding's pattern and special tokens, another name the cl100k
    pattern and <|endoftext|> after the last rank; Megatron's .json vocabulary its 1000 special
    tokens and pattern. eos (and bos, which is never added: Megatron's preprocessing adds none, and
    the token before every training document is the end-of-document) = the end-of-document token."""
    import json

    from transformers import PreTrainedTokenizerFast

    from periln_megatron.data.tokenizers import load_tokenizer

    tik = load_tokenizer("TikTokenizer", str(path))
    enc = tik.enc
    eod = next((t for t, i in enc._special_tokens.items() if i == tik.eod_id), None)
    if eod is None:
        raise TokenizerExportError(f"{path}: the end-of-document id {tik.eod_id} is not a special token")
    tok = build_fast_from_tiktoken(enc)
    special = {"bos_token": eod, "eos_token": eod}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, clean_up_tokenization_spaces=False,
                                   split_special_tokens=True, **special)
    fast.save_pretrained(str(out_dir))
    (Path(out_dir) / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")  # for transformers 4
    check_tiktoken(tik, PreTrainedTokenizerFast.from_pretrained(str(out_dir)), TIKTOKEN_PROBES, str(path))
    return {"bos_token_id": tik.eod_id, "eos_token_id": tik.eod_id}


def check_tiktoken(tik, fast, texts, name: str) -> None:
    """Ids as tiktoken's (ordinary text; nothing added by ``fast(text)``), the same text back from
    ``decode``, every special token at its tiktoken id and eos/bos the end-of-document."""
    check_ids(tik, fast, texts, name, source="tiktoken", add_special_tokens=True)
    for text in texts:
        ids = tik.encode(text)
        if fast.decode(ids) != tik.decode(ids):
            raise TokenizerExportError(f"{name}: decoding {text[:80]!r} differs from tiktoken's")
    for token, tid in tik.enc._special_tokens.items():
        if fast.convert_tokens_to_ids(token) != tid or fast.decode([tid]) != token:
            raise TokenizerExportError(f"{name}: special token {token!r} is not id {tid} in the converted tokenizer")
    if fast.eos_token_id != tik.eod_id or fast.bos_token_id != tik.eod_id:
        raise TokenizerExportError(f"{name}: eos/bos ids {fast.eos_token_id}/{fast.bos_token_id}, "
                                   f"expected the end-of-document {tik.eod_id}")


def export_huggingface(path: str | Path, out_dir: Path) -> dict:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p = Path(path)
    tok = (PreTrainedTokenizerFast(tokenizer_file=str(p)) if p.is_file() and p.suffix == ".json"
           else AutoTokenizer.from_pretrained(str(p), local_files_only=True))
    tok.save_pretrained(str(out_dir))
    return {k: getattr(tok, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if getattr(tok, k) is not None}


def export_tokenizer(tokenizer_type: str | None, path: str | None, out_dir: Path, max_length: int,
                     origin: str = "recipe tokenizer.model") -> dict:
    """Write the tokenizer files into out_dir; return the special token ids for config.json.
    `origin` names where `path` came from in messages (a flag or recipe key)."""
    if not tokenizer_type:
        return {}
    if not path or not Path(path).exists():
        raise TokenizerExportError(f"tokenizer file {path!r} ({origin}) not found; pass --tokenizer PATH "
                                   "or --skip-tokenizer")
    export = {**dict.fromkeys(SENTENCEPIECE_TYPES, export_sentencepiece), "TikTokenizer": export_tiktoken,
              "HuggingFaceTokenizer": lambda p, out, _: export_huggingface(p, out)}.get(tokenizer_type)
    if export is None:
        raise TokenizerExportError(f"tokenizer type {tokenizer_type} cannot be exported as a Hugging Face tokenizer; "
                                   "convert it separately and pass --skip-tokenizer")
    try:
        return export(path, out_dir, max_length)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file: name it and its flag, whatever raised
        text = str(e).removeprefix(f"{path}: ")
        if not isinstance(e, TokenizerExportError):
            text = f"cannot read it as a {tokenizer_type} file ({type(e).__name__}: {text})"
        raise TokenizerExportError(f"{path} ({origin}): {text}") from e
