"""The checkpoint's text side, read and checked before any tracing starts.

In:  a checkpoint directory: tokenizer.json (or, as the original ERNIE 4.5 release ships it, only a
     SentencePiece tokenizer.model, converted by spm.py), tokenizer_config.json, chat_template.jinja,
     generation_config.json (each optional but the tokenizer); the model config.
Out: `TextFiles` (the tokenizer, the chat template or None, the generation defaults, notes for the
     export log on any default replaced), and
     `write_text_files()` that puts tokenizer.json, chat_template.jinja and generation.json into
     the artifact and returns their manifest roles. A broken or wrong-typed file is one
     `ConfigError` naming the file and the field, raised before minutes of tracing are spent.

generation.json is the one place the runtime takes its sampling defaults from (`Options.from_artifact`);
token ids (EOS, pad, bos) go to the manifest's `tokens` section, the contract every driver reads;
values absent from the checkpoint get the defaults written here, and the runtime's own rules
(`SamplingParams.validate`) check them at export time already. A max_new_tokens of 0 or less (which
would make every request without its own limit an error) is replaced by the default, with a note.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from runtime.core.errors import OptionError
from runtime.generate.sampling import SamplingParams

from ernie_export.checkpoint.config import ConfigError, ErnieConfig
from ernie_export.checkpoint.spm import TokenizerConversionError, convert_checkpoint_tokenizer

SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "cls_token", "sep_token")
DEFAULT_MAX_NEW_TOKENS = 256  # generation.json's max_new_tokens when the checkpoint names no usable one


@dataclass
class TextFiles:
    tokenizer_json: str  # the tokenizer.json text: the checkpoint's own, or converted from tokenizer.model
    template: str | None
    generation: dict  # what generation.json holds: sampling defaults, special token strings, why each EOS
    tokens: dict  # the manifest's `tokens` section: eos / pad / bos ids and how to encode
    tokenizer_origin: str  # "tokenizer.json" | "tokenizer.model (converted)"
    notes: tuple[str, ...] = ()  # for the export log: checkpoint defaults replaced, and by what


def _json_object(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"the checkpoint's {path.name} is not valid JSON ({e}); re-download the checkpoint") from None
    if not isinstance(data, dict):
        raise ConfigError(f"the checkpoint's {path.name} must hold a JSON object; re-download the checkpoint")
    return data


def _number(gen: dict, key: str, default, kind: type):
    value = gen.get(key)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise ConfigError(f"generation_config.json field {key} must be {'an integer' if kind is int else 'a number'}, "
                          f"got {value!r}; fix the checkpoint's generation_config.json")
    return kind(value)


def _token(tok_cfg: dict, key: str) -> str | None:
    value = tok_cfg.get(key)
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def _eos(gen: dict, cfg: ErnieConfig, tok_cfg: dict, vocab: dict[str, int]) -> dict[str, str]:
    """Every id that ends generation, with why: generation_config.json, config.json, and the
    tokenizer's eos and sep tokens (ERNIE's chat template ends each assistant turn with sep_token,
    so a reply is over when the model emits it)."""
    reasons: dict[int, list[str]] = {}
    for source, value in (("generation_config.json eos_token_id", gen.get("eos_token_id")),
                          ("config.json eos_token_id", cfg.eos_token_id)):
        for i in value if isinstance(value, list) else [] if value is None else [value]:
            if type(i) is not int:
                raise ConfigError(f"{source} must be token ids, got {value!r}")
            reasons.setdefault(i, []).append(source)
    why = {"eos_token": "tokenizer eos_token", "sep_token": "tokenizer sep_token: the chat template ends every "
           "assistant turn with it"}
    for key, text in why.items():
        if _token(tok_cfg, key) in vocab:
            reasons.setdefault(vocab[_token(tok_cfg, key)], []).append(text)
    return {str(i): "; ".join(r) for i, r in sorted(reasons.items())}


def _tokens(gen: dict, cfg: ErnieConfig, tok_cfg: dict, vocab: dict[str, int]) -> dict:
    """The manifest's `tokens` section: the ids a driver needs, in one place."""
    tokens = {
        "eos_token_ids": [int(i) for i in _eos(gen, cfg, tok_cfg, vocab)],
        "pad_token_id": gen.get("pad_token_id", cfg.pad_token_id if cfg.pad_token_id is not None else 0),
        "bos_token_id": gen.get("bos_token_id", cfg.bos_token_id),
        "add_bos_token": bool(tok_cfg.get("add_bos_token", False)),
        "add_special_tokens": False,  # encode without the tokenizer's post-processor; add bos only if add_bos_token
    }
    for key in ("bos_token_id", "pad_token_id"):
        if tokens[key] is not None and type(tokens[key]) is not int:
            raise ConfigError(f"generation_config.json field {key} must be a token id, got {tokens[key]!r}")
    tokens["pad_token_id"] = tokens["pad_token_id"] or 0
    return tokens


