"""`python -m runtime.eval --model ART --text FILE [--compare ART2]`: how much did an export lose?

In:  an artifact, a UTF-8 text file, optionally a second artifact of the same model (e.g. float32 to
     judge an int4 export against).
Out: rolling perplexity of the text and tokens/s; with --compare, on the same token positions: mean
     KL divergence KL(p_compare || p_model), top-1 agreement and the perplexity ratio model / compare.
     `--json` prints one object. Torch-free: the runtime's own sessions, through the score graph (logits at
     every position; an artifact exported without one is refused with a message).

Rolling semantics are lm-evaluation-harness's `loglikelihood_rolling` (`get_rolling_token_windows` with
context length 1, made disjoint by `make_disjoint_window`): every token of the text is predicted exactly
once, in chunks of `--window` tokens. The first window is the prefix token (the artifact's BOS id, else
its first EOS id: lm-eval's `prefix_token_id`) and the first `--window` - 1 tokens; every later window is
the `--window` tokens before its last prediction, so a short last chunk keeps earlier text as context.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.core.errors import OptionError, run_cli
from runtime.generate.api import Generator, InputError, check_utf8, load
from runtime.generate.logprobs import log_softmax
from runtime.core.session import PROVIDERS

DEFAULT_WINDOW = 512


def windows(ids: list[int], prefix: int, size: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's rolling windows, `get_rolling_token_windows(ids, prefix, size, context_len=1)`:
    [(inputs, targets)], targets consecutive chunks of at most `size` ids that cover `ids` once; the last
    len(targets) positions of `inputs` (at most `size` ids) predict them. The first window is `prefix` and
    the first chunk but its last id; a later one is the `size` ids before its last target (a full chunk is
    fed only the id before it, a short last chunk also earlier ids). `make_disjoint_window`'s context plus
    the targets but the last, which lm-eval feeds the model, is `inputs` again."""
    if not ids:
        return []
    first = min(size, len(ids))
    out = [([prefix] + ids[:first - 1], ids[:first])]
    for lo in range(first, len(ids), size):
        hi = min(lo + size, len(ids))
        out.append((ids[hi - size - 1:hi - 1], ids[lo:hi]))
    return out


def rolling_windows(manifest: dict, ids: list[int], size: int) -> list[tuple[list[int], list[int]]]:
    """`windows` with lm-eval's prefix token: the artifact's BOS id, else its first EOS id. Score each
    window's last len(targets) logits."""
    tokens = manifest["tokens"]
    prefix = tokens["bos_token_id"] if tokens["bos_token_id"] is not None else tokens["eos_token_ids"][0]
    return windows(ids, prefix, size)


@dataclass
class Score:
    """Running sums over the scored positions."""
    tokens: int = 0
    nll: float = 0.0  # of the model
    nll_compare: float = 0.0
    kl: float = 0.0
    agree: int = 0
    seconds: float = 0.0
    per_model_seconds: list[float] = field(default_factory=lambda: [0.0, 0.0])

    def add(self, lp: np.ndarray, target: int, ref: np.ndarray | None = None) -> None:
        """One predicted token: the model's log-probabilities [V] (and the compared model's)."""
        self.nll -= float(lp[target])  # summed in float64, not in float32
        if ref is not None:
            self.nll_compare -= float(ref[target])
            self.kl += float((np.exp(ref) * (ref - lp)).sum())
            self.agree += int(ref.argmax() == lp.argmax())
        self.tokens += 1

    def figures(self, compare: bool) -> dict:
        out = {"tokens": self.tokens, "perplexity": float(np.exp(self.nll / self.tokens)),
               "nll_per_token": self.nll / self.tokens,
               "tokens_per_s": round(self.tokens / self.per_model_seconds[0], 2)}
        if compare:
            out.update(compare_perplexity=float(np.exp(self.nll_compare / self.tokens)),
                       perplexity_ratio=float(np.exp((self.nll - self.nll_compare) / self.tokens)),
                       mean_kl=self.kl / self.tokens, top1_agreement=self.agree / self.tokens,
                       compare_tokens_per_s=round(self.tokens / self.per_model_seconds[1], 2))
        return out


def _window(gen: Generator, inputs: list[int], clock: list[float], slot: int) -> np.ndarray:
    """Logits after each input token [len(inputs), V] float32, from the score graph (one chunked
    prefill per window, not one decode step per token)."""
    t = time.perf_counter()
    parts: list[np.ndarray] = []
    gen.model.score(inputs, lambda logits, first: parts.append(logits.copy()))
    clock[slot] += time.perf_counter() - t
    return np.concatenate(parts)


def evaluate(gen: Generator, ids: list[int], window: int = DEFAULT_WINDOW, compare: Generator | None = None,
             progress=lambda done, total: None) -> dict:
    """Score `ids` (rolling windows) with `gen` and, in lockstep on the same positions, `compare`."""
    if len(ids) < 1:
        raise InputError("the text has no tokens: pass some text")
    if compare is not None and compare.manifest["model"]["dims"]["vocab_size"] != gen.manifest["model"]["dims"]["vocab_size"]:
        raise InputError("--compare must be an export of the same model (the vocabulary sizes differ)")
    score = Score()
    parts = rolling_windows(gen.manifest, ids, min(window, gen.max_context))
    for done, (inputs, targets) in enumerate(parts):
        mine = _window(gen, inputs, score.per_model_seconds, 0)
        theirs = _window(compare, inputs, score.per_model_seconds, 1) if compare else None
        for row, target in enumerate(targets, len(inputs) - len(targets)):  # the last positions predict them
            score.add(log_softmax(mine[row]), target, None if theirs is None else log_softmax(theirs[row]))
        progress(done + 1, len(parts))
    return score.figures(compare is not None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.eval", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="artifact directory")
    ap.add_argument("--text", required=True, help="UTF-8 text file to score")
    ap.add_argument("--compare", help="a second artifact of the same model (e.g. the float32 export)")
    ap.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                    help="tokens per window, lm-eval's rolling windows: the first is fed the prefix token (the "
                         "artifact's BOS id, else its first EOS id), a later one the tokens before it "
                         "(default %(default)s)")
    ap.add_argument("--provider", choices=["auto", *PROVIDERS], default="auto")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = ap.parse_args(argv)
    return run_cli(lambda: report(args))


def report(args: argparse.Namespace) -> None:
    """Score the text named by the flags and print the figures."""
    if args.window < 1:
        raise OptionError("window", "must be at least 1")
    try:
        text = Path(args.text).read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as e:
        raise OptionError("text", f"{args.text}: {e.strerror or e}; pass an existing UTF-8 text file") from None
    check_utf8(text, f"text in {args.text}")
    gen = load(args.model, args.provider)
    compare = load(args.compare, args.provider) if args.compare else None
    ids = gen.text.encode(text)
    interactive = sys.stderr.isatty()
    shown = lambda done, total: print(f"\r[eval] window {done}/{total}", end="\n" if done == total else "",  # noqa: E731
                                      file=sys.stderr, flush=True) if interactive or done == total else None
    result = {"model": args.model, "compare": args.compare, "window": args.window,
              **evaluate(gen, ids, args.window, compare, shown)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.model}: perplexity {result['perplexity']:.4g} over {result['tokens']} tokens "
              f"({result['tokens_per_s']} tokens/s)")
        if compare:
            print(f"vs {args.compare}: perplexity {result['compare_perplexity']:.4g}, ratio {result['perplexity_ratio']:.4f}, "
                  f"mean KL {result['mean_kl']:.3g}, top-1 agreement {result['top1_agreement']:.1%}")


if __name__ == "__main__":
    raise SystemExit(main())
