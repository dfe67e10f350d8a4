"""Golden vectors: what every driver of an artifact must reproduce, written at export from the eager model.

In:  the staged artifact (its tokenizer, chat template and manifest); later, the eager side of
     verification (`verify.compare` records eager's greedy tokens and top logits as it goes).
Out: `golden_prompts()` -> the verification prompts (a plain prompt, a chat prompt when the artifact
     has a template, a left-padded batch of three), token ids included; `golden_file()` -> the
     golden.json document: per case the prompt ids, 32 greedy ids per row, and the top-5 logits of
     the first steps, with the tolerance a driver must meet.

A driver checks itself teacher-forced: prefill the prompt ids (left padded), then at each step the
argmax must equal the golden id, which is fed next (see runtime/check.py and drivers/).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

FORMAT = "ernie4_5-onnx-golden"
VERSION = 2  # 2: min_agreement always present (drivers hold no floor of their own)
PLAIN = "Hello from ERNIE, exported to ONNX."
CHAT = [{"role": "user", "content": "What is ONNX Runtime?"}]
BATCH = ["The capital of France is", "def hello(name):", "你好，世界！ Größe 🙂"]
TOP_K = 5
TOP_STEPS = 4  # steps whose top logits are recorded (prefill + 3 decode steps)
TOLERANCE = {"float32": 1e-4, "float16": 5e-2, "bfloat16": 1e-1}  # max abs logit difference a driver may show
QUANTIZED_TOLERANCE = 1e-3  # quantized graphs, against eager over the same dequantized weights
# Top-1 agreement a driver must reach teacher-forced where not exact (float16/bfloat16; quantized artifacts record
# what verification measured, at most this). Written into every golden.json (`min_agreement`): drivers read it there.
MIN_AGREEMENT = 0.99
# Quality text (teacher-forced, quantized vs float32): varied words, code and CJK, repeated to length.
QUALITY_TEXT = ("The quick brown fox jumps over the lazy dog. ONNX Runtime runs the exported graphs on CPUs and GPUs; "
                "def add(a, b):\n    return a + b\n 你好，世界！ Numbers 3.14159 and 2718 follow. "
                "A model is quantized block by block, and every block keeps its own scale. ")


def _encode(tok: Tokenizer, tokens: dict, text: str) -> list[int]:
    bos = [tokens["bos_token_id"]] if tokens["add_bos_token"] and tokens["bos_token_id"] is not None else []
    return bos + tok.encode(text, add_special_tokens=tokens["add_special_tokens"]).ids


def golden_prompts(directory: Path, manifest: dict) -> list[dict]:
    """[{name, text, prompt_ids}]: the cases verification runs and golden.json records."""
    files, tokens = manifest["files"], manifest["tokens"]
    tok = Tokenizer.from_file(str(directory / files["tokenizer"]["path"]))
    cases = [{"name": "plain", "text": [PLAIN]}]
    if "chat_template" in files:
        from runtime.generate.text import Text  # jinja2, only to render the chat case (the export side renders nothing else)

        text = Text(tok, (directory / files["chat_template"]["path"]).read_text(), {})
        cases.append({"name": "chat", "text": [text.render(CHAT)]})
    cases.append({"name": "left_padded_batch", "text": BATCH})
    for case in cases:
        case["prompt_ids"] = [_encode(tok, tokens, t) for t in case["text"]]
    return cases


def quality_ids(directory: Path, manifest: dict, count: int) -> list[int]:
    """`count` token ids of QUALITY_TEXT (repeated as needed), the sequence quantized exports are scored on."""
    tok = Tokenizer.from_file(str(directory / manifest["files"]["tokenizer"]["path"]))
    ids = _encode(tok, manifest["tokens"], QUALITY_TEXT)
    return (ids * (count // max(len(ids), 1) + 1))[:count]


def golden_file(manifest: dict, cases: list[dict], steps: int, shipped: dict | None = None) -> dict:
    """cases: each with prompt_ids plus `greedy_ids` [row][step] and `top_logits` [row][step][k] = [id, logit].

    Quantized artifacts record the dequantized reference's values; `shipped` (verification's measure of
    the graphs as shipped, int8 activations included) sets the tolerance and agreement drivers must meet,
    with a 2x margin on the difference (other CPUs' kernels round differently)."""
    dtype = manifest["dtype"]
    quantized = manifest["profile"]["quantization"] != "none"
    exact = dtype == "float32" and not quantized
    extra = {"min_agreement": 1.0 if exact else MIN_AGREEMENT}
    if quantized and shipped:
        extra = {"tolerance": max(QUANTIZED_TOLERANCE, float(f"{2 * shipped['max_abs_logit_diff']:.2g}")),
                 "min_agreement": min(MIN_AGREEMENT, float(f"{shipped['top1_agreement'] - 0.05:.2f}"))}
    return {
        "format": FORMAT, "version": VERSION, "dtype": dtype,
        "how": "teacher-forced: prefill prompt_ids (left padded per the manifest's feeding rules); at step k "
               "the argmax of each row's logits must be greedy_ids[row][k], which is fed next; for the first "
               "top_logits_steps steps, logits[id] must be within tolerance of each recorded [id, logit]",
        "exact": exact,
        "tolerance": QUANTIZED_TOLERANCE if quantized else TOLERANCE[dtype], "steps": steps, "top_logits_steps": TOP_STEPS, "top_k": TOP_K,
        "cases": [{k: case[k] for k in ("name", "text", "prompt_ids", "greedy_ids", "top_logits")} for case in cases],
        **extra,
    }
