"""Verify an artifact against the eager model it came from — at export, or again later elsewhere.

In:  an artifact directory (staged or published) with its manifest, the eager float32 model, and
     an ONNX Runtime provider.
Out: a parity report (written to `parity.json`); `VerificationError` when any check fails.

Checks: `onnx.checker` (full) and strict shape inference on every graph; then the runtime's own
decode loop (`runtime.step.decode_loop`, the sessions opened as the runtime opens them) runs the
graphs on the golden prompts (golden.py: plain, chat, a left-padded batch), teacher-forced on eager's
greedy tokens, which with eager's top logits become the artifact's golden vectors. float32: max abs logit difference <= 1e-4 at prefill and each of 16 chained decode steps
(the graph's own presents fed back), every present within 1e-4, identical greedy tokens for 32
steps. float16/bfloat16: max abs difference and top-1 agreement against float32 eager, failing
below 99% at the positions float32 eager decides by a clear margin (HALF_MARGIN). The score graph (logits after every prompt token: log-probabilities for `echo`) is held
to the same tolerance as prefill on a golden prompt (reported only for float16/bfloat16).

    python -m ernie_export.artifact.verify --model ARTIFACT [--checkpoint DIR | HUB_ID] [--provider cuda]

re-verifies a published artifact (e.g. a bfloat16 export whose status is `pending` until a CUDA
host runs it) and atomically replaces its `parity.json` and manifest with the new result.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from runtime.core.contract import (MANIFEST, PAST, SCORE, SHARED_KINDS, ArtifactError, cache_names, generation_graphs,
                              graphs_of, kv_cache_of, load_manifest)
from runtime.core.session import PROVIDERS, open_model, resolve_provider
from runtime.core.step import KVCache, Model, StepError, decode_loop, left_pad

from ernie_export.artifact.float_math import float_math
from ernie_export.artifact.write import MODEL_TYPES, MOE_DIMS, write_manifest
from ernie_export.artifact.publish import interrupt_on_sigterm, publish, staged
from ernie_export.checkpoint.config import ErnieConfig, load_config
from ernie_export.checkpoint.stream import whole_moe
from ernie_export.graph.quantize import ACCURACY_LEVEL, Quantizer, moe_dims_of
from runtime.core.profile import Profile
from ernie_export.artifact.quality import (QUALITY_POSITIONS, QUALITY_PROMPT, quality, quality_failures,
                                          round_to_nearest_model)
from ernie_export.artifact.golden import MIN_AGREEMENT, QUANTIZED_TOLERANCE, TOP_K, TOP_STEPS, golden_file, golden_prompts, quality_ids
from ernie_export.model.dense import ErnieForCausalLM, build_model
from ernie_export.checkpoint.weights import SourceError, load_weights, resolve_checkpoint
from runtime.core.errors import UsageError, Failure, run_cli

FP32_TOL = 1e-4
CHECKED_STEPS = 16
# Prompt tokens of the shared buffer's long-context check: longer than one run of the runtime (256 tokens), so its
# second run attends after a cache (ernie_export.attention: the kernel's branch, the values transposed back), and
# its decode steps attend over 400+ positions (the grouped branch)
LONG_CONTEXT = 416
LONG_STEPS = 4
GREEDY_STEPS = 32
# float16/bfloat16 are gated on top-1 agreement at the positions where float32 eager's best logit leads
# the second by more than HALF_MARGIN: near-ties flip under half-precision rounding whatever the graph
# (measured on an H200, full-size synthetic checkpoint, float16 on CUDA: 98.75% raw agreement), while
# a wrong graph disagrees where the lead is clear too. Decisiveness is eager's alone, so a broken
# graph cannot make the check vacuous.
HALF_MARGIN = 0.25
PARITY_FILE = "parity.json"


class VerificationError(Failure, RuntimeError):
    """The exported graphs do not match the eager model."""


def check_onnx(directory: Path, manifest: dict) -> None:
    for graph in graphs_of(manifest):
        path = directory / manifest["files"][graph]["path"]
        try:
            onnx.checker.check_model(str(path), full_check=True)
            with tempfile.TemporaryDirectory() as tmp:
                onnx.shape_inference.infer_shapes_path(str(path), str(Path(tmp) / path.name), check_type=True,
                                                       strict_mode=True, data_prop=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            raise VerificationError(f"{path.name} fails the ONNX checker: {str(e).splitlines()[0]}") from None


def _max_diff(a: np.ndarray, b: torch.Tensor) -> float:
    return float(np.abs(a.astype(np.float32) - b.float().numpy()).max())


def _cache_diff(cache: KVCache, name: str, eager: torch.Tensor) -> float:
    """A graph's cache tensor vs eager's [B, KV, T, D] (left padded), compared where the cache's kind keeps
    each row's tokens (runtime.core.kv_cache: Kind.beside_left_padded)."""
    pairs = cache.kind.beside_left_padded(cache, name, eager.float().numpy())
    return max(float(np.abs(ours.astype(np.float32) - theirs).max()) for ours, theirs in pairs)


