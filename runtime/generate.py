"""Generate text from an exported artifact on ONNX Runtime — the Python API; no torch needed.

In:  an artifact directory (`make export`), token prompts, `Options` (the artifact's defaults
     from generation.json unless overridden).
Out: `Result`s (prompt ids, generated ids, text, finish reason, timings), optionally streamed.

    gen = load("artifacts/ernie-4.5-0.3b")
    [r] = generate(gen, [encode_prompt(gen, "Hello")])                          # the artifact's defaults
    [r] = generate(gen, prompts, gen.options(max_new_tokens=32, greedy=True))   # overridden

The command line is `runtime/cli.py`; `python -m runtime.generate` runs it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from .contract import ArtifactError, load_manifest, read_json_file
from .sampling import OptionError, SamplingParams, choose
from .session import available_memory, cap_threads, open_model, resolve_provider
from .step import KVCache, Model, decode_loop
from .text import StreamText, Text

OnText = Callable[[int, str], None]  # (row, UTF-8-safe text chunk)


class InputError(ValueError):
    """A request the model cannot serve (empty prompt, too long)."""


class ModelOutputError(RuntimeError):
    """The graphs computed something no token can be chosen from (NaN or inf logits)."""


@dataclass(frozen=True)
class Options:
    """One request's generation options. Build them with `Options.from_artifact` (or `gen.options`):
    the artifact decides the defaults; these fields have none, so no second set of defaults exists."""
    max_new_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # decode exactly max_new_tokens (benchmarks, fixed-length comparisons)

    @classmethod
    def from_artifact(cls, generation: dict, *, max_new_tokens: int | None = None, temperature: float | None = None,
                      top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
                      greedy: bool = False, seed: int | None = None, stop: tuple[str, ...] | list[str] | None = None,
                      ignore_eos: bool = False) -> "Options":
        """The artifact's defaults, then the given overrides (None keeps the default).

        Giving temperature, top_k or top_p turns sampling on; `greedy` turns it off whatever else is set.
        A bad default is the artifact's fault (ArtifactError); a bad override is the caller's (OptionError).
        """
        try:
            base = SamplingParams(do_sample=bool(generation["do_sample"]), temperature=float(generation["temperature"]),
                                  top_k=int(generation["top_k"]), top_p=float(generation["top_p"]),
                                  repetition_penalty=float(generation["repetition_penalty"])).validate()
            default_tokens = int(generation["max_new_tokens"])
        except KeyError as e:
            raise ArtifactError(f"the artifact's generation.json has no {e.args[0]}; re-run the export") from None
        except (TypeError, ValueError) as e:
            raise ArtifactError(f"the artifact's generation.json has a bad default ({e}); re-run the export") from None
        given = {k: v for k, v in dict(temperature=temperature, top_k=top_k, top_p=top_p,
                                       repetition_penalty=repetition_penalty).items() if v is not None}
        do_sample = False if greedy else base.do_sample or bool(given.keys() & {"temperature", "top_k", "top_p"})
        opts = cls(default_tokens if max_new_tokens is None else max_new_tokens,
                   replace(base, do_sample=do_sample, **given), tuple(stop or ()), seed, ignore_eos)
        return opts.validate()

    def validate(self) -> "Options":
        self.sampling.validate()
        if self.max_new_tokens < 1:
            raise OptionError("max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        return self


@dataclass
class Result:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # eos | stop | length
    timings: dict
    stop_token_id: int | None = None  # the end-of-sequence id that ended the row (finish_reason "eos")

    def to_json(self) -> dict:
        return {"prompt_token_ids": self.prompt_token_ids, "token_ids": self.token_ids, "text": self.text,
                "finish_reason": self.finish_reason, "stop_token_id": self.stop_token_id, "timings": self.timings}


@dataclass
class Generator:
    """What one loaded artifact needs to generate: the model, tokenizer and the artifact's defaults."""
    directory: Path
    manifest: dict
    generation: dict
    text: Text
    model: Model
    provider: str
    defaults: Options
    eos_ids: frozenset[int]
    warnings: list[str] = field(default_factory=list)

    @property
    def max_context(self) -> int:
        return self.manifest["model"]["dims"]["max_position_embeddings"]

    @property
    def pad_id(self) -> int:
        return self.manifest["tokens"]["pad_token_id"]

    def options(self, **overrides) -> Options:
        """This artifact's defaults with `overrides` (see `Options.from_artifact`)."""
        return Options.from_artifact(self.generation, **overrides)


