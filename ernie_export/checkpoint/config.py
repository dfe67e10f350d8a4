"""Read an ERNIE 4.5 `config.json` into a frozen `ErnieConfig` (dense) or `ErnieMoeConfig` (the MoE family).

In:  a checkpoint directory (or the path of its config.json), in either layout real checkpoints use:
     the current one (`rope_parameters`) or the original release one (top-level `rope_theta`,
     `rope_scaling`, `torch_dtype`, `auto_map`); for `ernie4_5_moe` also the Paddle release's field names
     (`num_nextn_predict_layers`, extra training-only fields are ignored).
Out: `ErnieConfig` (`arch` "dense") or its subclass `ErnieMoeConfig` (`arch` "moe", the MoE fields), or
     `ConfigError` naming exactly what is wrong. Given fields are never overwritten; only absent optional
     fields take the reference defaults (transformers 5.25's `Ernie4_5Config` / `Ernie4_5_MoeConfig`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from runtime.core.errors import SourceProblem

# model_type -> the architectures names its checkpoints carry (current and original release spellings)
ARCHITECTURES = {
    "ernie4_5": ("Ernie4_5ForCausalLM", "Ernie4_5_ForCausalLM"),
    "ernie4_5_moe": ("Ernie4_5_MoeForCausalLM",),
}
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)
SUPPORTED_ARCHITECTURES = ARCHITECTURES["ernie4_5"]
# RoPE types we implement, each with a parity test against transformers. The others the config
# format allows (dynamic, yarn, longrope) are refused rather than silently computed wrong.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


class ConfigError(SourceProblem, ValueError):
    """The checkpoint's config.json cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class ErnieConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    rope_theta: float = 500000.0
    rope_type: str = "default"
    rope_parameters: dict = field(default_factory=dict)  # the whole rope dict, for scaled types
    use_bias: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 0
    synthetic: bool = False  # written by ernie_export.checkpoint.synthetic: RANDOM weights, output is noise

    arch: ClassVar[str] = "dense"  # the architecture family: "dense" here, "moe" for ErnieMoeConfig

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def is_moe(self) -> bool:
        return self.arch == "moe"


@dataclass(frozen=True)
class ErnieMoeConfig(ErnieConfig):
    """The MoE family (ERNIE-4.5-21B-A3B, 300B-A47B): the dense fields plus the experts'. Defaults are the 21B-A3B's.
    `intermediate_size` is the width of the dense MLP of the layers that are not MoE (layer 0)."""
    moe_num_experts: int = 64  # routed experts per MoE layer (E)
    moe_k: int = 6  # experts chosen per token (top-k)
    moe_intermediate_size: int = 1536  # width of one routed expert (I)
    moe_num_shared_experts: int = 2  # experts every token goes through (S), stored as one MLP of width S * I
    moe_layer_start_index: int = 1
    moe_layer_end_index: int = -1  # -1: the last layer (resolved on construction, as transformers does)
    moe_layer_interval: int = 1
    moe_norm_min: float = 1e-12  # floor of the sum the chosen weights are divided by
    num_mtp_layers: int = 0  # multi-token-prediction layers stored after the model (mtp_*): inference ignores them

    arch: ClassVar[str] = "moe"

    def __post_init__(self):
        if self.moe_layer_end_index == -1:
            object.__setattr__(self, "moe_layer_end_index", self.num_hidden_layers - 1)

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer i has the sparse MoE block (else the dense MLP); transformers' rule exactly."""
        return (i + 1) % self.moe_layer_interval == 0 and self.moe_layer_start_index <= i <= self.moe_layer_end_index

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * self.moe_num_shared_experts