def _leads(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [...]: how far each position's best logit leads its second (a decisive position leads by a margin)."""
    best2 = torch.topk(logits.float(), 2, dim=-1).values
    return best2[..., 0] - best2[..., 1]


def compare(model: Model, eager: ErnieForCausalLM, prompts: list[list[int]], steps: int) -> dict:
    """Run the runtime's decode loop teacher-forced on eager's greedy tokens; collect differences."""
    ids, mask, pos = map(torch.from_numpy, left_pad(prompts))
    e_mask = mask  # eager's own (left-padded) mask, whatever layout the graph's cache has
    with torch.no_grad():
        e_logits, e_past = eager(ids, mask, pos, last_only=True)
    names = cache_names(eager.config.num_hidden_layers, PAST)
    readable = model.decode.io.inputs[names[0]]["dtype"] != "bfloat16"
    stats = {"logit_diffs": [], "present_diff": 0.0 if readable else None, "agree": 0, "total": 0,
             "decisive": 0, "decisive_agree": 0, "mismatch_step": None, "step": 0,
             "non_finite": None, "greedy": [], "top": []}

    def pick(logits: np.ndarray, cache: KVCache) -> tuple[np.ndarray, bool]:
        nonlocal e_logits, e_past, e_mask
        step = stats["step"]
        for side, values in (("ONNX Runtime", logits), ("eager PyTorch", e_logits.numpy())):
            if stats["non_finite"] is None and not np.isfinite(values).all():
                stats["non_finite"] = f"{side} logits are not finite (NaN/inf) at step {step}"
        if step <= CHECKED_STEPS:  # prefill, then the first CHECKED_STEPS decode steps
            stats["logit_diffs"].append(_max_diff(logits, e_logits[:, -1]))
            eager_cache = (t for kv in e_past for t in kv)
            if stats["present_diff"] is not None:  # numpy cannot read bfloat16 values: logits only
                stats["present_diff"] = max(stats["present_diff"], max(
                    _cache_diff(cache, name, t) for name, t in zip(names, eager_cache)))
        e_next = e_logits[:, -1].argmax(-1).numpy()
        stats["greedy"].append(e_next.tolist())
        if step < TOP_STEPS:  # golden vectors: eager's top logits of the first steps
            values, ids = torch.topk(e_logits[:, -1].float(), TOP_K, dim=-1)
            stats["top"].append([[[int(i), float(v)] for i, v in zip(r_ids, r_vals)]
                                 for r_ids, r_vals in zip(ids.tolist(), values.tolist())])
        same = e_next == logits.argmax(-1)
        stats["agree"] += int(same.sum())
        stats["total"] += len(same)
        decisive = _leads(e_logits[:, -1]).numpy() > HALF_MARGIN
        stats["decisive"] += int(decisive.sum())
        stats["decisive_agree"] += int((same & decisive).sum())
        if stats["mismatch_step"] is None and not same.all():
            stats["mismatch_step"] = step
        token = torch.from_numpy(e_next[:, None].astype(np.int64))
        e_mask = torch.cat([e_mask, torch.ones(len(e_next), 1, dtype=torch.int64)], dim=1)
        with torch.no_grad():
            e_logits, e_past = eager(token, e_mask, torch.from_numpy(cache.next_positions()), e_past, last_only=True)
        stats["step"] += 1
        return e_next.astype(np.int64), step == steps - 1

    decode_loop(model, prompts, pick)
    return {"prefill_max_abs_diff": stats["logit_diffs"][0], "decode_max_abs_diff": max(stats["logit_diffs"][1:]),
            "present_max_abs_diff": stats["present_diff"], "top1_agreement": stats["agree"] / stats["total"],
            "top1_total": stats["total"], "first_greedy_mismatch_step": stats["mismatch_step"],
            "decisive": stats["decisive"], "decisive_agree": stats["decisive_agree"],
            "non_finite": stats["non_finite"],
            "greedy_ids": [list(row) for row in zip(*stats["greedy"])],  # [row][step]
            "top_logits": [list(row) for row in zip(*stats["top"])]}  # [row][step][k] = [id, logit]


def score_parity(model: Model, eager: ErnieForCausalLM, prompt: list[int]) -> float:
    """Max abs difference of the score graph's logits after every prompt token from eager's (the
    log-probabilities the server returns for `echo`)."""
    got: list[np.ndarray] = []
    model.score(prompt, lambda logits, first: got.append(logits.copy()))
    with torch.no_grad():
        t = torch.tensor([prompt])
        ref = eager(t, torch.ones_like(t), torch.arange(len(prompt))[None], last_only=False)[0][0]
    return _max_diff(np.concatenate(got), ref)


def reference_model(cfg: ErnieConfig, eager32: ErnieForCausalLM, manifest: dict,
                    quantizer: Quantizer | None = None) -> ErnieForCausalLM:
    """What the graphs must compute: eager over the very weights they hold (dequantized when quantized)."""
    profile = Profile.from_manifest(manifest)
    if not profile.bits:
        return eager32
    quantizer = quantizer or Quantizer(profile, np.dtype(profile.dtype), moe_dims=moe_dims_of(cfg))
    return build_model(cfg, {k: torch.from_numpy(v) for k, v in quantizer.reference_weights(eager32.state_dict()).items()})


def _default_provider(dtype: str) -> str:
    cuda = PROVIDERS["cuda"] in ort.get_available_providers()
    return "cuda" if dtype == "bfloat16" and cuda else "cpu"


def verify(directory: Path, manifest: dict, eager32: ErnieForCausalLM, provider: str | None = None,
           reference: ErnieForCausalLM | None = None) -> tuple[dict, dict | None]:
    """Run every check on the graphs `manifest` describes on the golden prompts; return (report, the
    golden.json document from eager's side, None when pending) or raise VerificationError.

    Quantized graphs are checked against `reference` (eager over the same dequantized weights, the
    computation they claim) and scored against float32 eager (`quality`)."""
    dtype = manifest["dtype"]
    quantization = manifest["profile"]["quantization"]
    quantized = quantization != "none"
    if quantized and reference is None:
        raise ValueError("a quantized artifact is verified against its dequantized eager reference")
    check_onnx(directory, manifest)
    tolerance = QUANTIZED_TOLERANCE if quantized else FP32_TOL if dtype == "float32" else None
    report: dict = {"dtype": dtype, "quantization": quantization, "onnx_checker": "passed", "tolerance": tolerance}
    provider = provider or _default_provider(dtype)
    if dtype == "bfloat16" and provider == "cpu":
        report.update(status="pending", reason="ONNX Runtime's CPU provider has no bfloat16 kernels; verification "
                      "is pending a CUDA host (run `python -m ernie_export.artifact.verify --model ARTIFACT --provider cuda` there)")
        return report, None
    cases = golden_prompts(directory, manifest)
    # A shared buffer's prompt longer than a run, checked like the others (not part of golden.json).
    long = [[quality_ids(directory, manifest, LONG_CONTEXT)]] if kv_cache_of(manifest) in SHARED_KINDS else []
    scored = cases[0]["prompt_ids"][0] if SCORE in graphs_of(manifest) else None
    score_diff = None
    try:
        graphs = generation_graphs(kv_cache_of(manifest))  # every generation graph, whatever the runtime opens
        model = open_model(directory, manifest, provider, graphs=graphs)
        if quantized:
            with float_math(directory, manifest) as (exact_dir, exact_manifest):
                exact = open_model(exact_dir, exact_manifest, provider, graphs=graphs)
                runs = [compare(exact, reference, case["prompt_ids"], GREEDY_STEPS) for case in cases]
                runs += [compare(exact, reference, prompts, LONG_STEPS) for prompts in long]
                score_diff = score_parity(exact, reference, scored) if scored else None
                del exact
            shipped = [compare(model, reference, case["prompt_ids"], GREEDY_STEPS) for case in cases]
            report["shipped"] = _shipped(shipped)
            ids = quality_ids(directory, manifest, QUALITY_PROMPT + QUALITY_POSITIONS)
            report["quality"] = quality(model, eager32, round_to_nearest_model(eager32, manifest), ids)
        else:
            runs = [compare(model, eager32, case["prompt_ids"], GREEDY_STEPS) for case in cases]
            runs += [compare(model, eager32, prompts, LONG_STEPS) for prompts in long]
            score_diff = score_parity(model, eager32, scored) if scored else None
    except (ArtifactError, StepError) as e:  # e.g. an opset this onnxruntime cannot run
        raise VerificationError(f"the exported graphs do not run: {e}") from None
    report.update(provider=provider, **_summary(runs, score_diff))
    failures = _failures(report, dtype, quantization)
    report["status"] = "failed" if failures else "passed"
    if failures:
        err = VerificationError("exported graphs do not match eager PyTorch: " + "; ".join(failures))
        err.report = report
        raise err
    for case, run in zip(cases, runs):
        case.update(greedy_ids=run["greedy_ids"], top_logits=run["top_logits"])
    return report, golden_file(manifest, cases, GREEDY_STEPS, report.get("shipped"))


def _summary(runs: list[dict], score_diff: float | None) -> dict:
    """The compare() runs' figures as parity.json reports them: the worst difference, pooled agreement."""
    return {
        "prefill_max_abs_diff": max(r["prefill_max_abs_diff"] for r in runs),
        "decode_max_abs_diff": max(r["decode_max_abs_diff"] for r in runs),
        "present_max_abs_diff": None if runs[0]["present_max_abs_diff"] is None  # bfloat16: not readable
        else max(r["present_max_abs_diff"] for r in runs),
        "score_max_abs_diff": score_diff,  # the score graph, every position of a prompt (None: not exported)
        "top1_agreement": sum(r["top1_agreement"] * r["top1_total"] for r in runs) / sum(r["top1_total"] for r in runs),
        "decisive_positions": sum(r["decisive"] for r in runs),
        "top1_agreement_decisive": sum(r["decisive_agree"] for r in runs) / max(1, sum(r["decisive"] for r in runs)),
        "greedy_steps": GREEDY_STEPS, "checked_decode_steps": CHECKED_STEPS,
        "greedy_identical": all(r["first_greedy_mismatch_step"] is None for r in runs),
        "non_finite": next((r["non_finite"] for r in runs if r["non_finite"]), None),
    }


def _shipped(runs: list[dict]) -> dict:
    """How far the graphs as shipped (int8 activations) are from the dequantized reference: reported, and
    the tolerance drivers are held to (golden.json)."""
    return {"accuracy_level": ACCURACY_LEVEL,
            "max_abs_logit_diff": max(max(r["prefill_max_abs_diff"], r["decode_max_abs_diff"]) for r in runs),
            "top1_agreement": sum(r["top1_agreement"] * r["top1_total"] for r in runs) / sum(r["top1_total"] for r in runs)}


def _failures(report: dict, dtype: str, quantization: str = "none") -> list[str]:
    """Every failed check. A NaN difference never passes a `<=` test: non-finite values fail first."""
    failures = [report["non_finite"]] if report["non_finite"] else []
    diffs = tuple(k for k in ("prefill_max_abs_diff", "decode_max_abs_diff", "present_max_abs_diff",
                              "score_max_abs_diff") if report.get(k) is not None)
    failures += [f"{k} is {report[k]}" for k in diffs if not math.isfinite(report[k])]
    if quantization != "none":  # against the dequantized reference; quality against float32 eager
        tol = report["tolerance"]
        failures += [f"{k} {report[k]:.3g} > {tol} (against eager over the same dequantized weights)"
                     for k in diffs if report[k] > tol]
        failures += quality_failures(report["quality"], quantization)
    elif dtype == "float32":
        failures += [f"{k} {report[k]:.3g} > {FP32_TOL}" for k in diffs if report[k] > FP32_TOL]
        if not report["greedy_identical"]:
            failures.append(f"greedy tokens differ from eager within {GREEDY_STEPS} steps")
    elif not report["top1_agreement_decisive"] >= MIN_AGREEMENT:
        failures.append(f"top-1 agreement {report['top1_agreement_decisive']:.2%} < {MIN_AGREEMENT:.0%} at the "
                        f"{report['decisive_positions']} positions where float32 eager leads by > {HALF_MARGIN}")
    return failures


def write_parity(directory: Path, report: dict) -> None:
    """Strict JSON (no bare NaN, which other languages' parsers reject): non-finite figures become strings."""
    clean = {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in report.items()}
    (directory / PARITY_FILE).write_text(json.dumps(clean, indent=2, allow_nan=False))


class CheckpointNeeded(UsageError):
    """The artifact came from a local checkpoint, and no checkpoint was given (a flag to add: exit 2)."""


def _checkpoint_for(manifest: dict, checkpoint: str | None) -> tuple[Path, ErnieConfig]:
    model = manifest["model"]
    if checkpoint is None and model.get("source_kind") != "hub":
        raise CheckpointNeeded(f"the artifact was exported from a local checkpoint ({model.get('source')}); "
                               "pass --checkpoint DIR, the directory of that checkpoint")
    ckpt = resolve_checkpoint(checkpoint or model["source"])
    cfg = load_config(ckpt)
    dims = model["dims"]
    wrong = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                         "num_key_value_heads", "head_dim", *MOE_DIMS) if getattr(cfg, k, None) != dims.get(k)]
    wrong += ["model type"] * (MODEL_TYPES[cfg.arch] != model["type"])
    if wrong:
        raise SourceError(f"checkpoint {ckpt} is not the one this artifact came from ({', '.join(wrong)} differ)")
    return ckpt, cfg


