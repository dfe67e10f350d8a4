"""`python -m runtime.generate`: the command line over the generation API.

In:  flags (`--model`, prompts, generation options), or a terminal for interactive chat.
Out: generated text on stdout (plain, streamed or one JSON object per prompt); a plain or streamed
     run ends with one line of timings on stderr; every failure is one `error:` line on stderr and the
     exit status of its kind (runtime.core.errors: 2 usage, 3 a bad artifact, 1 a failed run).

This module only maps flags onto `Options.from_artifact`; errors name their option, which
`ErnieError.cli_line` words as its flag. It decides no default of its own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from runtime.core.errors import ErnieError, OptionError, run_cli
from runtime.generate.api import Generator, InputError, Options, Result, encode_prompt, generate, load
from runtime.generate.chat import Chat
from runtime.core.session import PROVIDERS


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m runtime.generate", description="Generate with an exported ERNIE 4.5 artifact.")
    ap.add_argument("--model", required=True, help="artifact directory written by `make export`")
    ap.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    ap.add_argument("--prompt-file", help="one prompt per line, run as one batch")
    ap.add_argument("--chat", action="store_true", help="apply the chat template to the prompt as a user message")
    ap.add_argument("--system", help="system message (with --chat or interactive chat)")
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--temperature", type=float)
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--repetition-penalty", type=float)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--greedy", action="store_true", help="greedy decoding whatever the artifact's defaults say")
    ap.add_argument("--ignore-eos", action="store_true", help="decode exactly --max-new-tokens tokens")
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not part of the output")
    ap.add_argument("--json-schema", metavar="FILE", help="structured output: the text matches this JSON schema file")
    ap.add_argument("--json-object", action="store_true", help="structured output: the text is one JSON object")
    ap.add_argument("--regex", help="structured output: the whole text matches this regular expression")
    ap.add_argument("--grammar", metavar="FILE", help="structured output: the text matches this Lark or GBNF grammar")
    ap.add_argument("--provider", choices=["auto", *PROVIDERS], default="auto")
    ap.add_argument("--threads", type=int, help="intra-op threads (default: ONNX Runtime's choice)")
    ap.add_argument("--stream", action="store_true", help="print text as it is generated")
    ap.add_argument("--json", action="store_true", help="one JSON object per prompt: ids, text, finish_reason, timings")
    return ap


def options_from_args(gen: Generator, args: argparse.Namespace) -> Options:
    """Flags onto the artifact's defaults; an absent flag keeps the artifact's value."""
    return gen.options(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, repetition_penalty=args.repetition_penalty, greedy=args.greedy,
                       seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos,
                       json_schema=_read(args.json_schema, "json_schema"), json_object=args.json_object,
                       regex=args.regex, grammar=_read(args.grammar, "grammar"))


def _read(path: str | None, option: str) -> str | None:
    """A constraint's file as text (None when the flag is absent); an unreadable file is an OptionError."""
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise OptionError(option, f"{path}: {getattr(e, 'strerror', None) or e}; pass a readable UTF-8 file") from None


def timings_line(results: list[Result]) -> str:
    """The batch's tokens and timings in words, for a person reading a plain or streamed run."""
    t = results[0].timings  # one batch: the same timings on every row
    reasons = "/".join(sorted({r.finish_reason for r in results}))
    decode = "-" if t["decode_tokens_per_s"] is None else f"{t['decode_tokens_per_s']:g}"
    return (f"[{sum(len(r.token_ids) for r in results)} tokens ({reasons}); "
            f"first token after {t['time_to_first_token_s']:g} s; prefill {t['prefill_tokens_per_s']:g} tokens/s; "
            f"decode {decode} tokens/s]")


def _interactive(gen: Generator, opts: Options, system: str | None, read=input,
                 write=lambda chunk: print(chunk, end="", flush=True)) -> None:
    """A conversation in the terminal. Ctrl-C during a reply cancels that reply (the conversation
    stays as it was before it); an error in one turn (e.g. the context is full) is reported and the
    conversation goes on; Ctrl-D ends it."""
    chat = Chat(gen, system)
    print("Interactive chat (Ctrl-D to quit, Ctrl-C cancels a reply). The KV cache is kept between turns.",
          file=sys.stderr)
    while True:
        try:
            line = read("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        if not line.strip():
            continue
        try:
            chat.turn(line, opts, lambda row, chunk: write(chunk))
            write("\n")
        except KeyboardInterrupt:
            print("\n[reply cancelled; the conversation is as it was before this message]", file=sys.stderr)
        except ErnieError as e:  # this turn failed (too long, a failed step); the conversation goes on
            print(e.cli_line(), file=sys.stderr)


def _stdin_is_terminal() -> bool:
    try:
        return sys.stdin is not None and not sys.stdin.closed and sys.stdin.isatty()
    except (ValueError, OSError):
        return False


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        try:
            lines = Path(args.prompt_file).read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise OptionError("prompt_file", f"{args.prompt_file} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
        except OSError as e:
            raise OptionError("prompt_file", f"{args.prompt_file}: {e.strerror or e}; pass a readable file") from None
        prompts += [ln for ln in lines if ln.strip()]
    return prompts


def run(args: argparse.Namespace) -> None:
    prompts = _prompts(args)
    gen = load(args.model, args.provider, args.threads)
    for w in gen.warnings:
        print(f"warning: {w}", file=sys.stderr)
    opts = options_from_args(gen, args)
    interactive = not prompts and args.prompt is None and not args.prompt_file and _stdin_is_terminal()
    if (args.chat or interactive) and gen.text.template_source is None:
        raise InputError(f"{'--chat' if args.chat else 'interactive chat'}: this artifact has no chat template (its "
                         "checkpoint had none); pass --prompt without --chat, or re-export a checkpoint that has one")
    if interactive:
        return _interactive(gen, opts, args.system)
    if not prompts:
        raise InputError("no prompt: pass --prompt TEXT or --prompt-file FILE (or run in a terminal for interactive chat)")
    if args.stream and len(prompts) > 1:
        raise OptionError("stream", "prints one sequence; drop --stream to run several prompts as a batch")
    token_prompts = [encode_prompt(gen, p, args.chat, args.system) for p in prompts]
    on_text = (lambda row, chunk: print(chunk, end="", flush=True)) if args.stream and not args.json else None
    results = generate(gen, token_prompts, opts, on_text)
    for r in results:
        if args.json:
            print(json.dumps(r.to_json(), ensure_ascii=False))
        elif args.stream:
            print(flush=True)
        else:
            print(r.text, flush=True)
    if not args.json:
        print(timings_line(results), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())
