"""SentencePiece -> tokenizer.json conversion (ernie_export.spm): parity with SentencePiece itself.

Every model option set of tests/spm_fixtures.py is checked: ids from the converted tokenizer
(`add_special_tokens=False`) equal SentencePiece's on a corpus of tricky strings, decoding equals
SentencePiece's, the ERNIE release layout (special tokens inside text, the chat template) matches the
release tokenizer class's behaviour (split on special tokens, SentencePiece on each piece), and
negative controls prove the corpus tells a default-assuming converter apart.

Known differences (pinned by the tests at the end, kept out of the equality corpus):
  * charsmap models only (nmt_nfkc...): tokenizers' `Precompiled` maps text per grapheme cluster, so a
    combining mark after a character the charsmap changes ("Ａ\u0301", NBSP + U+0301) is lost, and a
    cluster of 6+ bytes that SentencePiece maps as a unit (half-width "ｶﾞ") is not composed. CR LF,
    the common case of this, is corrected by the converter. Identity-normalized models are exact.
  * decoding a byte-fallback run that is not valid UTF-8 gives one U+FFFD per byte (SentencePiece keeps
    the valid characters of the run); encoding never produces such runs.
  * `<unk>` decodes to nothing (skip_special_tokens) or "<unk>", not SentencePiece's " ⁇ ".
  * text that literally spells a control piece ("<ctrl>") is that special token, as the release class
    does for its declared special tokens; in BPE models with user-defined symbols, a whole chunk that
    spells a byte piece ("<0x41>") is that piece (tokenizers' `ignore_merges`).
  * unigram: an exact score tie between two segmentations may break the other way (float32 vs float64).
  * decode(skip_special_tokens=False) of a dummy-prefix model keeps a space after each special token;
    the release class drops it (it runs SentencePiece's decode per piece between special tokens).
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb
from tokenizers import Tokenizer, normalizers

from ernie_export.checkpoint.spm import TokenizerConversionError, convert_checkpoint_tokenizer, convert_spm_model
from tests import spm_fixtures as fx

TRICKY = [
    "", " ", "  ", "\t", "\n", "hello", " hello", "hello ", "  hello  world  ", "a  b   c    d", "a \t b",
    "\thello\tworld\t", "line1\nline2\n\nline4\n", "mixed \t \n  spaces", " \n ", "trailing\n", "\n\nlead",
    "\r\n", "a\r\nb", "a\rb", "x \r\n y", "12345", "3.14159", "2025-06-30 14:05", "0", "007", "1,234,567.89",
    "你好，世界！", "百度发布了文心大模型", "東京は大きい", "한국어", "我们正在训练一个小型的分词模型。",
    "Café naïve façade", "Ærøskøbing smörgåsbord", "Zażółć gęślą jaźń", "e\u0301", "ﬁ ligature", "①②③",
    "ＡＢＣ full width", "\u3000ideographic space", "non\u00a0breaking", "zero\u200bwidth", "\ufeffbom",
    "\x00nul", "\x07bell", "\x07", "\u200b", "emoji 😀 🎉 👍🏽 👨\u200d👩\u200d👧", "❤️", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "Ω≈ç√∫",
    "ʕ•ᴥ•ʔ", "def add(a, b):\n    return a + b", "if (x > 0 && y < 10) { return x; }", "<div>&amp;</div>",
    "<tool>search</tool>", "x<tool>y", "  <tool>  ", "@@x@@", "<tool><tool>", "@@@", "▁", "▁▁x", " ▁ ",
    "a ▁ b", "<0x41>x", "The quick brown fox jumps over the lazy dog.", "User: hi\nAssistant: ",
    "Multiple   spaces    between", "   Leading spaces and trailing spaces   ",
]
CORPUS = TRICKY + list(fx.corpus()[:60])
# Where SentencePiece and tokenizers' Precompiled normalizer disagree (charsmap models only).
GRAPHEME_CASES = ["Ａ\u0301", "\u00a0\u0301", "ｶﾞ", "すﾞ"]
CHARSMAP_MODELS = ["bpe_raw", "bpe_prefixed", "unigram_bytes", "bpe_unk"]
# What each fixture claims to be; checked so that the parity tests are never vacuous.
OPTIONS = {
    "bpe_raw": dict(model_type="BPE", byte_fallback=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
                    split_digits=True, name="nmt_nfkc", user_defined=["<tool>", "</tool>", "@@"]),
    "unigram_identity": dict(model_type="UNIGRAM", byte_fallback=False, add_dummy_prefix=True,
                             remove_extra_whitespaces=True, split_digits=False, name="identity", user_defined=[]),
    "bpe_prefixed": dict(model_type="BPE", byte_fallback=True, add_dummy_prefix=True, remove_extra_whitespaces=True,
                         split_digits=False, name="nmt_nfkc", user_defined=[]),
    "bpe_llama_like": dict(model_type="BPE", byte_fallback=True, add_dummy_prefix=True,
                           remove_extra_whitespaces=False, split_digits=True, name="identity",
                           user_defined=["<tool>", "</tool>"]),
    "unigram_bytes": dict(model_type="UNIGRAM", byte_fallback=True, add_dummy_prefix=True,
                          remove_extra_whitespaces=False, split_digits=False, name="nmt_nfkc", user_defined=["<tool>"]),
    "bpe_unk": dict(model_type="BPE", byte_fallback=False, add_dummy_prefix=False, remove_extra_whitespaces=True,
                    split_digits=False, name="nmt_nfkc", user_defined=[]),
    "unigram_moved_ids": dict(model_type="UNIGRAM", byte_fallback=False, add_dummy_prefix=True,
                              remove_extra_whitespaces=True, split_digits=False, name="nmt_nfkc", user_defined=[]),
}


def _proto(data: bytes):
    proto = pb.ModelProto()
    proto.ParseFromString(data)
    return proto


def _ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def _mismatches(tok: Tokenizer, sp, texts) -> list[str]:
    return [t for t in texts if _ids(tok, t) != sp.encode(t)]


@pytest.fixture(scope="module", params=list(fx.MODELS))
def model(request):
    data = fx.MODELS[request.param]()
    return request.param, data, spm.SentencePieceProcessor(model_proto=data), convert_spm_model(data)


def test_fixtures_carry_the_claimed_non_default_options():
    """Guards against vacuous parity: a fixture silently trained with defaults would test nothing."""
    assert set(OPTIONS) == set(fx.MODELS)
    for name, want in OPTIONS.items():
        proto = _proto(fx.MODELS[name]())
        ns, ts = proto.normalizer_spec, proto.trainer_spec
        got = dict(model_type=ts.ModelType.Name(ts.model_type), byte_fallback=ts.byte_fallback,
                   add_dummy_prefix=ns.add_dummy_prefix, remove_extra_whitespaces=ns.remove_extra_whitespaces,
                   split_digits=ts.split_digits, name=ns.name,
                   user_defined=[p.piece for p in proto.pieces if p.type == 4])
        assert got == want, name
        ids = (ts.unk_id, ts.bos_id, ts.eos_id)
        assert [proto.pieces[i].piece for i in ids] == ["<unk>", "<s>", "</s>"], name
        assert ids == ((3, 0, 1) if name == "unigram_moved_ids" else (0, 1, 2)), name


def test_encode_matches_sentencepiece(model):
    """Guards against a converter that assumes SentencePiece defaults (dummy prefix, whitespace collapsing,
    nmt_nfkc, no byte fallback, merging user-defined symbols) instead of reading the model file."""
    name, _, sp, tok = model
    assert _mismatches(tok, sp, CORPUS) == []


def test_decode_matches_sentencepiece(model):
    """Guards against decoding that keeps U+2581, leaves byte-fallback pieces as "<0xNN>", keeps the dummy
    prefix as a leading space, or strips a leading space SentencePiece keeps (no-dummy-prefix models)."""
    name, _, sp, tok = model
    checked = 0
    for text in CORPUS:
        ids = sp.encode(text)
        if sp.unk_id() in ids:  # <unk> renders differently, see test_known_difference_unk_decoding
            continue
        assert tok.decode(ids) == sp.decode(ids), (name, text)
        checked += 1
    assert checked > len(CORPUS) // 2


def test_decode_of_generated_piece_sequences_matches_sentencepiece(model):
    """Guards against decoding that only works for ids that encoding produces: a model may generate any
    sequence, e.g. starting with "▁" pieces (SentencePiece drops the first leading space when
    add_dummy_prefix OR remove_extra_whitespaces is set, and one per leading piece in the latter case)."""
    name, data, sp, tok = model
    pool = [i for i, p in enumerate(_proto(data).pieces) if p.type in (1, 4)]  # normal and user-defined
    emoji = [sp.piece_to_id(f"<0x{b:02X}>") for b in "😀".encode()] if _proto(data).trainer_spec.byte_fallback else []
    rng = random.Random(0)
    for _ in range(500):
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 8))]
        if emoji and rng.random() < 0.3:  # a complete byte-fallback character somewhere
            ids[rng.randrange(len(ids)):0] = emoji
        assert tok.decode(ids) == sp.decode(ids), [sp.id_to_piece(i) for i in ids]


@pytest.mark.parametrize("name", ["bpe_raw", "bpe_llama_like"])
def test_ignore_merges_is_safe_for_every_piece(name):
    """Guards against tokenizers' `ignore_merges` (needed to keep user-defined symbols whole in BPE) emitting a
    piece where SentencePiece's merges would not reach it: every normal piece, spelled as a whole chunk (at the
    start, after a user-defined symbol), must encode as SentencePiece encodes it."""
    data = fx.MODELS[name]()
    sp, tok = spm.SentencePieceProcessor(model_proto=data), convert_spm_model(data)
    texts = []
    for piece in _proto(data).pieces:
        if piece.type == 1:
            text = piece.piece.replace("▁", " ")
            texts += [text, text[1:] if text.startswith(" ") else text, f"<tool>{text}", f"</tool>{text}<tool>"]
    assert _mismatches(tok, sp, texts) == []


def test_byte_fallback_and_split_digits_are_exercised():
    """Guards against a corpus that never reaches byte fallback or digit splitting (the options then go untested)."""
    sp = spm.SentencePieceProcessor(model_proto=fx.train_bpe_raw())
    pieces = sp.encode("emoji 😀 12345", out_type=str)
    assert "<0xF0>" in pieces and ["1", "2", "3", "4", "5"] == [p for p in pieces if p.strip("▁").isdigit()]


def test_tokenizer_json_round_trip(model, tmp_path):
    """Guards against a pipeline that only works in memory: the runtime loads the saved tokenizer.json."""
    name, _, sp, tok = model
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert _mismatches(loaded, sp, CORPUS) == []


def _is_unigram_tie(sp, text: str, ids: list[int]) -> bool:
    """Both segmentations score the same: SentencePiece sums in float32, tokenizers in float64, so an exact
    tie between two unigram segmentations (e.g. "www" as "ww"+"w" or "w"+"ww") may break either way."""
    ref = sp.encode(text)
    return sp.decode(ids) == sp.decode(ref) and abs(sum(map(sp.get_score, ids)) - sum(map(sp.get_score, ref))) < 1e-3


@pytest.mark.parametrize("field", ["add_dummy_prefix", "remove_extra_whitespaces", "escape_whitespaces"])
def test_any_combination_of_whitespace_options_matches(model, field):
    """Guards against a converter that only handles the option combinations of the fixtures: flipping one
    whitespace option of each model must still give SentencePiece's ids and text (unigram ties aside)."""
    name, data, _, _ = model
    flipped = _mutated(data, lambda p: setattr(p.normalizer_spec, field, not getattr(p.normalizer_spec, field)))
    sp, tok = spm.SentencePieceProcessor(model_proto=flipped), convert_spm_model(flipped)
    for text in CORPUS:
        ids = _ids(tok, text)
        assert ids == sp.encode(text) or (name.startswith("unigram") and _is_unigram_tie(sp, text, ids)), text
        if sp.unk_id() not in ids:
            assert tok.decode(ids) == sp.decode(ids), text


