"""`python -m ernie_export --model <dir | hub id> --out artifacts/<name>`: export and verify.

Only parses flags and calls `build.export_artifact` through `runtime.core.errors.run_cli`: an error is one `error:`
line and its kind's exit status (2 a flag, 3 the checkpoint, 1 a failed run; 130/143 interrupted, nothing written);
`python -m ernie_export.artifact.verify` re-verifies a published artifact.
"""

from __future__ import annotations

import argparse

from runtime.core.contract import KV_CACHE_KINDS

from ernie_export.build import DEFAULT_MODEL, DEFAULT_OPSET, export_artifact
from ernie_export.graph.quantize import MIN_STANDARD_OPSET
from runtime.core.errors import run_cli
from runtime.core.profile import BLOCK_SIZES, DTYPES, KV_BITS, OPS, PRESETS, QUANTIZATIONS, TABLE_BITS
from ernie_export.artifact.ecosystem import LAYOUTS
from ernie_export.artifact.publish import interrupt_on_sigterm


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ernie_export",
                                 description="Export ERNIE 4.5 to prefill/decode ONNX graphs, verified against eager PyTorch.",
                                 allow_abbrev=False)  # --op must not silently mean --opset or --ops
    ap.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory or hub id (default: %(default)s)")
    ap.add_argument("--out", required=True, help="artifact directory to create, e.g. artifacts/ernie-4.5-0.3b")
    ap.add_argument("--profile", choices=list(PRESETS), default="reference",
                    help="what to build, by target (default %(default)s); the flags below override its fields: "
                         + "; ".join(f"{name}: {p.target}" for name, p in PRESETS.items()))
    ap.add_argument("--dtype", choices=list(DTYPES), default=None, help="weight and activation dtype (float32)")
    ap.add_argument("--opset", type=int, default=None,
                    help=f"ONNX opset (default {DEFAULT_OPSET}; {MIN_STANDARD_OPSET} for quantized standard-op graphs)")
    ap.add_argument("--quantize", choices=list(QUANTIZATIONS), default=None,
                    help="weight-only block quantization of every linear layer and the embedding / LM-head table")
    ap.add_argument("--block-size", type=int, default=None, choices=BLOCK_SIZES,
                    help="inputs per quantization scale (32; a layer whose inputs it does not divide takes the largest "
                         "that does)")
    ap.add_argument("--table-bits", type=int, choices=TABLE_BITS, default=None,
                    help="bits of the quantized embedding / LM-head table (8, as llama.cpp keeps its q4_0 table at 6; "
                         "4 gives the smallest file)")
    ap.add_argument("--kv-bits", type=int, choices=KV_BITS, default=None,
                    help="bits of the key and value projections (default: --quantize's); 8 in the int4 profile: "
                         "25%% lower mean KL from float32 for 1.5%% more weight bytes (the cpu preset)")
    ap.add_argument("--ops", choices=OPS, default=None,
                    help="standard: ai.onnx ops only, runs on any ONNX runtime; ort: onnxruntime's contrib "
                         "kernels (MatMulNBits, GatherBlockQuantized, GroupQueryAttention), faster on ONNX Runtime")
    ap.add_argument("--kv-cache", choices=KV_CACHE_KINDS, default=None,
                    help="shared_buffer_vt (the default with --ops ort in float32, the CPU profiles): a preallocated "
                         "cache written in place, values stored transposed, decode steps reading it once; "
                         "shared_buffer (the default with --ops ort in float16/bfloat16, the GPU profile): onnxruntime's "
                         "attention kernel writing it in place; concat (the default, and the only kind, with --ops "
                         "standard): a cache that grows by a copy each step")
    ap.add_argument("--layout", choices=LAYOUTS, default="ours",
                    help="hf: also write the files transformers.js and onnxruntime-genai load (config.json, "
                         "tokenizer_config.json, onnx/model*.onnx, genai_config.json; README 'Embed'); not with the "
                         "shared_buffer_vt cache: add --kv-cache shared_buffer")
    ap.add_argument("--full-logits", action="store_true", help="logits for every position (evaluation), not just the last")
    ap.add_argument("--no-verify", action="store_true", help="skip parity verification (the runtime will warn)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing artifact at --out")
    args = ap.parse_args(argv)
    interrupt_on_sigterm()
    return run_cli(lambda: export_artifact(
        args.model, args.out, profile=args.profile, dtype=args.dtype, opset=args.opset, full_logits=args.full_logits,
        run_verify=not args.no_verify, overwrite=args.overwrite, quantize=args.quantize, block_size=args.block_size,
        ops=args.ops, table_bits=args.table_bits, kv_cache=args.kv_cache, kv_bits=args.kv_bits, layout=args.layout),
        interrupted="; nothing was written")


if __name__ == "__main__":
    raise SystemExit(main())
