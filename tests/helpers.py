"""Small helpers shared by tests (no fixtures here, just plain functions)."""

from __future__ import annotations

import torch


def left_pad(prompts: list[list[int]], pad_id: int = 0):
    """The runtime's left padding, as torch tensors: (input_ids, attention_mask, position_ids)."""
    from runtime.core.step import left_pad as np_left_pad

    return tuple(torch.from_numpy(a) for a in np_left_pad(prompts, pad_id))


def eager_greedy(model, prompt, n):
    """Reference greedy loop (ours or transformers' model): full recompute each step, no cache."""
    ids = list(prompt)
    for _ in range(n):
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(x, torch.ones_like(x), torch.arange(len(ids))[None])[0] if not hasattr(model, "generate") \
                else model(input_ids=x).logits
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def hf_model(ckpt, dtype=torch.float32):
    """transformers' reference Ernie4_5ForCausalLM for a checkpoint directory."""
    from transformers import Ernie4_5ForCausalLM

    return Ernie4_5ForCausalLM.from_pretrained(ckpt, dtype=dtype).eval()


def our_model(ckpt, dtype=torch.float32):
    from ernie_export.checkpoint.config import load_config
    from ernie_export.model.dense import build_model
    from ernie_export.checkpoint.weights import load_weights

    cfg = load_config(ckpt)
    return build_model(cfg, load_weights(ckpt, cfg, dtype))


def hostile_copy(src, dst, edit) -> "Path":
    """Copy an artifact, apply `edit(directory, manifest)` (it may change files and the manifest dict),
    then fix every listed file's size and SHA-256, so the check under test is the one that catches it."""
    import json
    import shutil
    from pathlib import Path

    from runtime.core.contract import file_entry

    dst = Path(dst)
    shutil.copytree(src, dst, symlinks=True)
    manifest = json.loads((dst / "manifest.json").read_text())
    edit(dst, manifest)
    for entry in (manifest.get("files") or {}).values() if isinstance(manifest.get("files"), dict) else ():
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            continue
        path = dst / entry["path"]
        if path.is_file() and path.resolve().is_relative_to(dst.resolve()):
            entry.update(file_entry(path))
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def readable(text: str) -> bool:
    """Text a person can read on a terminal: not blank, no U+FFFD, no control characters."""
    return bool(text.strip()) and text.isprintable() and "\ufffd" not in text


def demo_args(artifact) -> list[str]:
    """`make demo`'s generation flags, read from the Makefile (so a test follows the demo), on `artifact`."""
    import re
    import shlex
    from pathlib import Path

    make = (Path(__file__).resolve().parent.parent / "Makefile").read_text()
    prompt = re.search(r"^PROMPT \?= (.*)$", make, re.M)[1]
    flags = re.search(r"-m runtime\.generate --model \$\(DEMO\) (.*)$", make, re.M)[1]
    return ["--model", str(artifact), *shlex.split(flags.replace("$(PROMPT)", prompt))]


def decode_logits_and_tokens(path, prompts, provider="cpu", new_tokens=8, in_place=None):
    """An artifact's logits over 4 decode steps after `prompts` (fixed tokens 7..10 fed) and `new_tokens` greedy
    tokens per prompt, on `provider`. `in_place` None: the runtime's own choice for the provider (on CUDA a float32
    buffer is not written in place: session.host_cache_device); False forces the shared buffer's not-in-place path
    (Step.in_place). This helper once forced True, also on CUDA, the path the runtime avoids there: float32 --ops
    ort's GPU test then failed on an H100 (logits 7.7 from the CPU's; the runtime's own path: 6.7e-6)."""
    import numpy as np

    from runtime.generate import api as G

    gen = G.load(path, provider)
    if in_place is not None:
        gen.model.decode.in_place = in_place
    _, cache = gen.model.start(prompts, gen.pad_id)
    steps = []
    for t in (7, 8, 9, 10):
        logits, cache = gen.model.advance(np.full(len(prompts), t, np.int64), cache)
        steps.append(logits.copy())
    opts = gen.options(greedy=True, max_new_tokens=new_tokens, ignore_eos=True)
    return np.stack(steps), [r.token_ids for r in G.generate(gen, prompts, opts)]
