"""Small SentencePiece models trained at test time, and an ERNIE-release-like checkpoint directory.

In:  nothing from the network: an in-repo corpus (English, CJK, accented Latin, digits, code).
Out: `tokenizer.model` bytes for several NON-default option sets (`train_*`) and
     `write_ernie_checkpoint`, a directory laid out like the original ERNIE 4.5 0.3B release:
     tokenizer.model + tokenizer_config.json (Ernie4_5_Tokenizer, auto_map) + added_tokens.json +
     special_tokens_map.json, with no tokenizer.json.

Every model uses ERNIE's `<unk>`, `<s>`, `</s>` as unk/bos/eos pieces, at ERNIE's ids 0, 1, 2 except in
`train_unigram_moved_ids`, which moves them to prove that no id is assumed.
"""

from __future__ import annotations

import io
import json
import os
from functools import lru_cache
from pathlib import Path

_BASE = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you doing today?",
    "Tokenizers split text into pieces; models read the ids.",
    "She sells sea shells by the sea shore, and the shells are real.",
    "In 1969, Apollo 11 landed on the Moon after 102 hours of flight.",
    "Version 2.13.0 was released on 2025-06-30 at 14:05 UTC.",
    "The total is $1,234.56, including 7.5% tax and a 20 EUR fee.",
    "Call me at +1 (555) 010-9999 or write to test@example.com.",
    "Large language models are trained on trillions of tokens.",
    "Please translate the following sentence into French.",
    "User: what is the capital of France?",
    "Assistant: The capital of France is Paris.",
    "User: write a haiku about autumn leaves.",
    "Assistant: Red leaves drift and fall, the cold wind carries them home, quiet evening light.",
    "Café, naïve, façade, résumé, jalapeño, über, smörgåsbord, Ærøskøbing.",
    "Ça va très bien, merci ! Où est la gare ? À demain.",
    "Der Bär läuft über die Straße und ißt süße Äpfel.",
    "El niño comió piña y mañana irá a la montaña.",
    "São Paulo é a maior cidade do Brasil, não é?",
    "Zażółć gęślą jaźń. Čeština, slovenčina, hrvatski.",
    "Ελληνικά: καλημέρα κόσμε. Русский: привет, мир.",
    "你好，世界！今天天气很好。",
    "我们正在训练一个小型的分词模型。",
    "百度发布了文心大模型，它可以回答问题、写作和翻译。",
    "北京是中国的首都，上海是最大的城市。",
    "人工智能正在改变我们的生活和工作方式。",
    "这个模型有三亿个参数，支持中文和英文。",
    "日本語のテキストも少し含まれています。東京は大きい。",
    "ひらがなとカタカナ、そして漢字を使います。",
    "한국어 문장도 조금 있습니다. 감사합니다.",
    "def add(a, b):\n    return a + b",
    "for i in range(10):\n    print(i * i)",
    "if (x > 0 && y < 10) { return x + y; }",
    "import numpy as np; x = np.zeros((3, 4), dtype=np.float32)",
    "const map = new Map<string, number>(); map.set('a', 1);",
    "SELECT name, age FROM users WHERE age >= 18 ORDER BY name;",
    "git commit -m \"fix: handle empty input\" && git push origin main",
    "<div class=\"note\">Hello &amp; welcome</div>",
    "{\"role\": \"user\", \"content\": \"hi\"}",
    "x = [1, 2, 3]  # a list of three numbers",
    "The answer is 42. The year 2024 had 366 days.",
    "Pi is approximately 3.14159265358979 and e is 2.71828.",
    "Room 101, floor 7, building 3; postcode 10115 Berlin.",
    "We met at 09:30, then again at 17:45 on 12/03/2021.",
    "<tool>search</tool> returns results; <tool>calc</tool> computes 12 * 34.",
    "Use @@ to join pieces, like in old BPE vocabularies.",
    "Tabs\tand\tnewlines\nappear in real documents too.",
    "Multiple   spaces    between     words are common in scraped text.",
    "   Leading spaces and trailing spaces   ",
    "Emails, URLs like https://www.example.org/path?q=1&lang=en, and hashtags #nlp.",
]

_WORDS = ("model token piece vocabulary merge score text space digit number byte fallback unicode "
          "normalizer prefix suffix sentence corpus train encode decode export runtime graph weight").split()
_CJK = "模型词表训练编码解码文本空格数字字节回退规范化前缀句子语料导出运行图权重"


@lru_cache(maxsize=1)
def corpus() -> tuple[str, ...]:
    """A few hundred deterministic training lines (no randomness, no network)."""
    lines = list(_BASE)
    for i in range(120):
        w = _WORDS[i % len(_WORDS)]
        v = _WORDS[(i * 7 + 3) % len(_WORDS)]
        lines.append(f"The {w} number {i * 37 % 1000} has {v} {i} and costs {i * 3.25:.2f}.")
        lines.append(f"{_CJK[i % len(_CJK)]}{_CJK[(i * 5 + 1) % len(_CJK)]}{_CJK[(i * 3 + 2) % len(_CJK)]}"
                     f"的{w}是{i}个，{v}有{i * 11}种。")
        if i % 3 == 0:
            lines.append(f"def f_{w}(x{i}):\n    return x{i} * {i} + {i % 7}  # {v}")
    return tuple(lines)


