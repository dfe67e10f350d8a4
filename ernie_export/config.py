"""Read an ERNIE 4.5 `config.json` into a frozen `ErnieConfig`.

In:  a checkpoint directory (or the path of its config.json), in either layout real checkpoints use:
     the current one (`rope_parameters`) or the original release one (top-level `rope_theta`,
     `rope_scaling`, `torch_dtype`, `auto_map`).
Out: `ErnieConfig`, or `ConfigError` naming exactly what is wrong. Given fields are never
     overwritten; only absent optional fields take the reference defaults.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("ernie4_5",)
SUPPORTED_ARCHITECTURES = ("Ernie4_5ForCausalLM", "Ernie4_5_ForCausalLM")
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


class ConfigError(ValueError):
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
    synthetic: bool = False  # written by ernie_export.synthetic: RANDOM weights, output is noise

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


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
    theta = float(params.get("rope_theta", 500000.0))
    needed = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                "original_max_position_embeddings")}
    missing = [k for k in needed.get(rope_type, ()) if k not in params]
    if missing:
        raise ConfigError(f"rope type {rope_type!r} needs {', '.join(missing)} in the config's rope parameters")
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError("partial_rotary_factor != 1.0 is not supported by ERNIE 4.5 export")
    params["rope_type"] = rope_type
    params["rope_theta"] = theta
    return theta, rope_type, params


def parse_config(raw: dict) -> ErnieConfig:
    """Validate a config.json dict and build an ErnieConfig from it."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        hint = " (the MoE family is not supported; use a dense ERNIE 4.5 checkpoint)" if model_type and "moe" in model_type else ""
        raise ConfigError(f"model_type {model_type!r} is not supported: expected 'ernie4_5'{hint}")
    archs = raw.get("architectures")
    if archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ConfigError(f"architectures {archs} are not supported: expected one of {list(SUPPORTED_ARCHITECTURES)}")
    missing = [k for k in REQUIRED_FIELDS if raw.get(k) is None]
    if missing:
        raise ConfigError(f"config.json is missing required field(s): {', '.join(missing)}")
    if raw.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {raw['hidden_act']!r} is not supported: expected 'silu'")
    n_heads = int(raw["num_attention_heads"])
    n_kv = int(raw.get("num_key_value_heads") or n_heads)
    head_dim = raw.get("head_dim") or raw["hidden_size"] // n_heads
    if n_heads % n_kv:
        raise ConfigError(f"num_attention_heads ({n_heads}) must be a multiple of num_key_value_heads ({n_kv})")
    if head_dim % 2:
        raise ConfigError(f"head_dim ({head_dim}) must be even for RoPE")
    theta, rope_type, rope_params = _rope(raw)
    eps = float(raw.get("rms_norm_eps", 1e-5))
    if not (eps > 0 and math.isfinite(eps)):
        raise ConfigError(f"rms_norm_eps must be a positive number, got {eps}")
    return ErnieConfig(
        vocab_size=int(raw["vocab_size"]),
        hidden_size=int(raw["hidden_size"]),
        intermediate_size=int(raw["intermediate_size"]),
        num_hidden_layers=int(raw["num_hidden_layers"]),
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=int(head_dim),
        rms_norm_eps=eps,
        max_position_embeddings=int(raw.get("max_position_embeddings", 131072)),
        rope_theta=theta,
        rope_type=rope_type,
        rope_parameters=rope_params,
        use_bias=bool(raw.get("use_bias", False)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        bos_token_id=raw.get("bos_token_id", 1),
        eos_token_id=raw.get("eos_token_id", 2),
        pad_token_id=raw.get("pad_token_id", 0),
        synthetic=bool(raw.get("synthetic")),
    )


def load_config(path: str | Path) -> ErnieConfig:
    """Load `config.json` from a checkpoint directory (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"no config.json in {path}: pass a checkpoint directory that contains config.json")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file} is not valid JSON ({e}); re-download the checkpoint") from None
    return parse_config(raw)
