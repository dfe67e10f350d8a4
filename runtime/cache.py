"""One model step with IO binding: the KV cache stays in ONNX Runtime values between steps.

In:  a session (prefill or decode), int64 ids / mask / positions, the previous step's present
     values (None for prefill), the device the cache lives on.
Out: last-position logits as a host numpy array [B, V] and the new present values (OrtValues on
     the device: on CUDA they never visit the host). The cache grows with the sequence, it is
     never preallocated to the model's full context.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort


@dataclass
class Step:
    session: ort.InferenceSession
    device: str  # "cpu" or "cuda"
    past_names: list[str]
    present_names: list[str]
    vocab: int
    full_logits: bool = False  # artifact exported with --full-logits: logits [B, S, V]
    _logits: ort.OrtValue | None = None  # host buffer reused across steps of the same batch size

    @classmethod
    def for_session(cls, session: ort.InferenceSession, device: str, vocab: int, full_logits: bool = False) -> "Step":
        ins = [i.name for i in session.get_inputs()]
        outs = [o.name for o in session.get_outputs()]
        return cls(session, device, [n for n in ins if n.startswith("past_key_values.")],
                   [n for n in outs if n.startswith("present.")], vocab, full_logits)

    def __call__(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray,
                 past: list[ort.OrtValue] | None) -> tuple[np.ndarray, list[ort.OrtValue]]:
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        io.bind_cpu_input("attention_mask", np.ascontiguousarray(mask, dtype=np.int64))
        io.bind_cpu_input("position_ids", np.ascontiguousarray(pos, dtype=np.int64))
        for name, value in zip(self.past_names, past or []):
            io.bind_ortvalue_input(name, value)
        batch = ids.shape[0]
        if self.full_logits:
            io.bind_output("logits", "cpu")
        else:
            if self._logits is None or self._logits.shape()[0] != batch:
                self._logits = ort.OrtValue.ortvalue_from_shape_and_type([batch, 1, self.vocab], np.float32, "cpu")
            io.bind_ortvalue_output("logits", self._logits)
        for name in self.present_names:
            io.bind_output(name, self.device)
        self.session.run_with_iobinding(io)
        outputs = io.get_outputs()
        return outputs[0].numpy()[:, -1], outputs[1:]
