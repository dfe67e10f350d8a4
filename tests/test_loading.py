"""Config and weight loading: both config layouts, dtypes, shards, tying, and every error path."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from ernie_export.checkpoint.config import ConfigError, load_config
from ernie_export.checkpoint.synthetic import write_checkpoint
from ernie_export.checkpoint.weights import WeightsError, load_weights
from tests.helpers import our_model


def _logits(ckpt):
    ids = torch.arange(5, 13)[None]
    return our_model(ckpt)(ids, torch.ones_like(ids), torch.arange(8)[None])[0]


@pytest.fixture(scope="module")
def reference_logits(tiny_ckpt):
    return _logits(tiny_ckpt)


@pytest.mark.parametrize("kwargs", [
    dict(dtype=torch.bfloat16),
    dict(dtype=torch.float32),
    dict(dtype=torch.float16),
    dict(shards=3),
    dict(layout="original"),
    dict(layout="original", shards=2),
    dict(with_lm_head=True),
])
def test_layouts_load_to_the_same_model(tmp_path, tiny_ckpt, reference_logits, kwargs):
    """Every real file layout of the same bf16 weights loads to the same numbers."""
    ckpt = write_checkpoint(tmp_path / "c", "tiny", **kwargs)
    tol = 1e-3 if kwargs.get("dtype") == torch.float16 else 0.0  # bf16 -> fp16 re-rounds
    assert (_logits(ckpt) - reference_logits).abs().max().item() <= tol


def test_original_config_layout_fields(tmp_path):
    ckpt = write_checkpoint(tmp_path / "o", "tiny", layout="original")
    raw = json.loads((ckpt / "config.json").read_text())
    assert "rope_theta" in raw and "auto_map" in raw and "rope_parameters" not in raw
    cfg = load_config(ckpt)
    assert cfg.rope_theta == 500000.0 and cfg.head_dim == 32 and cfg.num_kv_groups == 2


def test_untied_lm_head_is_used(tmp_path):
    ckpt = write_checkpoint(tmp_path / "u", "tiny", tie=False)
    cfg = load_config(ckpt)
    w = load_weights(ckpt, cfg)
    assert "lm_head.weight" in w and not torch.equal(w["lm_head.weight"], w["model.embed_tokens.weight"])


def _edit_config(ckpt, **changes):
    raw = json.loads((ckpt / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            raw.pop(k, None)
        else:
            raw[k] = v
    (ckpt / "config.json").write_text(json.dumps(raw))


@pytest.mark.parametrize("changes, message", [
    # MoE configs are accepted (tests/test_moe.py); a dense checkpoint relabelled MoE is not
    (dict(model_type="ernie4_5_moe"), "['Ernie4_5ForCausalLM'] are not supported for model_type 'ernie4_5_moe'"),
    (dict(architectures=["Ernie4_5_MoeForCausalLM"]), "are not supported for model_type 'ernie4_5'"),
    (dict(model_type="llama"), "model_type 'llama' is not supported"),
    (dict(hidden_size=None), "missing required field(s): hidden_size"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "rope type 'yarn' is not supported"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0}), "rope type 'dynamic' is not supported"),
    (dict(rope_parameters={"rope_type": "linear"}), "needs factor"),
    (dict(num_key_value_heads=3), "multiple of num_key_value_heads"),
])
def test_config_errors_name_the_problem(tmp_path, changes, message):
    ckpt = write_checkpoint(tmp_path / "c", "tiny")
    _edit_config(ckpt, **changes)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(ckpt)


def test_original_layout_unknown_rope_scaling_refused(tmp_path):
    ckpt = write_checkpoint(tmp_path / "o", "tiny", layout="original")
    _edit_config(ckpt, rope_scaling={"type": "longrope", "factor": 2.0})
    with pytest.raises(ConfigError, match="'longrope' is not supported"):
        load_config(ckpt)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(tmp_path)


def test_weight_errors_are_reported_together(tmp_path):
    """One error lists the missing, the unexpected and the mis-shaped tensors."""
    ckpt = write_checkpoint(tmp_path / "c", "tiny")
    w = load_file(str(ckpt / "model.safetensors"))
    del w["model.layers.1.mlp.down_proj.weight"]
    w["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 64, dtype=torch.bfloat16)
    w["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(w, str(ckpt / "model.safetensors"))
    cfg = load_config(ckpt)
    with pytest.raises(WeightsError) as err:
        load_weights(ckpt, cfg)
    msg = str(err.value)
    assert "1 missing: model.layers.1.mlp.down_proj.weight" in msg
    assert "1 unexpected: model.layers.0.extra.weight" in msg
    assert "model.layers.0.self_attn.k_proj.weight (3, 64) (expected (64, 64))" in msg


def test_no_weights_and_pickle_only(tmp_path):
    ckpt = write_checkpoint(tmp_path / "c", "tiny")
    (ckpt / "model.safetensors").unlink()
    cfg = load_config(ckpt)
    with pytest.raises(WeightsError, match="no safetensors weights"):
        load_weights(ckpt, cfg)
    (ckpt / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(WeightsError, match="never loaded"):
        load_weights(ckpt, cfg)


def test_missing_shard_named(tmp_path):
    ckpt = write_checkpoint(tmp_path / "c", "tiny", shards=2)
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightsError, match="model-00002-of-00002.safetensors"):
        load_weights(ckpt, load_config(ckpt))