def _mutated(data: bytes, edit) -> bytes:
    proto = _proto(data)
    edit(proto)
    return proto.SerializeToString()


def _set(field, value):
    return lambda p: setattr(p.normalizer_spec, field, value)


def _no_user_defined(p):
    for piece in p.pieces:
        if piece.type == 4:
            piece.type = 1


def _charsmap_from(source):
    return lambda p: setattr(p.normalizer_spec, "precompiled_charsmap",
                             _proto(source()).normalizer_spec.precompiled_charsmap)


def _json_edit(tok: Tokenizer, edit) -> Tokenizer:
    spec = json.loads(tok.to_str())
    edit(spec)
    return Tokenizer.from_str(json.dumps(spec))


NEGATIVE = {
    "bpe_raw: assumes add_dummy_prefix": ("bpe_raw", _set("add_dummy_prefix", True)),
    "bpe_raw: assumes remove_extra_whitespaces": ("bpe_raw", _set("remove_extra_whitespaces", True)),
    "bpe_raw: ignores the nmt_nfkc charsmap": ("bpe_raw", _set("precompiled_charsmap", b"")),
    "bpe_raw: treats user-defined symbols as normal pieces": ("bpe_raw", _no_user_defined),
    "unigram_identity: assumes nmt_nfkc": ("unigram_identity", _charsmap_from(fx.train_bpe_raw)),
    "unigram_identity: assumes whitespace is kept": ("unigram_identity", _set("remove_extra_whitespaces", False)),
    "unigram_identity: no dummy prefix": ("unigram_identity", _set("add_dummy_prefix", False)),
    "bpe_prefixed: no dummy prefix": ("bpe_prefixed", _set("add_dummy_prefix", False)),
    "bpe_prefixed: assumes whitespace is kept": ("bpe_prefixed", _set("remove_extra_whitespaces", False)),
    "bpe_llama_like: assumes remove_extra_whitespaces": ("bpe_llama_like", _set("remove_extra_whitespaces", True)),
    "bpe_llama_like: treats user-defined symbols as normal": ("bpe_llama_like", _no_user_defined),
    "unigram_bytes: no dummy prefix": ("unigram_bytes", _set("add_dummy_prefix", False)),
    "bpe_unk: assumes add_dummy_prefix": ("bpe_unk", _set("add_dummy_prefix", True)),
    "bpe_unk: assumes whitespace is kept": ("bpe_unk", _set("remove_extra_whitespaces", False)),
}


