"""Generation: the Python API (api.py), its options and per-row state (request.py), sampling, text
(tokenizer, chat template, streaming), chat sessions that keep their cache, and the command line
(`python -m runtime.generate`, cli.py).

    from runtime.generate import load, generate, encode_prompt
    gen = load("artifacts/ernie-4.5-0.3b")
    [r] = generate(gen, [encode_prompt(gen, "Hello")], gen.options(max_new_tokens=32, greedy=True))
"""

from runtime.generate.api import Generator, Options, Result, encode_prompt, generate, load

__all__ = ["Generator", "Options", "Result", "encode_prompt", "generate", "load"]
