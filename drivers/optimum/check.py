"""optimum's ORTModelForCausalLM runs a `--layout hf` export (concat cache: float32, or int4/int8 `--ops standard`).

In:  PYTHONPATH=drivers/optimum/site python drivers/optimum/check.py ARTIFACT_DIR [STEPS] [--no-workaround]
     golden.json supplies the prompts (texts and ids); the manifest's session options go to onnxruntime.
Out: one JSON line: {cases: [{name, prompt_ids_equal, greedy_ids: [[...] per row]}]}: the golden texts tokenized by
     transformers' tokenizer from the folder (left padded, from tokenizer_config.json) and greedy ids from
     model.generate (do_sample False); the caller compares them. --no-workaround skips the two lines below (a
     negative control). Exit 1 with one `error:` line when loading or generating fails.

optimum-onnx 0.1.0 has no `ernie4_5` entry: it sizes the empty cache with as many KV heads as query heads and
hidden_size / heads per head (ERNIE 4.5 0.3B: 16 and 64 where the graph has 2 and 128), and both are chosen by
model_type in its code, so no config field can fix them. Two lines after loading do.
"""

import json
import sys
from pathlib import Path

import onnxruntime as ort
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoTokenizer


def load(directory: Path, workaround: bool = True) -> ORTModelForCausalLM:
    config = json.loads((directory / "config.json").read_text())
    options = ort.SessionOptions()
    for key, value in json.loads((directory / "manifest.json").read_text())["session_options"]["config"].items():
        options.add_session_config_entry(key, value)  # quantized standard-op graphs need theirs (accuracy level)
    [graph] = config["transformers.js_config"]["use_external_data_format"]  # onnx/model{suffix}.onnx
    model = ORTModelForCausalLM.from_pretrained(directory, subfolder="onnx", file_name=graph, session_options=options,
                                                local_files_only=True)
    if workaround:  # the two lines: the cache's true shape
        model.num_key_value_heads = model.config.num_key_value_heads
        model.embed_size_per_head = model.config.head_dim
    return model


def main(argv: list[str]) -> int:
    args = [a for a in argv if a != "--no-workaround"]
    directory, steps = Path(args[0]), int(args[1]) if len(args) > 1 else 16
    try:
        model, tokenizer = load(directory, "--no-workaround" not in argv), AutoTokenizer.from_pretrained(directory)
        cases = []
        for case in json.loads((directory / "golden.json").read_text())["cases"]:
            inputs = tokenizer(case["text"], padding=True, add_special_tokens=False, return_tensors="pt")
            ids = [[t for t, m in zip(row, mask) if m] for row, mask in
                   zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist())]
            out = model.generate(**inputs, max_new_tokens=steps, do_sample=False)
            cases.append({"name": case["name"], "prompt_ids_equal": ids == case["prompt_ids"],
                          "greedy_ids": out[:, inputs["input_ids"].shape[1]:].tolist()})
    except Exception as e:  # noqa: BLE001 (one line for the caller, whatever optimum raised)
        print(f"error: optimum could not run {directory}: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
              file=sys.stderr)
        return 1
    print(json.dumps({"cases": cases}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