@pytest.mark.parametrize("case", list(NEGATIVE))
def test_negative_control_default_assuming_converter_is_caught(case):
    """Guards against a corpus too easy to notice a wrong option: converting the model with one field read
    wrongly (forced to the default, or to what the other fixtures use) must change some ids."""
    name, edit = NEGATIVE[case]
    data = fx.MODELS[name]()
    wrong = convert_spm_model(_mutated(data, edit))
    assert _mismatches(wrong, spm.SentencePieceProcessor(model_proto=data), CORPUS), case


@pytest.mark.parametrize("name", ["bpe_raw", "bpe_prefixed", "bpe_llama_like", "unigram_bytes"])
def test_negative_control_without_byte_fallback_is_caught(name):
    """Guards against dropping byte_fallback: characters outside the vocab would become <unk>."""
    data = fx.MODELS[name]()
    wrong = _json_edit(convert_spm_model(data), lambda spec: spec["model"].update(byte_fallback=False))
    assert _mismatches(wrong, spm.SentencePieceProcessor(model_proto=data), CORPUS)


def test_negative_control_assumed_unk_id_is_caught():
    """Guards against assuming <unk> is id 0: unknown characters would get the wrong id."""
    data = fx.train_unigram_moved_ids()
    wrong = _json_edit(convert_spm_model(data), lambda spec: spec["model"].update(unk_id=0))
    assert _mismatches(wrong, spm.SentencePieceProcessor(model_proto=data), CORPUS)


