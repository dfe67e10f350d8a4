"""The float-math copy of a quantized artifact: what its graphs claim to compute, without the int8 activations.

In:  a quantized artifact directory and its manifest.
Out: `float_math`, a context yielding (directory, manifest) of a temporary copy inside the artifact (hard links, the
     graphs rewritten): every MatMulNBits and QMoE at accuracy level 1 (float32 activations) over the same packed
     weights, the int8 QMoE experts in float32 too; verification compares this with eager over the dequantized weights.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import onnx

from runtime.core.contract import graphs_of

FLOAT_MATH = "1"  # MatMulNBits accuracy level: float32 activations
# onnxruntime >= 1.31: QMoE's int8 experts compute in float32 only with this variable (tiny MoE: 0.03 logit error, 1e-5)
QMOE_FLOAT_ENV = "ORT_QMOE_CPU_QNBIT_GEMM"


@contextmanager
def float_math(directory: Path, manifest: dict):
    """The artifact's graphs with every MatMulNBits and QMoE computing in float32 (accuracy level 1) over the same
    packed weights: what the quantized graph claims, without the int8 activations the shipped level 4
    adds (measured on the tiny model: 0.2-0.4 max logit difference). Yields (directory, manifest) of a
    temporary copy inside `directory` (hard links; removed after)."""
    tmp = Path(tempfile.mkdtemp(prefix=".float-math-", dir=directory))
    try:
        for role, entry in manifest["files"].items():
            if role in graphs_of(manifest):
                model = onnx.load(str(directory / entry["path"]), load_external_data=False)
                for node in model.graph.node:
                    for attr in node.attribute:
                        if node.op_type in ("MatMulNBits", "QMoE") and attr.name == "accuracy_level":
                            attr.i = int(FLOAT_MATH)
                onnx.save(model, str(tmp / entry["path"]))
            elif (directory / entry["path"]).exists():  # parity.json is written after verification
                os.link(directory / entry["path"], tmp / entry["path"])
        options = manifest["session_options"]
        config = {**options["config"], "session.qdq_matmulnbits_accuracy_level": FLOAT_MATH}
        before = os.environ.get(QMOE_FLOAT_ENV)
        os.environ[QMOE_FLOAT_ENV] = "fp32"  # read when a session is created: the sessions opened inside
        yield tmp, {**manifest, "session_options": {**options, "config": config}}
    finally:
        if before is None:
            os.environ.pop(QMOE_FLOAT_ENV, None)
        else:
            os.environ[QMOE_FLOAT_ENV] = before
        shutil.rmtree(tmp, ignore_errors=True)
