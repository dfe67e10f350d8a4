"""The export profile: how an artifact's graphs were built, as named data, in ONE place.

In:  a preset name (`--profile cpu`) and a user's overriding flags; or a published manifest.
Out: `Profile` (frozen), resolved to every field an export needs: `Profile.preset(name).override(**flags).resolved(hidden)`;
     `to_manifest()` -> the manifest's `dtype` and `profile` fields; `Profile.from_manifest(manifest)` -> the same
     object back (round trip tested); `label()` -> the preset's name, or the flags that differ from it.

Everything that follows from a profile alone lives here: its defaults, the KV-cache kind it implies, whether ONNX
Runtime prepacks its weights, the op domains it needs. The export (`ernie_export`), re-verification, `make profiles`,
the benchmarks and the runtime all read profiles through this module. Torch-free: the runtime imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from runtime.core.contract import CONCAT, KV_CACHE_KINDS, SHARED_BUFFER, SHARED_BUFFER_VT, SHARED_KINDS
from runtime.core.errors import OptionError

DTYPES = ("float32", "float16", "bfloat16")
QUANTIZATIONS = {"none": None, "int8": 8, "int4": 4}
OPS = ("standard", "ort")
BLOCK_SIZES = (16, 32, 64, 128, 256)
DEFAULT_BLOCK_SIZE = 32
TABLE_BITS = (4, 8)
DEFAULT_TABLE_BITS = 8  # as llama.cpp keeps its q4_0 files' table at 6 bits (measured: graph/quantize.py)
KV_BITS = (4, 8)
ORT_DOMAIN = "com.microsoft"
# In the int4 profile an 8-bit table (and 8-bit k/v projections) use blocks of up to this many inputs: onnxruntime's
# int8-activation kernel stores a float32 scale and block sum per block (measured: graph/quantize.py).
WIDE_BLOCK_8BIT = 128


@dataclass(frozen=True)
class Profile:
    """Weights, ops and KV cache of an artifact's graphs. None: "the rule" (resolved() fills it in)."""
    dtype: str = "float32"
    quantization: str = "none"
    block_size: int | None = None  # inputs per scale of the linear layers (quantized profiles)
    ops: str = "standard"  # standard: ai.onnx only; ort: onnxruntime's contrib kernels
    table_bits: int | None = None  # the embedding / LM-head table's bits (quantized profiles)
    table_block: int | None = None  # its block size
    kv_bits: int | None = None  # the k/v projections' bits
    kv_block: int | None = None  # their block size
    kv_cache: str | None = None  # the manifest's KV-cache kind

    @property
    def bits(self) -> int | None:
        return QUANTIZATIONS.get(self.quantization)

    # -- building one -------------------------------------------------------------------------------------------
    @staticmethod
    def preset(name: str) -> "Profile":
        if name not in PRESETS:
            raise OptionError("profile", f"{name!r} is not a preset: use one of {', '.join(PRESETS)}")
        return PRESETS[name].profile

    def override(self, **flags) -> "Profile":
        """This profile with every flag that is not None replacing its field (a user's flags over a preset)."""
        unknown = set(flags) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"not profile fields: {sorted(unknown)}")
        return replace(self, **{k: v for k, v in flags.items() if v is not None})

    def check(self) -> None:
        """OptionError naming the first field whose value cannot be built."""
        # field -> (the option's name where it is given: `--quantize` sets `quantization`, allowed values)
        choices = {"dtype": ("dtype", DTYPES), "quantization": ("quantize", tuple(QUANTIZATIONS)), "ops": ("ops", OPS),
                   "kv_cache": ("kv_cache", KV_CACHE_KINDS)}
        for field, (option, allowed) in choices.items():
            if getattr(self, field) is not None and getattr(self, field) not in allowed:
                raise OptionError(option, f"{getattr(self, field)!r} is not supported: use one of {', '.join(allowed)}")
        if self.bits:
            for option, allowed in (("block_size", BLOCK_SIZES), ("table_bits", TABLE_BITS), ("kv_bits", KV_BITS)):
                if getattr(self, option) is not None and getattr(self, option) not in allowed:
                    raise OptionError(option, f"{getattr(self, option)} is not supported: use one of "
                                              f"{', '.join(map(str, allowed))}")
            if self.dtype == "bfloat16":
                raise OptionError("dtype", "bfloat16 cannot be quantized (the scales would be bfloat16, which the CPU "
                                           "kernels lack): use --dtype float32 or float16 with --quantize")
        if self.kv_cache in SHARED_KINDS and self.ops != "ort":
            raise OptionError("kv_cache", f"{self.kv_cache} needs --ops ort (onnxruntime's GroupQueryAttention writes it)")
        if self.kv_cache == SHARED_BUFFER_VT and self.dtype != "float32":
            raise OptionError("kv_cache", f"{SHARED_BUFFER_VT} is for float32 graphs (the CPU profiles): use "
                                          f"--kv-cache {SHARED_BUFFER} with --dtype {self.dtype}")

    def resolved(self, hidden: int) -> "Profile":
        """Every rule applied (the checkpoint's hidden size decides the wide blocks): what is exported and recorded."""
        self.check()
        kv_cache = self.kv_cache or default_kv_cache(self.ops, self.dtype)
        if not self.bits:
            return Profile(self.dtype, self.quantization, None, self.ops, kv_cache=kv_cache)
        block = self.block_size or DEFAULT_BLOCK_SIZE
        table_bits = self.table_bits or DEFAULT_TABLE_BITS
        kv_bits = self.kv_bits or self.bits
        wide = wide_block(hidden, block)
        table_block = self.table_block or (wide if table_bits == 8 and self.bits == 4 else block)
        kv_block = self.kv_block or (wide if self.bits == 4 and kv_bits == 8 else block)
        return Profile(self.dtype, self.quantization, block, self.ops, table_bits, table_block, kv_bits, kv_block,
                       kv_cache)

    # -- the manifest ---------------------------------------------------------------------------------------------
    def to_manifest(self) -> dict:
        """The manifest's `profile` section (a resolved profile; the dtype is the manifest's top-level `dtype`)."""
        return {"quantization": self.quantization, "block_size": self.block_size, "table_bits": self.table_bits,
                "table_block_size": self.table_block, "kv_bits": self.kv_bits, "kv_block_size": self.kv_block,
                "ops": self.ops, "kv_cache": self.kv_cache}

    @classmethod
    def from_manifest(cls, manifest: dict) -> "Profile":
        p = manifest["profile"]
        quantized = p["quantization"] != "none"
        # artifacts from before table_block_size / kv_bits were recorded used the layers' blocks and bits
        return cls(manifest["dtype"], p["quantization"], p.get("block_size"), p["ops"], p.get("table_bits"),
                   p.get("table_block_size", p.get("block_size")) if quantized else None,
                   p.get("kv_bits", QUANTIZATIONS[p["quantization"]]) if quantized else None,
                   p.get("kv_block_size", p.get("block_size")) if quantized else None, p["kv_cache"])

    # -- what follows from it -------------------------------------------------------------------------------------
    @property
    def prepacks(self) -> bool:
        """Whether ONNX Runtime prepacks the weights at load (each session then keeps its own packed copy, so the
        runtime opens the decode session only). Quantized weights must be: MatMulNBits decodes ~60x slower unpacked
        (1.9 vs 115 steps/s measured, full-size int4). Float32 shared-buffer graphs decode faster packed: 36.0 vs
        30.6 tok/s (in-process A/B, full size), the split LM head (graph/lm_head.py) keeping peak RSS at 1.08x the
        weights. A float32 concat artifact keeps its two sessions over one mapped copy (prepacking off), and
        float16 / bfloat16 graphs are the GPU's."""
        return bool(self.bits) or (self.dtype == "float32" and self.kv_cache in SHARED_KINDS)

    @property
    def op_domains(self) -> list[str]:
        return ["ai.onnx", ORT_DOMAIN] if self.ops == "ort" else ["ai.onnx"]

    def label(self, hidden: int | None = None) -> str:
        """The preset's name when this is exactly a preset (resolved at `hidden`, when given), else a flag string
        such as `int4-ort-b64-kv8` (quantization-ops[-b<block>][-kv<bits>][-t<table bits>], float16 prefixed)."""
        for name, preset in PRESETS.items():
            if self == preset.profile or (hidden and self == preset.profile.resolved(hidden)):
                return name
        parts = [self.quantization if self.bits else self.dtype, self.ops]
        if self.bits and self.block_size != DEFAULT_BLOCK_SIZE:
            parts.append(f"b{self.block_size}")
        if self.bits and self.kv_bits not in (None, self.bits):
            parts.append(f"kv{self.kv_bits}")
        if self.bits and self.table_bits not in (None, DEFAULT_TABLE_BITS):
            parts.append(f"t{self.table_bits}")
        if self.bits and self.dtype != "float32":
            parts.insert(0, self.dtype)
        if self.kv_cache not in (None, default_kv_cache(self.ops, self.dtype)):
            parts.append(self.kv_cache)
        return "-".join(parts)


