"""Checkpoints as they are really published, and fixtures that can catch bugs.

- The original ERNIE 4.5 release ships a SentencePiece `tokenizer.model` and no tokenizer.json: the
  export converts it (ernie_export/spm.py; its parity is tests/test_spm.py) and the artifact works.
- Chat template sources: tokenizer_config.json, else chat_template.jinja, else none (and --chat says so).
- The tiny fixture is discriminative, and deliberately broken drivers (wrong positions, a cache not
  grown, a mask off by one) fail the generation-parity comparison: the negative controls.
- Its noise is readable: `make demo`'s text and interactive chat's sampled replies are visible text;
  the same weights with only the old row scaling (every tokenizer id kept) are the negative control.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from ernie_export.build import export_artifact
from ernie_export.checkpoint.synthetic import INIT_STD, random_weights, save_weights, train_tokenizer, write_checkpoint
from runtime.generate import api as G
from runtime.core import step as S
from runtime.generate.cli import main as cli_main
from runtime.generate.sampling import SamplingParams
from tests import spm_fixtures as fx
from tests.helpers import demo_args, eager_greedy, our_model, readable

QUIET = dict(log=lambda m: None)
GREEDY = G.Options(max_new_tokens=32, sampling=SamplingParams(), ignore_eos=True)
PROMPTS = ["Hello world", "The capital of France is", "def hello(name):"]
# The varied-output guard also tries what a user types first (issue 31: "Hello" alone gave `herher...`, 4 ids in 32).
GUARD_PROMPTS = PROMPTS + ["Hello", "你好", "Once upon a time", "a"]


@pytest.fixture(scope="module")
def spm_model() -> bytes:
    """A SentencePiece BPE small enough for the tiny model's 512 ids, with non-default options."""
    import io
    import os

    import sentencepiece as spm

    latin = [line for line in fx.corpus() if all(ord(c) < 0x250 for c in line)]  # CJK/emoji: byte fallback
    buf = io.BytesIO()
    with open(os.devnull, "w") as sink:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(latin), model_writer=buf, logstream=sink, model_type="bpe", vocab_size=420,
            byte_fallback=True, add_dummy_prefix=False, remove_extra_whitespaces=False, hard_vocab_limit=False,
            normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1)
    return buf.getvalue()


@pytest.fixture(scope="module")
def release_ckpt(tmp_path_factory, spm_model):
    """The original release layout: ernie.* names, fused projections, tokenizer.model only."""
    ckpt = write_checkpoint(tmp_path_factory.mktemp("release") / "ckpt", "tiny", layout="original")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (ckpt / name).unlink()
    return fx.write_ernie_checkpoint(ckpt, spm_model)