def reverify(artifact: str | Path, checkpoint: str | None = None, provider: str = "auto") -> dict:
    """Verify a published artifact on `provider`, then atomically replace its parity.json and manifest.

    The new directory is staged next to the artifact with hard links to the unchanged files, and
    swapped in by the same `publish()` an export uses. A failed verification is recorded too (the
    runtime then warns), and raised.
    """
    artifact = Path(artifact)
    manifest = load_manifest(artifact)
    ckpt, cfg = _checkpoint_for(manifest, checkpoint)
    device, error = resolve_provider(provider), None
    try:
        report = _reverified(artifact, manifest, ckpt, cfg, device)
    except VerificationError as e:  # a checker failure carries no figures: record what failed
        report, error = getattr(e, "report", None) or {"status": "failed", "reason": e.problem}, e
    with staged(artifact, ckpt, overwrite=True) as tmp:
        for entry in manifest["files"].values():
            if entry["path"] != PARITY_FILE:
                (tmp / entry["path"]).parent.mkdir(exist_ok=True)  # onnx/ of the ecosystem layout
                os.link(artifact / entry["path"], tmp / entry["path"])
        write_parity(tmp, report)
        write_manifest(tmp, manifest)
        publish(tmp, artifact)
    if error is not None:
        raise error
    return report


