"""Generation: the Python API (api.py), its options and per-row state (request.py), sampling, text
(tokenizer, chat template, streaming), chat sessions that keep their cache, structured output (constraints.py), tool calls
(tools.py), and the command line (`python -m runtime.generate`, cli.py).

    from runtime.generate import load, generate, encode_prompt
    gen = load("artifacts/ernie-4.5-0.3b")
    [r] = generate(gen, [encode_prompt(gen, "Hello")], gen.options(max_new_tokens=32, greedy=True))

The API names resolve lazily (PEP 562): the export side imports `runtime.generate.sampling` for verification
without the text side (jinja2), which importing api.py here would pull in (tests/test_export.py).
"""

__all__ = ["Generator", "Options", "Result", "encode_prompt", "generate", "load"]


def __getattr__(name: str):
    if name in __all__:
        from runtime.generate import api
        return getattr(api, name)
    raise AttributeError(f"module 'runtime.generate' has no attribute {name!r}")