def _warnings(directory: Path, manifest: dict, provider: str) -> list[str]:
    parity = read_json_file(directory, manifest, "parity") or {"status": "missing"}
    notes = []
    if parity.get("status") != "passed":
        notes.append(f"artifact {directory} is not verified against eager PyTorch (parity status: "
                     f"{parity.get('status')}{': ' + parity['reason'] if parity.get('reason') else ''})")
    if manifest["dtype"] == "float16" and provider == "cpu":  # measured: README "Embedding"
        notes.append("a float16 artifact on the CPU provider: ONNX Runtime computes in float32 and converts the "
                     "weights in each session; measured at full size, peak RSS 3.1 GB, 2.0x the float32 artifact's "
                     "1.5 GB. Use a float32 export on CPU hosts (float16 is for CUDA)")
    if manifest["model"].get("synthetic"):
        notes.append("this artifact comes from a synthetic checkpoint with RANDOM weights: its text is noise")
    return notes


def load(model_dir: str | Path, provider: str = "auto", threads: int | None = None, verify_hashes: bool = True) -> Generator:
    """Validate the manifest (sizes, SHA-256) and defaults, then open both sessions over the shared weights."""
    directory = Path(model_dir)
    manifest = load_manifest(directory, verify_hashes)
    device = resolve_provider(provider)
    threads, thread_note = cap_threads(threads)
    generation = read_json_file(directory, manifest, "generation")
    defaults = Options.from_artifact(generation)
    model = open_model(directory, manifest, device, threads)
    notes = _warnings(directory, manifest, device) + ([thread_note] if thread_note else [])
    return Generator(directory, manifest, generation, Text.load(directory, manifest, generation), model, device, defaults,
                     frozenset(manifest["tokens"]["eos_token_ids"]), notes)