def test_sentencepiece_only_checkpoint_exports_and_generates(release_ckpt, spm_model, tmp_path, capsys):
    import sentencepiece as spm
    from tokenizers import Tokenizer

    out = tmp_path / "art"
    export_artifact(str(release_ckpt), out, **QUIET)
    assert json.loads((out / "parity.json").read_text())["status"] == "passed"
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    sp = spm.SentencePieceProcessor(model_proto=spm_model)
    for text in ["Hello  world\t!", " leading and trailing ", "数字 12345 café 🙂"]:
        assert tok.encode(text, add_special_tokens=False).ids == sp.encode(text)
    sep = json.loads((release_ckpt / "added_tokens.json").read_text())[fx.SEP]
    assert tok.encode(f"hi{fx.SEP}", add_special_tokens=False).ids[-1] == sep, "special tokens are matched whole"
    generation = json.loads((out / "generation.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert sep in manifest["tokens"]["eos_token_ids"] and "chat template" in generation["eos_token_reasons"][str(sep)]
    assert cli_main(["--model", str(out), "--prompt", "Hello world", "--max-new-tokens", "4", "--greedy"]) == 0
    code = cli_main(["--model", str(out), "--prompt", "Hello", "--chat"])
    err = capsys.readouterr().err
    assert code == 2 and "--chat: this artifact has no chat template" in err, "the release's files carry none here"


def test_chat_template_from_jinja_file_when_config_has_none(release_ckpt, tmp_path, capsys):
    from ernie_export.checkpoint.synthetic import CHAT_TEMPLATE

    ckpt = tmp_path / "ckpt"
    shutil.copytree(release_ckpt, ckpt)
    (ckpt / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    export_artifact(str(ckpt), tmp_path / "art", run_verify=False, **QUIET)
    assert (tmp_path / "art" / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    assert cli_main(["--model", str(tmp_path / "art"), "--prompt", "Hi", "--chat", "--max-new-tokens", "2"]) == 0


def test_checkpoint_without_any_tokenizer_is_one_line(tiny_ckpt, tmp_path, capsys):
    from ernie_export.__main__ import main as export_main

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    (ckpt / "tokenizer.json").unlink()
    assert export_main(["--model", str(ckpt), "--out", str(tmp_path / "art")]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "has neither tokenizer.json nor tokenizer.model" in err[-1]
    assert not any(ln.startswith("error") for ln in err[:-1])


# ---- fixtures that can catch bugs -------------------------------------------------------------------

@pytest.fixture(scope="module")
def gen(tiny_artifact):
    return G.load(tiny_artifact, "cpu")


@pytest.fixture(scope="module")
def references(gen, tiny_ckpt):
    model = our_model(tiny_ckpt)
    prompts = [G.encode_prompt(gen, p) for p in PROMPTS]
    return prompts, [eager_greedy(model, p, 32) for p in prompts]


def test_fixture_greedy_output_is_varied(gen, references):
    """Guard: a fixture whose greedy output repeats a token cannot tell right positions from wrong."""
    prompts, expected = references
    assert [r.token_ids for r in G.generate(gen, prompts, GREEDY)] == expected
    for text in GUARD_PROMPTS:
        [r] = G.generate(gen, [G.encode_prompt(gen, text)], GREEDY)
        assert len(set(r.token_ids)) >= 8, f"{text!r}: only {len(set(r.token_ids))} distinct ids in 32: the fixture is too weak"


def _wrong_positions(self, tokens, cache):
    mask = np.concatenate([cache.mask, np.ones((len(tokens), 1), np.int64)], axis=1)
    return self.decode(tokens.reshape(-1, 1), mask, cache.next_positions() - 1, cache)


def _cache_not_grown(self, tokens, cache, _first={}):
    """Feeds every step against the prompt's cache, as a driver that drops the presents would."""
    key = id(self)
    if _first.get(key) is None or _first[key].mask.shape[0] != len(tokens) or cache.length <= _first[key].length:
        _first[key] = cache
    base = _first[key]
    mask = np.concatenate([base.mask, np.ones((len(tokens), 1), np.int64)], axis=1)
    logits, _ = self.decode(tokens.reshape(-1, 1), mask, cache.next_positions(), base)
    return logits, S.KVCache(cache.values, np.concatenate([cache.mask, mask[:, -1:]], axis=1))


def _mask_off_by_one(self, tokens, cache):
    mask = np.concatenate([cache.mask, np.ones((len(tokens), 1), np.int64)], axis=1)
    shifted = np.concatenate([mask[:, 1:], np.zeros((len(tokens), 1), np.int64)], axis=1)  # hides the new token
    logits, new = self.decode(tokens.reshape(-1, 1), shifted, cache.next_positions(), cache)
    return logits, S.KVCache(new.values, mask)


@pytest.mark.parametrize("broken", [_wrong_positions, _cache_not_grown, _mask_off_by_one])
def test_negative_control_broken_driver_fails_generation_parity(gen, references, monkeypatch, broken):
    """Each deliberately wrong driver must change greedy tokens: proof the parity test can fail."""
    prompts, expected = references
    monkeypatch.setattr(S.Model, "advance", broken)
    got = [r.token_ids for r in G.generate(gen, prompts, GREEDY)]
    assert got != expected
    assert sum(g != e for g, e in zip(got, expected)) >= 2, "caught on most prompts, not by luck"


def test_multibyte_stream_guard_sees_a_split_character(gen):
    """The UTF-8 streaming test is only meaningful if some token boundary splits a character."""
    from runtime.generate.text import StreamText

    text = "你好，世界！ Größe 🙂🚀 done"
    ids = gen.text.encode(text)
    assert any(gen.text.decode(ids[:k]).endswith("\ufffd") for k in range(1, len(ids))), "no split occurred"
    stream = StreamText(gen.text, [])
    chunks = [stream.push(t) for t in ids] + [stream.flush()]
    assert "".join(chunks) == text and not any("\ufffd" in c for c in chunks)


def test_json_says_which_token_stopped_a_row(gen, tiny_artifact, capsys):
    prompts = [G.encode_prompt(gen, p) for p in PROMPTS[:2]]
    free = G.generate(gen, prompts, GREEDY)
    eos = free[0].token_ids[3]
    stopped = G.generate(replace(gen, eos_ids=frozenset({eos})), prompts, replace(GREEDY, ignore_eos=False))
    assert stopped[0].finish_reason == "eos" and stopped[0].stop_token_id == eos
    assert stopped[0].to_json()["stop_token_id"] == eos
    assert all(r.stop_token_id is None for r in free)
    cli_main(["--model", str(tiny_artifact), "--prompt", "hi", "--max-new-tokens", "2", "--json", "--greedy"])
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert "stop_token_id" in row


# ---- a demo a newcomer can read ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def every_id_artifact(tmp_path_factory):
    """The tiny checkpoint with the same random draws, but every tokenizer id's row kept at full scale
    (the scaling before visible_ids(): byte pieces of multi-byte characters, control characters and
    special tokens stay as likely as words)."""
    ckpt = write_checkpoint(tmp_path_factory.mktemp("every-id") / "ckpt", "tiny")
    raw = json.loads((ckpt / "config.json").read_text())
    every_id = list(range(train_tokenizer().get_vocab_size()))
    save_weights(random_weights(raw, every_id, std=INIT_STD["tiny"]), ckpt)
    export_artifact(str(ckpt), ckpt.parent / "art", run_verify=False, **QUIET)
    return ckpt.parent / "art"


@pytest.mark.parametrize("artifact, shows_text", [("tiny_artifact", True), ("every_id_artifact", False)])
def test_demo_prints_readable_text_and_timings(request, capsys, artifact, shows_text):
    """`make demo`'s command (read from the Makefile) prints visible text, then its timings in words.
    every_id_artifact is the negative control: there the same check must fail."""
    assert cli_main(demo_args(request.getfixturevalue(artifact))) == 0
    out, err = capsys.readouterr()
    assert out.endswith("\n") and readable(out[:-1]) == shows_text, repr(out)
    assert re.search(r"^\[32 tokens \(length\); first token after [\d.e-]+ s; .* decode [\d.e+]+ tokens/s\]$", err, re.M), err


@pytest.mark.parametrize("artifact, shows_text", [("tiny_artifact", True), ("every_id_artifact", False)])
def test_interactive_chat_replies_are_readable(request, artifact, shows_text):
    """Interactive chat samples with the artifact's defaults (generation_config.json's); each reply
    must be visible text. every_id_artifact is the negative control."""
    from runtime.generate.cli import _interactive

    gen = G.load(request.getfixturevalue(artifact), "cpu")
    lines = iter(["Hello there", "What is the capital of France?"])

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    chunks = []
    _interactive(gen, replace(gen.defaults, max_new_tokens=24, seed=0), None, read=read, write=chunks.append)
    transcript = "".join(chunks)
    replies = transcript.split("\n")[:-1]  # each reply ends with a newline
    assert transcript.endswith("\n")
    assert (len(replies) == 2 and all(map(readable, replies))) == shows_text, replies
