"""Verify an exported artifact against the eager model it came from.

In:  the staging directory holding prefill.onnx / decode.onnx, the eager float32 model, the dtype.
Out: a parity report (written to `parity.json`); `VerificationError` when any check fails.

Checks: `onnx.checker` (full) and strict shape inference on both graphs; then ONNX Runtime runs
the graphs on fixed prompts (one alone, one left-padded batch). float32: max abs logit difference
<= 1e-4 at prefill and each of 16 chained decode steps (the graph's own presents fed back), every
present within 1e-4, identical greedy tokens for 32 steps. float16/bfloat16: max abs difference
and top-1 agreement against float32 eager (teacher-forced), failing below 99%.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from runtime.generate import left_pad
from runtime.session import open_session

from .model import ErnieForCausalLM

FP32_TOL = 1e-4
CHECKED_STEPS = 16
GREEDY_STEPS = 32
MIN_TOP1 = 0.99


class VerificationError(RuntimeError):
    """The exported graphs do not match the eager model."""


def check_onnx(directory: Path) -> None:
    for name in ("prefill.onnx", "decode.onnx"):
        path = directory / name
        try:
            onnx.checker.check_model(str(path), full_check=True)
            with tempfile.TemporaryDirectory() as tmp:
                onnx.shape_inference.infer_shapes_path(str(path), str(Path(tmp) / name), check_type=True,
                                                       strict_mode=True, data_prop=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            raise VerificationError(f"{name} fails the ONNX checker: {str(e).splitlines()[0]}") from None


def fixed_prompts(vocab: int) -> list[list[list[int]]]:
    """A single prompt and a left-padded batch of three, deterministic."""
    rng = np.random.default_rng(1234)
    hi = min(vocab, 400)
    draw = lambda n: rng.integers(5, hi, n).tolist()  # noqa: E731
    return [[draw(9)], [draw(4), draw(13), draw(8)]]


def _max_diff(a: np.ndarray, b: torch.Tensor) -> float:
    return float(np.abs(a.astype(np.float32) - b.float().numpy()).max())


def compare(prefill: ort.InferenceSession, decode: ort.InferenceSession, eager: ErnieForCausalLM,
            prompts: list[list[int]], steps: int) -> dict:
    """Run both sides teacher-forced on eager's greedy tokens; collect differences and top-1 agreement."""
    n = eager.config.num_hidden_layers
    ids, mask, pos = left_pad(prompts)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    outs = prefill.run(None, feeds)
    with torch.no_grad():
        e_logits, e_past = eager(*map(torch.from_numpy, (ids, mask, pos)), last_only=True)
    logit_diffs = [_max_diff(outs[0][:, -1], e_logits[:, -1])]
    present_diff = max(_max_diff(outs[1 + i], t) for i, t in enumerate(x for kv in e_past for x in kv))
    agree = total = 0
    mismatch_step = None
    for step in range(steps):
        e_next = e_logits[:, -1].argmax(-1).numpy()
        o_next = outs[0][:, -1].argmax(-1)
        agree += int((e_next == o_next).sum())
        total += len(e_next)
        if mismatch_step is None and (e_next != o_next).any():
            mismatch_step = step
        token = e_next[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones_like(token)], axis=1)
        pos = pos[:, -1:] + 1
        feeds = {"input_ids": token, "attention_mask": mask, "position_ids": pos}
        feeds.update({f"past_key_values.{i // 2}.{'key' if i % 2 == 0 else 'value'}": outs[1 + i] for i in range(2 * n)})
        outs = decode.run(None, feeds)
        with torch.no_grad():
            e_logits, e_past = eager(*map(torch.from_numpy, (token, mask, pos)), e_past, last_only=True)
        if step < CHECKED_STEPS:
            logit_diffs.append(_max_diff(outs[0][:, -1], e_logits[:, -1]))
            present_diff = max(present_diff, max(_max_diff(outs[1 + i], t)
                                                 for i, t in enumerate(x for kv in e_past for x in kv)))
    return {"prefill_max_abs_diff": logit_diffs[0], "decode_max_abs_diff": max(logit_diffs[1:]),
            "present_max_abs_diff": present_diff, "top1_agreement": agree / total, "top1_total": total,
            "first_greedy_mismatch_step": mismatch_step}


def verify(directory: Path, eager32: ErnieForCausalLM, dtype: str) -> dict:
    """Run every check; return the report or raise VerificationError."""
    check_onnx(directory)
    report: dict = {"dtype": dtype, "onnx_checker": "passed", "tolerance": FP32_TOL if dtype == "float32" else None}
    providers = ort.get_available_providers()
    if dtype == "bfloat16":
        if "CUDAExecutionProvider" not in providers:
            report.update(status="pending", reason="ONNX Runtime's CPU provider has no bfloat16 kernels; "
                          "verification is pending a CUDA host (run `python -m ernie_export.verify` there)")
            return report
        provider = "cuda"
    else:
        provider = "cpu"
    prefill, decode = (open_session(directory / f"{g}.onnx", provider) for g in ("prefill", "decode"))
    runs = [compare(prefill, decode, eager32, p, GREEDY_STEPS) for p in fixed_prompts(eager32.config.vocab_size)]
    merged = {
        "provider": provider,
        "prefill_max_abs_diff": max(r["prefill_max_abs_diff"] for r in runs),
        "decode_max_abs_diff": max(r["decode_max_abs_diff"] for r in runs),
        "present_max_abs_diff": max(r["present_max_abs_diff"] for r in runs),
        "top1_agreement": sum(r["top1_agreement"] * r["top1_total"] for r in runs) / sum(r["top1_total"] for r in runs),
        "greedy_steps": GREEDY_STEPS, "checked_decode_steps": CHECKED_STEPS,
        "greedy_identical": all(r["first_greedy_mismatch_step"] is None for r in runs),
    }
    report.update(merged)
    if dtype == "float32":
        failures = [f"{k} {report[k]:.3g} > {FP32_TOL}" for k in
                    ("prefill_max_abs_diff", "decode_max_abs_diff", "present_max_abs_diff") if report[k] > FP32_TOL]
        if not report["greedy_identical"]:
            failures.append("greedy tokens differ from eager within 32 steps")
    else:
        failures = [] if report["top1_agreement"] >= MIN_TOP1 else [
            f"top-1 agreement {report['top1_agreement']:.2%} < {MIN_TOP1:.0%}"]
    report["status"] = "failed" if failures else "passed"
    if failures:
        err = VerificationError("exported graphs do not match eager PyTorch: " + "; ".join(failures))
        err.report = report
        raise err
    return report