def _train(**options) -> bytes:
    buf = io.BytesIO()
    base = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
                num_threads=1, hard_vocab_limit=False, character_coverage=0.995)
    base.update(options)
    import sentencepiece as spm

    with open(os.devnull, "w") as sink:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_writer=buf, logstream=sink, **base)
    return buf.getvalue()


@lru_cache(maxsize=None)
def train_bpe_raw() -> bytes:
    """(a) BPE, byte fallback, NO dummy prefix, whitespace kept, digits split, user-defined symbols, nmt_nfkc."""
    return _train(model_type="bpe", vocab_size=1500, byte_fallback=True, add_dummy_prefix=False,
                  remove_extra_whitespaces=False, split_digits=True, normalization_rule_name="nmt_nfkc",
                  user_defined_symbols=["<tool>", "</tool>", "@@"], pad_id=3, pad_piece="<pad>")


@lru_cache(maxsize=None)
def train_unigram_identity() -> bytes:
    """(b) unigram, defaults-ish (dummy prefix, extra whitespace removed, no byte fallback), identity normalizer."""
    return _train(model_type="unigram", vocab_size=1000, normalization_rule_name="identity")


@lru_cache(maxsize=None)
def train_bpe_prefixed() -> bytes:
    """(c) BPE with dummy prefix, extra whitespace removed, byte fallback, nmt_nfkc, a control symbol."""
    return _train(model_type="bpe", vocab_size=1200, byte_fallback=True, add_dummy_prefix=True,
                  remove_extra_whitespaces=True, normalization_rule_name="nmt_nfkc", control_symbols=["<ctrl>"])


@lru_cache(maxsize=None)
def train_bpe_llama_like() -> bytes:
    """(d) the Llama-style layout: BPE, identity, dummy prefix, whitespace kept, byte fallback, split digits."""
    return _train(model_type="bpe", vocab_size=1300, byte_fallback=True, add_dummy_prefix=True,
                  remove_extra_whitespaces=False, split_digits=True, normalization_rule_name="identity",
                  user_defined_symbols=["<tool>", "</tool>"])


@lru_cache(maxsize=None)
def train_unigram_bytes() -> bytes:
    """(e) unigram with byte fallback, nmt_nfkc, dummy prefix, whitespace kept, a user-defined symbol."""
    return _train(model_type="unigram", vocab_size=1000, byte_fallback=True, add_dummy_prefix=True,
                  remove_extra_whitespaces=False, normalization_rule_name="nmt_nfkc", user_defined_symbols=["<tool>"])


@lru_cache(maxsize=None)
def train_bpe_unk() -> bytes:
    """(f) BPE without byte fallback (unknown characters -> fused <unk>), nmt_nfkc, extra whitespace removed
    but NO dummy prefix, a pad piece."""
    return _train(model_type="bpe", vocab_size=1000, byte_fallback=False, add_dummy_prefix=False, pad_id=3,
                  pad_piece="<pad>")


@lru_cache(maxsize=None)
def train_unigram_moved_ids() -> bytes:
    """(g) unigram whose special pieces sit at other ids (bos 0, eos 1, pad 2, unk 3): nothing may assume 0/1/2."""
    return _train(model_type="unigram", vocab_size=900, unk_id=3, bos_id=0, eos_id=1, pad_id=2, pad_piece="<pad>")


MODELS = {
    "bpe_raw": train_bpe_raw,
    "unigram_identity": train_unigram_identity,
    "bpe_prefixed": train_bpe_prefixed,
    "bpe_llama_like": train_bpe_llama_like,
    "unigram_bytes": train_unigram_bytes,
    "bpe_unk": train_bpe_unk,
    "unigram_moved_ids": train_unigram_moved_ids,
}

CLS, SEP = "<|begin_of_sentence|>", "<|end_of_sentence|>"
MASKS = [f"<mask:{i}>" for i in range(4)]


def ernie_added_tokens(vocab_size: int) -> dict[str, int]:
    """added_tokens.json as in the release: token -> id, continuing after the SentencePiece vocab."""
    return {tok: vocab_size + i for i, tok in enumerate([CLS, SEP, *MASKS])}


def write_ernie_checkpoint(directory: Path, model: bytes) -> Path:
    """A checkpoint-like directory mimicking the original ERNIE 4.5 0.3B tokenizer files (no tokenizer.json)."""
    import sentencepiece as spm

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(model)
    sp = spm.SentencePieceProcessor(model_proto=model)
    added = ernie_added_tokens(sp.get_piece_size())
    in_model = {"<unk>": sp.unk_id(), "<s>": sp.bos_id(), "</s>": sp.eos_id()}  # listed too, at their model ids

    def tok(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                "special": True}

    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
                "cls_token": CLS, "sep_token": SEP, "mask_token": MASKS[1]}
    config = {
        "tokenizer_class": "Ernie4_5_Tokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_ernie4_5.Ernie4_5_Tokenizer", None]},
        "added_tokens_decoder": {str(i): tok(t) for t, i in sorted({**in_model, **added}.items(), key=lambda x: x[1])},
        "additional_special_tokens": [MASKS[0], *MASKS[2:]],
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "padding_side": "left",
        "header_start_token": MASKS[2],
        "header_end_token": MASKS[3],
        **specials,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (directory / "added_tokens.json").write_text(json.dumps(added, indent=2, ensure_ascii=False))
    smap = {k: tok(v) for k, v in specials.items()}
    smap["additional_special_tokens"] = [MASKS[0], *MASKS[2:]]
    (directory / "special_tokens_map.json").write_text(json.dumps(smap, indent=2, ensure_ascii=False))
    return directory