def test_negative_control_bpe_merges_by_vocab_order_is_caught():
    """Guards against ranking BPE merges by anything but SentencePiece's piece scores (here: reversed)."""
    data = fx.train_bpe_prefixed()
    wrong = _json_edit(convert_spm_model(data), lambda spec: spec["model"]["merges"].reverse())
    assert _mismatches(wrong, spm.SentencePieceProcessor(model_proto=data), CORPUS)


# ---- the ERNIE release layout: tokenizer.model + tokenizer_config.json + added_tokens.json + special_tokens_map.json

CHAT = [
    f"{fx.CLS}User: hi\nAssistant: ",
    f"{fx.CLS}You are helpful.\nUser: 你好，世界！\nAssistant: 你好{fx.SEP}User: 2+2=?\nAssistant: ",
    f"{fx.CLS}User:   spaced   out  \nAssistant: ok{fx.SEP}",
]
WITH_SPECIALS = CHAT + [
    "<s>hello</s>", "  <s>  x  </s>  ", "a<|begin_of_sentence|>b", f"{fx.MASKS[0]}{fx.MASKS[1]}", "<unk>",
    f"x{fx.MASKS[3]}y 😀{fx.SEP}\n", f"{fx.SEP}{fx.SEP}", "<mask:0", "<mask:9>", "<|begin_of_sentence|",
    f"<tool>{fx.MASKS[2]}</tool>", f"{fx.CLS} leading space", f"tab\t{fx.CLS}\tnewline\n{fx.SEP}\n",
]