def default_kv_cache(ops: str, dtype: str) -> str:
    """The KV-cache kind when none is asked for. `--ops ort` attends with onnxruntime's GroupQueryAttention over a
    shared, preallocated buffer: no cache copy per step. In float32 (the CPU profiles) its values are stored
    transposed and decode steps attend grouped (ernie_export.graph.attention); float16 / bfloat16 (the GPU's) keep
    the kernel alone. Standard ops: the growing concat cache."""
    if ops != "ort":
        return CONCAT
    return SHARED_BUFFER_VT if dtype == "float32" else SHARED_BUFFER


def wide_block(inputs: int, block: int) -> int:
    """An 8-bit weight's block size in the int4 profile: the largest block size up to WIDE_BLOCK_8BIT (or the
    layers', if larger) that divides its input size."""
    return max((b for b in BLOCK_SIZES if b <= max(WIDE_BLOCK_8BIT, block) and inputs % b == 0), default=block)


@dataclass(frozen=True)
class Preset:
    profile: Profile
    target: str  # what it is for, one line (README's "Choose a profile" table and `--help`)


# What users deploy. `--profile NAME` starts from one; individual flags override its fields.
PRESETS = {
    "reference": Preset(Profile(), "float32, standard ops, growing cache: the parity reference; any ONNX runtime"),
    "cpu": Preset(Profile(quantization="int4", block_size=128, ops="ort", kv_bits=8),
                  "CPUs (recommended): int4 in blocks of 128, 8-bit k/v and table, onnxruntime's fused kernels"),
    "cpu-int8": Preset(Profile(quantization="int8", ops="ort"), "CPUs, closer to float32: int8 in blocks of 32"),
    "cpu-float32": Preset(Profile(ops="ort"), "CPUs, float32 weights with onnxruntime's fused attention"),
    "portable": Preset(Profile(quantization="int4", ops="standard"),
                       "any ONNX runtime (onnxruntime-web too): int4 with standard ops only"),
    "gpu": Preset(Profile(dtype="float16", ops="ort"), "CUDA: float16 with onnxruntime's fused attention"),
}
