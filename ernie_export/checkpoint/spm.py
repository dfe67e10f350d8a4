"""SentencePiece checkpoint tokenizer -> Hugging Face `tokenizers.Tokenizer` (saved as tokenizer.json).

In:  a checkpoint directory with `tokenizer.model` (a SentencePiece ModelProto, BPE or unigram) and
     whichever of tokenizer_config.json, special_tokens_map.json, added_tokens.json exist: the layout
     of the original ERNIE 4.5 release (`Ernie4_5_Tokenizer` remote code, no tokenizer.json).
Out: `convert_checkpoint_tokenizer(ckpt)`: a `tokenizers.Tokenizer` whose `encode(text,
     add_special_tokens=False)` gives the release class's ids (text split on its special tokens,
     SentencePiece on each piece) and whose `decode` gives SentencePiece's text; `convert_spm_model`
     does a bare model. What it cannot reproduce raises `TokenizerConversionError` (one line).

Approach and why: `tokenizers.implementations`' SentencePiece classes assume the defaults (prefix
always, spaces collapsed, no byte fallback for BPE), so they are not faithful; transformers'
`SpmConverter.build_tokenizer_from_spm_proto` reads the model's own fields and is followed here,
re-implemented because the export side must not import transformers. The model is parsed with
`sentencepiece_model_pb2` and validated by `SentencePieceProcessor`. Every stage comes from the file:
  normalizer  charsmap (`Precompiled`; none for identity) with a CR LF fix, extra-whitespace removal
              (spaces only), U+2581 escaping, dummy prefix as `Prepend` (placed so that, as in
              SentencePiece, it goes on any non-empty input, or on what is left after stripping);
  model       BPE: merges for every split of a normal piece into two, ranked by the merged piece's
              score; user-defined symbols isolated by a `Split` pre-tokenizer and emitted whole
              (`ignore_merges`). Unigram: piece scores, SentencePiece's user-defined bonus, byte and
              control pieces unreachable from text;
  decoder     U+2581 -> space, byte fallback -> UTF-8, the leading space dropped as SentencePiece does;
  special     unk and control pieces and every token the config files declare are special added
              tokens (matched whole before normalization, never split), with their ids.
Known differences (per-grapheme charsmap quirks, invalid byte runs, unk rendering, unigram float
ties) are pinned by tests/test_spm.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE, Unigram
from runtime.core.errors import SourceProblem

META = "\u2581"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNREACHABLE = -1e9  # unigram score that no segmentation of real text ever prefers
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TokenizerConversionError(SourceProblem, ValueError):
    """The SentencePiece tokenizer cannot be converted faithfully."""


def _fail(msg: str):
    raise TokenizerConversionError(" ".join(msg.split()))


def load_model_proto(data: bytes, where: str = "tokenizer.model"):
    """Parse and validate a SentencePiece model; TokenizerConversionError if it is unreadable."""
    try:
        import sentencepiece
        from google.protobuf.message import DecodeError
        from sentencepiece import sentencepiece_model_pb2 as pb
    except Exception as e:  # missing, or protobuf older than the generated sentencepiece_model_pb2 needs
        _fail(f"reading {where} needs sentencepiece and a matching protobuf ({type(e).__name__}: {e}); "
              f"install the export extra")

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(data)
        sentencepiece.SentencePieceProcessor().LoadFromSerializedProto(data)  # SentencePiece's own checks
    except (DecodeError, RuntimeError, OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        _fail(f"{where} is not a readable SentencePiece model ({reason}); re-download it or ship a tokenizer.json")
    return proto


def _check_supported(proto, user_defined: list[str]) -> None:
    ts, charsmap = proto.trainer_spec, proto.normalizer_spec.precompiled_charsmap
    kind = ts.ModelType.Name(ts.model_type)
    changed = [u for u in user_defined if charsmap and normalizers.Precompiled(charsmap).normalize_str(u) != u]
    for bad, what in [(kind not in ("BPE", "UNIGRAM"), f"is a {kind} model (only BPE and UNIGRAM convert)"),
                      (ts.treat_whitespace_as_suffix, "uses treat_whitespace_as_suffix"),
                      (proto.denormalizer_spec.precompiled_charsmap, "has a denormalizer"),
                      (any(p.type == UNUSED for p in proto.pieces), "has UNUSED pieces"),
                      (changed, f"has user-defined symbols the normalizer changes ({changed[:3]})")]:
        if bad:
            _fail(f"tokenizer.model {what}, which tokenizer.json cannot reproduce; ship a tokenizer.json")


def _normalizer(proto):
    ns, steps = proto.normalizer_spec, []
    space, charsmap = META if ns.escape_whitespaces else " ", ns.precompiled_charsmap
    if charsmap:
        pre = normalizers.Precompiled(charsmap)
        # Precompiled maps a whole grapheme by its shortest mapped prefix, so CR LF (one grapheme)
        # would lose the LF; SentencePiece maps CR and LF one by one.
        crlf = pre.normalize_str("\r") + pre.normalize_str("\n")
        if pre.normalize_str("\r\n") != crlf:
            steps.append(normalizers.Replace("\r\n", crlf))
    if ns.add_dummy_prefix and not ns.remove_extra_whitespaces:
        steps.append(normalizers.Prepend(space))  # SentencePiece prefixes any non-empty input
    if charsmap:
        steps.append(normalizers.Precompiled(charsmap))
    if ns.remove_extra_whitespaces:  # spaces only: tabs and newlines stay unless the charsmap maps them;
        trailing = "[ \u2581]" if ns.escape_whitespaces else " "  # at the end, a literal U+2581 goes too
        steps += [normalizers.Replace(Regex(rf"\A +|{trailing}+\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if ns.escape_whitespaces:
        steps.append(normalizers.Replace(" ", META))
    if ns.add_dummy_prefix and ns.remove_extra_whitespaces:
        steps.append(normalizers.Prepend(space))  # only when something is left after stripping
    return normalizers.Sequence(steps)


def _bpe(proto, user_defined: list[str]):
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == NORMAL}
    ranked = []
    for piece, (score, i) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, i, left, right))
    merges = [(left, right) for _, _, left, right in sorted(ranked)]
    ts = proto.trainer_spec  # ignore_merges: a word that is a whole piece (a user-defined symbol) stays whole
    return BPE(vocab=vocab, merges=merges, unk_token=proto.pieces[ts.unk_id].piece, fuse_unk=True,
               byte_fallback=ts.byte_fallback, ignore_merges=bool(user_defined))


def _unigram(proto):
    max_score = max((p.score for p in proto.pieces if p.type == NORMAL), default=0.0)

    def score(p) -> float:
        if p.type == NORMAL:
            return p.score
        if p.type == USER_DEFINED:  # SentencePiece's bonus so that the symbol is always taken whole
            return len(p.piece) * max_score - 0.1
        return UNREACHABLE  # unk, control, byte: SentencePiece never matches these in text

    return Unigram([(p.piece, score(p)) for p in proto.pieces], unk_id=proto.trainer_spec.unk_id,
                   byte_fallback=proto.trainer_spec.byte_fallback)


def _decoder(proto):
    ns = proto.normalizer_spec
    steps = [decoders.Replace(META, " ")]  # SentencePiece does so even without escape_whitespaces
    if proto.trainer_spec.byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    if ns.escape_whitespaces and (ns.add_dummy_prefix or ns.remove_extra_whitespaces):
        # SentencePiece drops the first piece's leading U+2581; while whitespace is removed, that of every
        # leading piece (none of which holds two, as such models never learn "▁▁")
        steps.append(decoders.Strip(content=" ", left=1 << 20 if ns.remove_extra_whitespaces else 1, right=0))
    return decoders.Sequence(steps)


def convert_model_proto(proto) -> Tokenizer:
    """A `tokenizers.Tokenizer` encoding like SentencePiece with this (parsed) model."""
    ns = proto.normalizer_spec
    user_defined = [p.piece for p in proto.pieces if p.type == USER_DEFINED]
    _check_supported(proto, user_defined)
    is_bpe = proto.trainer_spec.model_type == proto.trainer_spec.BPE
    tok = Tokenizer(_bpe(proto, user_defined) if is_bpe else _unigram(proto))
    tok.normalizer = _normalizer(proto)
    if user_defined and is_bpe:
        escaped = [u.replace(" ", META) if ns.escape_whitespaces else u for u in user_defined]
        pattern = "|".join(re.escape(u) for u in sorted(escaped, key=len, reverse=True))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.decoder = _decoder(proto)
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                            for p in proto.pieces if p.type in (UNKNOWN, CONTROL)])
    return tok


def convert_spm_model(data: bytes, where: str = "tokenizer.model") -> Tokenizer:
    """Convert the bytes of a SentencePiece model (no config files, no added tokens)."""
    return convert_model_proto(load_model_proto(data, where))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        _fail(f"{path.name} is not valid JSON ({e}); fix or remove it")
    if not isinstance(data, dict):
        _fail(f"{path.name} is not a JSON object; fix or remove it")
    return data


def _content(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def declared_tokens(ckpt: Path) -> dict[str, dict]:
    """content -> {"id": int | None, "special": bool, flags} from the config files, in declaration order."""
    config = _read_json(ckpt / "tokenizer_config.json")
    smap = _read_json(ckpt / "special_tokens_map.json")
    out: dict[str, dict] = {}

    def declare(content, token_id=None, **flags):
        if content is None:
            return
        entry = out.setdefault(content, {"id": None, "special": True})
        if token_id is not None:
            if not str(token_id).isdigit() or entry["id"] not in (None, int(token_id)):
                _fail(f"{content!r} is given the ids {entry['id']} and {token_id!r} by the tokenizer config "
                      f"files; make them agree")
            entry["id"] = int(token_id)
        entry.update(flags)

    for token_id, spec in sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0])):
        flags = {k: bool(spec[k]) for k in ("special", "lstrip", "rstrip", "single_word") if k in spec}
        declare(_content(spec), token_id, **flags)
    for token, token_id in _read_json(ckpt / "added_tokens.json").items():
        declare(token, token_id)
    for source in (config, smap):
        for key in SPECIAL_KEYS:
            declare(_content(source.get(key)))
        for extra in source.get("additional_special_tokens") or []:
            declare(_content(extra))
    return out


def _add_declared(tok: Tokenizer, proto, declared: dict[str, dict]) -> None:
    """Pieces keep their model ids; new tokens follow the vocab in id order (undeclared ids last, in order)."""
    piece_ids = {p.piece: i for i, p in enumerate(proto.pieces)}
    for content, entry in declared.items():
        want, have = entry["id"], piece_ids.get(content)
        if want is not None and have is not None and want != have:
            _fail(f"{content!r} is id {have} in tokenizer.model but {want} in the config files; make them agree")
        if want is not None and have is None and want < len(proto.pieces):
            _fail(f"{content!r} is given id {want}, which tokenizer.model uses for {proto.pieces[want].piece!r}; "
                  f"fix added_tokens.json")
    new = [c for c in declared if c not in piece_ids]
    for content in sorted(new, key=lambda c: (declared[c]["id"] is None, declared[c]["id"] or 0)):  # stable
        want, free = declared[content]["id"], tok.get_vocab_size(with_added_tokens=True)
        if want not in (None, free):
            _fail(f"added token {content!r} has id {want} but the next free id is {free}; tokenizer.json cannot "
                  f"leave gaps, fix added_tokens.json")
        _add(tok, content, declared[content])
    for content in declared:
        if content in piece_ids:
            _add(tok, content, declared[content])


def _add(tok: Tokenizer, content: str, entry: dict) -> None:
    token = AddedToken(content, special=entry.get("special", True), normalized=False,
                       lstrip=entry.get("lstrip", False), rstrip=entry.get("rstrip", False),
                       single_word=entry.get("single_word", False))
    (tok.add_special_tokens if token.special else tok.add_tokens)([token])


def convert_checkpoint_tokenizer(ckpt: Path) -> Tokenizer:
    """`ckpt/tokenizer.model` plus its config files -> an equivalent `tokenizers.Tokenizer`."""
    ckpt = Path(ckpt)
    path = ckpt / "tokenizer.model"
    try:
        data = path.read_bytes()
    except OSError as e:
        _fail(f"cannot read {path} ({e.strerror}); add the checkpoint's tokenizer.model or tokenizer.json")
    proto = load_model_proto(data, str(path))
    tok = convert_model_proto(proto)
    _add_declared(tok, proto, declared_tokens(ckpt))
    return tok