def _reverified(artifact: Path, manifest: dict, ckpt: Path, cfg: ErnieConfig, device: str) -> dict:
    if cfg.is_moe and not whole_moe(cfg):  # the 21B-A3B: one layer in memory at a time
        from ernie_export.artifact.verify_layers import verify_large_moe  # late: it builds on this module
        return verify_large_moe(artifact, manifest, ckpt, cfg)
    eager32 = build_model(cfg, load_weights(ckpt, cfg, torch.float32))
    return verify(artifact, manifest, eager32, device, reference_model(cfg, eager32, manifest))[0]  # golden.json stays


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ernie_export.artifact.verify", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="published artifact directory")
    ap.add_argument("--checkpoint", help="the checkpoint it was exported from (default: the manifest's hub id)")
    ap.add_argument("--provider", choices=["auto", *PROVIDERS], default="auto")
    args = ap.parse_args(argv)
    interrupt_on_sigterm()
    return run_cli(lambda: _reverify_and_report(args), interrupted="; the artifact is unchanged")


def _reverify_and_report(args: argparse.Namespace) -> int:
    report = reverify(args.model, args.checkpoint, args.provider)
    print(f"{args.model}: parity {report['status']} on {report.get('provider', 'no provider')} "
          f"(written to {PARITY_FILE} and {MANIFEST})")
    return 0 if report["status"] == "passed" else 1


if __name__ == "__main__":
    raise SystemExit(main())
