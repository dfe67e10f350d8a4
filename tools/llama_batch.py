"""llama.cpp with several sequences in one batch: the batch > 1 rows of tools.peers' llama worker.

In:  a GGUF file, prompts (lists of token ids, equal lengths), new tokens per row, threads.
Out: perf_counter times (start, prefilled, first, end), timed like the batch-1 worker (prefill until every row's
     last prompt position has logits, first once each row's first token is picked, then new - 1 decode steps of one
     token per row), and each row's greedy ids (equal to a batch-1 run's: checked by hand, docs/performance.md).

llama-cpp-python's `Llama` drives one sequence; the batched rows use its low-level binding the way llama.cpp's
own batched examples (llama-batched, llama-server's slots) do: one context with n_seq_max = rows, every row's
prompt in one llama_batch (llama.cpp splits it into n_ubatch micro-batches), then a batch of one token per row.
"""

from __future__ import annotations

import os
import time

import numpy as np


def _argmax(llama_cpp, ctx, index: int, vocab: int) -> int:
    return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, index), shape=(vocab,)).argmax())


def _fill(batch, items: list[tuple[int, int, int, bool]]) -> None:
    """items: (token, position, sequence, wants logits) -> the batch's arrays."""
    batch.n_tokens = len(items)
    for i, (token, pos, seq, logits) in enumerate(items):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
        batch.seq_id[i][0] = seq


def open_batched(model: str, rows: int, n_ctx_row: int, n_batch: int, threads: int | None):
    """(llama_cpp, model, context, vocab size, load seconds) for `rows` sequences of up to n_ctx_row tokens."""
    import llama_cpp

    threads = threads or os.cpu_count()
    t0 = time.perf_counter()
    llama_model = llama_cpp.llama_model_load_from_file(model.encode(), llama_cpp.llama_model_default_params())
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_seq_max = rows * n_ctx_row, n_batch, rows
    params.n_threads = params.n_threads_batch = threads
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as the batch-1 worker's Llama() (its default)
    ctx = llama_cpp.llama_init_from_model(llama_model, params)
    if not llama_model or not ctx:
        raise RuntimeError(f"llama.cpp could not open {model} for {rows} sequences")
    vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llama_model))
    return llama_cpp, llama_model, ctx, vocab, time.perf_counter() - t0


def run_batched(handle, prompts: list[list[int]], new: int) -> tuple[tuple[float, float, float, float], list[list[int]]]:
    """Greedy decoding of every row at once; the context's memory is cleared first."""
    llama_cpp, _, ctx, vocab, _ = handle
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    rows, length = len(prompts), len(prompts[0])
    batch = llama_cpp.llama_batch_init(rows * length, 0, rows)
    try:
        start = time.perf_counter()
        _fill(batch, [(t, p, r, p == length - 1) for r, row in enumerate(prompts) for p, t in enumerate(row)])
        if llama_cpp.llama_decode(ctx, batch):
            raise RuntimeError("llama_decode failed on the prompts")
        llama_cpp.llama_synchronize(ctx)
        prefilled = time.perf_counter()
        tokens = [_argmax(llama_cpp, ctx, (r + 1) * length - 1, vocab) for r in range(rows)]
        first, ids = time.perf_counter(), [[t] for t in tokens]
        for step in range(new - 1):
            _fill(batch, [(t, length + step, r, True) for r, t in enumerate(tokens)])
            if llama_cpp.llama_decode(ctx, batch):
                raise RuntimeError("llama_decode failed on a decode step")
            tokens = [_argmax(llama_cpp, ctx, r, vocab) for r in range(rows)]
            for row, t in zip(ids, tokens):
                row.append(t)
        return (start, prefilled, first, time.perf_counter()), ids
    finally:
        llama_cpp.llama_batch_free(batch)