def _rope(raw: dict) -> tuple[float, str, dict]:
    """Normalise both RoPE layouts into (theta, type, parameters)."""
    params = raw.get("rope_parameters")
    if params is None:
        params = dict(raw.get("rope_scaling") or {})
        if "rope_theta" in raw:
            params.setdefault("rope_theta", raw["rope_theta"])
    else:
        params = dict(params)
        if "rope_theta" not in params and "rope_theta" in raw:
            params["rope_theta"] = raw["rope_theta"]
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)}); "
            "export would give wrong results, so it is refused"
        )
    theta = params.get("rope_theta", 500000.0)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not (math.isfinite(theta) and theta > 0):
        raise ConfigError(f"rope_theta must be a positive number, got {theta!r}")
    theta = float(theta)
    needed = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                "original_max_position_embeddings")}
    missing = [k for k in needed.get(rope_type, ()) if k not in params]
    if missing:
        raise ConfigError(f"rope type {rope_type!r} needs {', '.join(missing)} in the config's rope parameters")
    for key in needed.get(rope_type, ()):
        _float(params, key, None)
    if _float(params, "partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError("partial_rotary_factor != 1.0 is not supported by ERNIE 4.5 export")
    params["rope_type"] = rope_type
    params["rope_theta"] = theta
    return theta, rope_type, params


def _int(raw: dict, key: str, default=None) -> int:
    """A positive integer field; a float like 2.5, a string or a bool is refused, never truncated."""
    value = raw.get(key, default)
    if type(value) is not int or value <= 0:
        raise ConfigError(f"config.json field {key} must be a positive integer, got {value!r}")
    return value


def _float(raw: dict, key: str, default: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ConfigError(f"config.json field {key} must be a positive number, got {value!r}")
    return float(value)


def _token_id(raw: dict, key: str, default):
    value = raw.get(key, default)
    ids = value if isinstance(value, list) else [value]
    if not all(v is None or (type(v) is int and v >= 0) for v in ids):
        raise ConfigError(f"config.json field {key} must be a token id (or a list of them), got {value!r}")
    return value


def _count(raw: dict, key: str, default: int) -> int:
    """A non-negative integer field (0 allowed), refused like `_int` otherwise."""
    value = raw.get(key, default)
    if type(value) is not int or value < 0:
        raise ConfigError(f"config.json field {key} must be a non-negative integer, got {value!r}")
    return value


def _moe_fields(raw: dict, n_layers: int) -> dict:
    """The MoE fields, transformers' defaults where absent (the 21B-A3B's), with their invariants asserted."""
    if isinstance(raw.get("moe_num_experts"), list):
        raise ConfigError("moe_num_experts is a list (the multimodal ERNIE 4.5 VL layout): only the text MoE "
                          "models (ernie4_5_moe) are supported")
    if raw.get("use_bias"):
        raise ConfigError("use_bias true is not supported for the MoE family (no published MoE checkpoint has "
                          "biases); set it to false only if the checkpoint has no *.bias tensors")
    mtp_key = "num_mtp_layers" if raw.get("num_mtp_layers") is not None else "num_nextn_predict_layers"  # HF, Paddle
    fields = dict(
        moe_num_experts=_int(raw, "moe_num_experts", 64),
        moe_k=_int(raw, "moe_k", 6),
        moe_intermediate_size=_int(raw, "moe_intermediate_size", 1536),
        moe_num_shared_experts=_count(raw, "moe_num_shared_experts", 2),
        moe_layer_start_index=_count(raw, "moe_layer_start_index", 1),
        moe_layer_interval=_int(raw, "moe_layer_interval", 1),
        moe_norm_min=_float(raw, "moe_norm_min", 1e-12),
        num_mtp_layers=_count(raw, mtp_key, 0) if raw.get(mtp_key) is not None else 0,
    )
    if fields["moe_k"] > fields["moe_num_experts"]:
        raise ConfigError(f"moe_k ({fields['moe_k']}) must not exceed moe_num_experts ({fields['moe_num_experts']})")
    end = raw.get("moe_layer_end_index", -1)
    if end != -1:
        end = _count(raw, "moe_layer_end_index", -1)
        if end >= n_layers:
            raise ConfigError(f"moe_layer_end_index ({end}) must be -1 or below num_hidden_layers ({n_layers})")
    last = n_layers - 1 if end == -1 else end
    if not any((i + 1) % fields["moe_layer_interval"] == 0 for i in range(fields["moe_layer_start_index"], last + 1)):
        raise ConfigError(f"moe_layer_start_index {fields['moe_layer_start_index']}, moe_layer_end_index {end} and "
                          f"moe_layer_interval {fields['moe_layer_interval']} make no layer of {n_layers} a MoE layer")
    return {**fields, "moe_layer_end_index": end}


def parse_config(raw: dict) -> ErnieConfig:
    """Validate a config.json dict and build an ErnieConfig (or, for `ernie4_5_moe`, an ErnieMoeConfig) from it."""
    if not isinstance(raw, dict):
        raise ConfigError("config.json must hold a JSON object; re-download the checkpoint")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"model_type {model_type!r} is not supported: expected one of {list(SUPPORTED_MODEL_TYPES)}")
    archs = raw.get("architectures")
    if archs and not any(a in ARCHITECTURES[model_type] for a in archs):
        raise ConfigError(f"architectures {archs} are not supported for model_type {model_type!r}: expected one of "
                          f"{list(ARCHITECTURES[model_type])}")
    missing = [k for k in REQUIRED_FIELDS if raw.get(k) is None]
    if missing:
        raise ConfigError(f"config.json is missing required field(s): {', '.join(missing)}")
    if raw.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {raw['hidden_act']!r} is not supported: expected 'silu'")
    n_heads, hidden = _int(raw, "num_attention_heads"), _int(raw, "hidden_size")
    n_kv = _int(raw, "num_key_value_heads", n_heads) if raw.get("num_key_value_heads") is not None else n_heads
    head_dim = _int(raw, "head_dim") if raw.get("head_dim") is not None else hidden // n_heads
    if n_heads % n_kv:
        raise ConfigError(f"num_attention_heads ({n_heads}) must be a multiple of num_key_value_heads ({n_kv})")
    if head_dim % 2:
        raise ConfigError(f"head_dim ({head_dim}) must be even for RoPE")
    theta, rope_type, rope_params = _rope(raw)
    moe = _moe_fields(raw, _int(raw, "num_hidden_layers")) if model_type == "ernie4_5_moe" else {}
    return (ErnieMoeConfig if moe else ErnieConfig)(
        vocab_size=_int(raw, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_int(raw, "intermediate_size"),
        num_hidden_layers=_int(raw, "num_hidden_layers"),
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        rms_norm_eps=_float(raw, "rms_norm_eps", 1e-5),
        max_position_embeddings=_int(raw, "max_position_embeddings", 131072),
        rope_theta=theta,
        rope_type=rope_type,
        rope_parameters=rope_params,
        use_bias=bool(raw.get("use_bias", False)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        bos_token_id=_token_id(raw, "bos_token_id", 1),
        eos_token_id=_token_id(raw, "eos_token_id", 2),
        pad_token_id=_token_id(raw, "pad_token_id", 0),
        synthetic=bool(raw.get("synthetic")),
        **moe,
    )


def load_config(path: str | Path) -> ErnieConfig:
    """Load `config.json` from a checkpoint directory (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"no config.json in {path}: pass a checkpoint directory that contains config.json")
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file} is not valid JSON ({e}); re-download the checkpoint") from None
    return parse_config(raw)