def _max_new_tokens(gen: dict) -> tuple[int, tuple[str, ...]]:
    """The checkpoint's max_new_tokens, else the default: where it names none, or names one that generates
    nothing (0 or negative; every request without its own limit would be refused) - then with a note."""
    value = _number(gen, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS, int)
    if value >= 1:
        return value, ()
    return DEFAULT_MAX_NEW_TOKENS, (f"generation_config.json max_new_tokens is {value}, which generates nothing; "
                                    f"generation.json gets {DEFAULT_MAX_NEW_TOKENS} instead (the default when it "
                                    "names none)",)


def _defaults(gen: dict, cfg: ErnieConfig, tok_cfg: dict, vocab: dict[str, int]) -> tuple[dict, tuple[str, ...]]:
    """generation.json's content, and notes on the checkpoint defaults it replaced."""
    max_new_tokens, notes = _max_new_tokens(gen)
    defaults = {
        "eos_token_reasons": _eos(gen, cfg, tok_cfg, vocab),
        "do_sample": bool(gen.get("do_sample", False)),
        "temperature": _number(gen, "temperature", 1.0, float),
        "top_p": _number(gen, "top_p", 1.0, float),
        # transformers' GenerationConfig default when the file names none (ERNIE 4.5's does not): sampling
        # with the artifact's defaults then matches transformers' generate() on the same checkpoint
        "top_k": _number(gen, "top_k", 50, int),
        "repetition_penalty": _number(gen, "repetition_penalty", 1.0, float),
        "max_new_tokens": max_new_tokens,
        "special_tokens": {k: _token(tok_cfg, k) for k in SPECIAL_KEYS if _token(tok_cfg, k) is not None},
    }
    try:
        SamplingParams(defaults["do_sample"], defaults["temperature"], defaults["top_k"], defaults["top_p"],
                       defaults["repetition_penalty"]).validate()
    except OptionError as e:
        raise ConfigError(f"generation_config.json: {e}; fix the checkpoint's generation_config.json") from None
    return defaults, notes


def _tokenizer_json(ckpt: Path) -> tuple[str, str]:
    """The checkpoint's tokenizer.json text, else its SentencePiece model converted faithfully."""
    if (ckpt / "tokenizer.json").is_file():
        return (ckpt / "tokenizer.json").read_text(encoding="utf-8"), "tokenizer.json"
    if (ckpt / "tokenizer.model").is_file():
        try:
            return convert_checkpoint_tokenizer(ckpt).to_str(pretty=True), "tokenizer.model (converted)"
        except TokenizerConversionError as e:
            raise ConfigError(str(e)) from None
    raise ConfigError(f"{ckpt} has neither tokenizer.json nor tokenizer.model: the artifact needs the tokenizer; "
                      "add the checkpoint's tokenizer.json (or its SentencePiece tokenizer.model)")


def read_text_files(ckpt: Path, cfg: ErnieConfig) -> TextFiles:
    """Read and check the checkpoint's tokenizer, chat template and generation defaults."""
    tok_cfg = _json_object(ckpt / "tokenizer_config.json")
    gen = _json_object(ckpt / "generation_config.json")
    text, origin = _tokenizer_json(ckpt)
    try:
        vocab = Tokenizer.from_str(text).get_vocab(with_added_tokens=True)
    except Exception as e:  # tokenizers raises its own Exception type on any malformed file
        raise ConfigError(f"the checkpoint's tokenizer.json cannot be loaded ({str(e)[:200]}); re-download it") from None
    template = tok_cfg.get("chat_template")
    if template is None and (ckpt / "chat_template.jinja").is_file():
        template = (ckpt / "chat_template.jinja").read_text(encoding="utf-8")
    if template is not None and not isinstance(template, str):
        raise ConfigError("tokenizer_config.json chat_template must be a string (named templates are not supported)")
    defaults, notes = _defaults(gen, cfg, tok_cfg, vocab)
    return TextFiles(text, template, defaults, _tokens(gen, cfg, tok_cfg, vocab), origin, notes)


def write_text_files(files: TextFiles, directory: Path) -> dict[str, str]:
    """Write the text side into the artifact; returns manifest roles -> file names."""
    (directory / "tokenizer.json").write_text(files.tokenizer_json, encoding="utf-8")
    roles = {"tokenizer": "tokenizer.json", "generation": "generation.json"}
    if files.template is not None:
        (directory / "chat_template.jinja").write_text(files.template, encoding="utf-8")
        roles["chat_template"] = "chat_template.jinja"
    (directory / "generation.json").write_text(json.dumps(files.generation, indent=2))
    return roles