def _declared(ckpt) -> dict[str, int]:
    added = json.loads((ckpt / "added_tokens.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
    return {"<unk>": sp.unk_id(), "<s>": sp.bos_id(), "</s>": sp.eos_id(), **added}


def release_reference(sp, text: str, specials: dict[str, int]) -> list[int]:
    """What the release's Ernie4_5_Tokenizer does: split on special tokens (longest first), SentencePiece between."""
    pattern = "(" + "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) + ")"
    ids: list[int] = []
    for part in re.split(pattern, text):
        ids += [specials[part]] if part in specials else sp.encode(part)
    return ids


@pytest.fixture(scope="module", params=list(fx.MODELS))
def ernie_ckpt(request, tmp_path_factory):
    data = fx.MODELS[request.param]()
    ckpt = fx.write_ernie_checkpoint(tmp_path_factory.mktemp("ckpt") / request.param, data)
    return ckpt, spm.SentencePieceProcessor(model_proto=data), convert_checkpoint_tokenizer(ckpt)


def test_checkpoint_special_tokens_have_their_ids_and_are_special(ernie_ckpt):
    """Guards against special tokens renumbered, added as normal text, or given ids the model never saw."""
    ckpt, sp, tok = ernie_ckpt
    decoder = tok.get_added_tokens_decoder()
    for token, token_id in _declared(ckpt).items():
        assert tok.token_to_id(token) == token_id, token
        assert decoder[token_id].content == token and decoder[token_id].special, token
        assert _ids(tok, token) == [token_id], token
    assert tok.get_vocab_size(with_added_tokens=True) == sp.get_piece_size() + len(fx.ernie_added_tokens(0))


def test_checkpoint_text_with_special_tokens_matches_release_class(ernie_ckpt):
    """Guards against special tokens split into pieces, normalized, or glued to the neighbouring text, and
    against a dummy prefix added once per text instead of once per piece between special tokens."""
    ckpt, sp, tok = ernie_ckpt
    declared = _declared(ckpt)
    for text in WITH_SPECIALS + CORPUS:
        if "<ctrl>" in text or "<pad>" in text:  # undeclared control pieces, see test_literal_control_piece_text
            continue
        assert _ids(tok, text) == release_reference(sp, text, declared), text


def test_chat_template_prompt_encodes_like_release(ernie_ckpt):
    """Guards against the rendered ERNIE prompt (the published template, rendered by the runtime) encoding
    differently from the release tokenizer."""
    from ernie_export.checkpoint.synthetic import CHAT_TEMPLATE
    from runtime.generate.text import compile_template

    ckpt, sp, tok = ernie_ckpt
    template = compile_template(CHAT_TEMPLATE)
    prompt = template.render(messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert prompt == "<|begin_of_sentence|>User: hi\nAssistant: "
    assert _ids(tok, prompt) == [_declared(ckpt)[fx.CLS]] + sp.encode("User: hi\nAssistant: ")
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好  world"},
            {"role": "assistant", "content": " 12 apples 😀"}, {"role": "user", "content": "\tand <tool>?"}]
    prompt = template.render(messages=chat, add_generation_prompt=True, cls_token=fx.CLS, sep_token=fx.SEP)
    assert _ids(tok, prompt) == release_reference(sp, prompt, _declared(ckpt))


def test_checkpoint_decode_skips_special_tokens(ernie_ckpt):
    """Guards against special tokens leaking into decoded text (skip_special_tokens, as the runtime decodes)."""
    ckpt, sp, tok = ernie_ckpt
    declared = _declared(ckpt)
    for text in CHAT:
        ids = release_reference(sp, text, declared)
        assert tok.decode(ids) == sp.decode([i for i in ids if i not in declared.values()]), text


# ---- errors

@pytest.mark.parametrize("content", [b"not a sentencepiece model", b"", bytes(range(256)) * 4, "truncated"])
def test_corrupt_model_raises_one_line_error(tmp_path, content):
    """Guards against a corrupt tokenizer.model crashing deep inside protobuf/tokenizers or exporting garbage."""
    if content == "truncated":
        content = fx.train_bpe_raw()[:2000]
    (tmp_path / "tokenizer.model").write_bytes(content)
    with pytest.raises(TokenizerConversionError) as e:
        convert_checkpoint_tokenizer(tmp_path)
    assert "\n" not in str(e.value) and "tokenizer.model" in str(e.value) and "tokenizer.json" in str(e.value)


def _piece(index: int, **fields):
    return lambda p: [setattr(p.pieces[index], k, v) for k, v in fields.items()]


UNSUPPORTED = {
    "CHAR model": (fx.train_bpe_llama_like, lambda p: setattr(p.trainer_spec, "model_type", pb.TrainerSpec.CHAR)),
    "WORD model": (fx.train_bpe_llama_like, lambda p: setattr(p.trainer_spec, "model_type", pb.TrainerSpec.WORD)),
    "treat_whitespace_as_suffix": (fx.train_bpe_llama_like,
                                   lambda p: setattr(p.trainer_spec, "treat_whitespace_as_suffix", True)),
    "denormalizer": (fx.train_bpe_raw, lambda p: p.denormalizer_spec.MergeFrom(p.normalizer_spec)),
    "UNUSED pieces": (fx.train_bpe_llama_like, _piece(-1, type=5)),
    "user-defined symbols the normalizer changes": (fx.train_bpe_raw, _piece(6, piece="ＡＢ")),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_model_raises(tmp_path, case):
    """Guards against converting what tokenizer.json cannot reproduce (a CHAR/WORD model read as BPE, suffix
    whitespace, a denormalizer, UNUSED pieces, normalizer-changed symbols) into silently different ids."""
    source, edit = UNSUPPORTED[case]
    (tmp_path / "tokenizer.model").write_bytes(_mutated(source(), edit))
    with pytest.raises(TokenizerConversionError, match=re.escape(case)) as e:
        convert_checkpoint_tokenizer(tmp_path)
    assert "\n" not in str(e.value) and "ship a tokenizer.json" in str(e.value)


def test_declared_token_flags_and_missing_ids(tmp_path):
    """Guards against dropping added_tokens_decoder flags (special=False, rstrip) or failing on a special
    token that the config names without an id (it takes the next free id, as the release class does)."""
    data = fx.train_bpe_llama_like()
    size = spm.SentencePieceProcessor(model_proto=data).get_piece_size()
    fx.write_ernie_checkpoint(tmp_path, data)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"][str(size + 5)].update(special=False, rstrip=True)  # <mask:3>
    config["eos_token"] = "<|the_end|>"  # declared nowhere else
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = convert_checkpoint_tokenizer(tmp_path)
    mask3 = tok.get_added_tokens_decoder()[size + 5]
    assert (mask3.content, mask3.special, mask3.rstrip) == ("<mask:3>", False, True)
    assert tok.token_to_id("<|the_end|>") == size + 6
    sp = spm.SentencePieceProcessor(model_proto=data)
    assert _ids(tok, "a<mask:3>   b<|the_end|>") == sp.encode("a") + [size + 5] + sp.encode("b") + [size + 6]


@pytest.mark.parametrize("name", ["tokenizer_config.json", "added_tokens.json", "special_tokens_map.json"])
def test_unreadable_config_file_raises(tmp_path, name):
    """Guards against a broken config file being ignored (special tokens would silently become text)."""
    fx.write_ernie_checkpoint(tmp_path, fx.train_bpe_llama_like())
    (tmp_path / name).write_text("{not json")
    with pytest.raises(TokenizerConversionError, match=re.escape(name)) as e:
        convert_checkpoint_tokenizer(tmp_path)
    assert "\n" not in str(e.value)


def test_conflicting_or_gapped_added_token_ids_raise(tmp_path):
    """Guards against tokenizer.json silently renumbering added tokens the model was trained with."""
    data = fx.train_bpe_llama_like()
    size = spm.SentencePieceProcessor(model_proto=data).get_piece_size()
    for added, what in [({fx.CLS: size + 1}, "next free id"), ({fx.CLS: 5}, "uses for"), ({"<s>": 7}, "id 1")]:
        fx.write_ernie_checkpoint(tmp_path, data)
        (tmp_path / "added_tokens.json").write_text(json.dumps(added))
        config = json.loads((tmp_path / "tokenizer_config.json").read_text())
        config.pop("added_tokens_decoder")
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
        with pytest.raises(TokenizerConversionError, match=what):
            convert_checkpoint_tokenizer(tmp_path)


def test_export_side_does_not_import_transformers():
    """Guards against the converter pulling in transformers (a test-only dependency) or torch."""
    code = ("import sys, ernie_export.checkpoint.spm\n"
            "sys.exit(any(m.split('.')[0] in ('transformers', 'torch') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1]).returncode == 0


def test_conversion_of_a_100k_vocabulary_is_fast():
    """Guards against merge generation or validation that would stall on ERNIE's ~100k-piece vocabulary."""
    proto = _proto(fx.train_bpe_llama_like())
    low = min(p.score for p in proto.pieces)
    for i in range(100_000):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = f"▁{i:x}zq", low - 1 - i, 1
    start = time.perf_counter()
    tok = convert_spm_model(proto.SerializeToString())
    assert time.perf_counter() - start < 10.0
    assert tok.get_vocab_size() == len(proto.pieces)


# ---- known differences, pinned: if one of these starts failing, the difference is gone; move the strings
# ---- into the equality corpus above.

@pytest.mark.parametrize("name", CHARSMAP_MODELS)
def test_known_difference_precompiled_grapheme_clusters(name):
    """Documents tokenizers' per-grapheme `Precompiled`: these strings normalize differently from SentencePiece."""
    data = fx.MODELS[name]()
    sp, tok = spm.SentencePieceProcessor(model_proto=data), convert_spm_model(data)
    assert set(_mismatches(tok, sp, GRAPHEME_CASES)) == set(GRAPHEME_CASES)


def test_identity_models_have_no_grapheme_difference():
    """Guards the claim that identity-normalized models (no charsmap) are exact on those strings too."""
    for name in ("unigram_identity", "bpe_llama_like"):
        data = fx.MODELS[name]()
        assert _mismatches(convert_spm_model(data), spm.SentencePieceProcessor(model_proto=data), GRAPHEME_CASES) == []


def test_crlf_workaround_is_needed_and_works():
    """Guards against dropping the CR LF fix: Precompiled alone maps "\\r\\n" (one grapheme) to one space."""
    data = fx.train_bpe_raw()
    charsmap = _proto(data).normalizer_spec.precompiled_charsmap
    assert normalizers.Precompiled(charsmap).normalize_str("\r\n") == " "
    sp = spm.SentencePieceProcessor(model_proto=data)
    assert sp.normalize("a\r\nb") == "a▁▁b"
    assert _ids(convert_spm_model(data), "a\r\nb") == sp.encode("a\r\nb")


def test_known_difference_invalid_byte_run_decoding():
    """Documents: a byte-fallback run that is not valid UTF-8 decodes to one U+FFFD per byte here, while
    SentencePiece keeps the valid characters (only id sequences that encoding never produces)."""
    data = fx.train_bpe_llama_like()
    sp, tok = spm.SentencePieceProcessor(model_proto=data), convert_spm_model(data)
    ids = [sp.piece_to_id(p) for p in ["<0xE4>", "<0xBD>", "<0xA0>", "<0xE5>"]]  # "你" + a truncated character
    assert sp.decode(ids) == "你\ufffd"
    assert tok.decode(ids) == "\ufffd" * 4
    assert tok.decode(ids[:3]) == sp.decode(ids[:3]) == "你"


def test_known_difference_unigram_float_ties():
    """Documents: an exact score tie between unigram segmentations can break differently (float32 vs float64)."""
    data = _mutated(fx.train_unigram_identity(), lambda p: setattr(p.normalizer_spec, "add_dummy_prefix", False))
    sp, tok = spm.SentencePieceProcessor(model_proto=data), convert_spm_model(data)
    text = "Emails, URLs like https://www.example.org/path?q=1&lang=en, and hashtags #nlp."
    ids = _ids(tok, text)
    if ids == sp.encode(text):
        pytest.skip("this sentencepiece/tokenizers pair breaks the tie the same way")
    assert _is_unigram_tie(sp, text, ids)


def test_known_difference_decode_keeping_special_tokens():
    """Documents: with skip_special_tokens=False the piece after a special token keeps its dummy-prefix
    space; the release class decodes each piece between special tokens separately and drops it."""
    data = fx.train_bpe_llama_like()
    sp, tok = spm.SentencePieceProcessor(model_proto=data), convert_spm_model(data)
    ids = [sp.bos_id()] + sp.encode("User: hi")
    release = "<s>" + sp.decode(ids[1:])
    assert release == "<s>User: hi" and tok.decode(ids, skip_special_tokens=False) == "<s> User: hi"
    assert tok.decode(ids) == sp.decode(ids) == "User: hi"


def test_known_difference_unk_decoding():
    """Documents: <unk> is a special token here (dropped by skip_special_tokens, as the release class does);
    SentencePiece renders it as " ⁇ "."""
    data = fx.train_unigram_identity()
    sp, tok = spm.SentencePieceProcessor(model_proto=data), convert_spm_model(data)
    ids = sp.encode("a 😀 b")
    assert _ids(tok, "a 😀 b") == ids and sp.unk_id() in ids
    assert sp.decode(ids) == "a  ⁇  b" and tok.decode(ids) == "a  b"


def test_known_difference_literal_control_piece_text():
    """Documents: text spelling a control piece is that special token here; SentencePiece spells it out."""
    data = fx.train_bpe_prefixed()
    sp, tok = spm.SentencePieceProcessor(model_proto=data), convert_spm_model(data)
    assert _ids(tok, "<ctrl>") == [sp.piece_to_id("<ctrl>")] != sp.encode("<ctrl>")
    assert tok.decode(_ids(tok, "a <ctrl> b")) == sp.decode(sp.encode("a b"))


def test_known_difference_byte_piece_text_with_ignore_merges():
    """Documents: in a BPE model with user-defined symbols (ignore_merges), a chunk that is exactly "<0x41>"
    is the byte piece; in unigram models and elsewhere in text it is spelled out as SentencePiece does."""
    data = fx.train_bpe_raw()
    sp, tok = spm.SentencePieceProcessor(model_proto=data), convert_spm_model(data)
    assert _ids(tok, "<0x41>") == [sp.piece_to_id("<0x41>")] != sp.encode("<0x41>")
    assert _ids(tok, "x<0x41>") == sp.encode("x<0x41>")
    data = fx.train_unigram_bytes()
    assert _ids(convert_spm_model(data), "<0x41>") == spm.SentencePieceProcessor(model_proto=data).encode("<0x41>")