def check_utf8(text: str, what: str) -> None:
    """Text from argv or a file decoded with surrogateescape can hold bytes that are not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"the {what} is not valid UTF-8 (a stray byte at character {e.start}); pass UTF-8 text") from None


def encode_prompt(gen: Generator, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
    check_utf8(prompt, "prompt")
    if system is not None:
        check_utf8(system, "system message")
    if not prompt.strip():
        raise InputError("the prompt is empty: pass some text")
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return gen.text.encode(gen.text.render(messages))
    ids = gen.text.encode(prompt)
    tokens = gen.manifest["tokens"]
    bos = tokens["bos_token_id"]
    return ([bos] if tokens["add_bos_token"] and bos is not None else []) + ids


def _check_request(gen: Generator, prompts: list[list[int]], opts: Options, past_len: int) -> None:
    opts.validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InputError("a prompt is empty (no tokens): pass some text")
    longest = past_len + max(map(len, prompts))
    if longest + opts.max_new_tokens > gen.max_context:
        raise OptionError("max_new_tokens", f"({opts.max_new_tokens}) plus the prompt ({longest} tokens) exceeds the "
                          f"model's context of {gen.max_context} tokens; shorten the prompt or lower max_new_tokens")
    free = available_memory() if gen.provider == "cpu" else None
    need = gen.model.memory_needed(len(prompts), longest + opts.max_new_tokens)
    if free is not None and need > free:
        raise InputError(f"{len(prompts)} x {longest + opts.max_new_tokens} tokens (prompt + max_new_tokens) need "
                         f"~{need / 2**30:.1f} GiB for the KV cache and attention, but this host has "
                         f"{free / 2**30:.1f} GiB available; shorten the prompt, lower max_new_tokens or the batch")


@dataclass
class _Rows:
    """The `pick` of one batch: sampling, EOS, stop strings, streaming and timing, row by row."""
    gen: Generator
    opts: Options
    prompts: list[list[int]]
    on_text: OnText | None

    def __post_init__(self):
        self.rng = np.random.default_rng(self.opts.seed)
        self.eos = frozenset() if self.opts.ignore_eos else self.gen.eos_ids
        self.streams = [StreamText(self.gen.text, list(self.opts.stop), live=self.on_text is not None)
                        for _ in self.prompts]
        self.seen = [list(p) for p in self.prompts]
        self.out: list[list[int]] = [[] for _ in self.prompts]
        self.reasons: list[str | None] = [None] * len(self.prompts)
        self.start = time.perf_counter()
        self.prefill_s = self.first_token_s = None

    def __call__(self, logits: np.ndarray, cache: KVCache) -> tuple[np.ndarray, bool]:
        if self.prefill_s is None:
            self.prefill_s = time.perf_counter() - self.start
        if not np.isfinite(logits).all():
            raise ModelOutputError(f"the model produced non-finite logits (NaN/inf) for generated token "
                                   f"{max(map(len, self.out)) + 1}; the artifact computes garbage: re-export it with "
                                   "verification on, or re-verify it (python -m ernie_export.verify)")
        nxt = choose(logits, self.seen, self.opts.sampling, self.rng)
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.start
        for row, token in enumerate(nxt.tolist()):
            if self.reasons[row]:
                nxt[row] = self.gen.pad_id
                continue
            self.out[row].append(token)
            self.seen[row].append(token)
            chunk = self._advance_row(row, token)
            if chunk and self.on_text:
                self.on_text(row, chunk)
        return nxt, all(self.reasons)

    def _advance_row(self, row: int, token: int) -> str:
        stream = self.streams[row]
        if token in self.eos:
            self.reasons[row] = "eos"
            return stream.flush()
        chunk = stream.push(token)
        if stream.stopped:
            self.reasons[row] = "stop"
        elif len(self.out[row]) == self.opts.max_new_tokens:
            self.reasons[row] = "length"
            chunk += stream.flush()
        return chunk

    def results(self) -> list[Result]:
        total = time.perf_counter() - self.start
        decode_s = total - self.first_token_s
        n_decoded = sum(max(len(o) - 1, 0) for o in self.out)
        timings = {"time_to_first_token_s": round(self.first_token_s, 4), "prefill_s": round(self.prefill_s, 4),
                   "prefill_tokens_per_s": round(sum(map(len, self.prompts)) / self.prefill_s, 2),
                   "decode_s": round(decode_s, 4),
                   "decode_tokens_per_s": round(n_decoded / decode_s, 2) if decode_s > 0 and n_decoded else None}
        return [Result(list(p), o, s.final if s.final is not None else s.flush(), r or "length", timings,
                       o[-1] if r == "eos" else None)
                for p, o, s, r in zip(self.prompts, self.out, self.streams, self.reasons)]


def generate(gen: Generator, prompts: list[list[int]], opts: Options | None = None,
             on_text: OnText | None = None) -> list[Result]:
    """Generate for a batch of token prompts (left padded); each row stops on its own.

    `opts` defaults to the artifact's (`gen.defaults`). `on_text(row, chunk)` receives UTF-8-safe
    text as it is produced.
    """
    opts = opts or gen.defaults
    _check_request(gen, prompts, opts, 0)
    rows = _Rows(gen, opts, prompts, on_text)
    decode_loop(gen.model, prompts, rows, pad_id=gen.pad_id)
    return rows.results()


def continue_generation(gen: Generator, prompt: list[int], opts: Options, cache: KVCache | None,
                        on_text: OnText | None = None) -> tuple[Result, KVCache]:
    """One sequence fed after `cache` (None: from scratch). The returned cache holds the prompt and
    every generated token, the last one included, ready for the next turn."""
    _check_request(gen, [prompt], opts, cache.length if cache else 0)
    rows = _Rows(gen, opts, [prompt], on_text)
    cache = decode_loop(gen.model, [prompt], rows, pad_id=gen.pad_id, cache=cache, keep_last=True)
    [result] = rows.results()
    return result, cache


if __name__ == "__main__":  # `python -m runtime.generate` is the command line's documented name
    from runtime.cli import main

    raise SystemExit(main())
