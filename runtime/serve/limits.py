"""Serving limits, stated once: what one engine (a server, or one Ray replica) admits and for how long.

In:  defaults here; overrides from `python -m runtime.serve` / `runtime.serve.ray` flags or `serve run` options.
Out: `LIMITS`: name -> (default, type, help); `add_arguments(ap)` for both command lines; `check(values)` refusing
     impossible values with an OptionError naming the option.
"""

from __future__ import annotations

import argparse

from runtime.core.errors import OptionError

LIMITS: dict[str, tuple[object, type, str]] = {
    "max_batch": (8, int, "rows decoded together"),
    "max_queue": (32, int, "requests waiting beyond the batch; more get 429"),
    "timeout": (300.0, float, "time budget per request, seconds"),
    "max_body": (1 << 20, int, "largest request body, bytes"),
    # 256 MiB: a 1,000-token prompt of the full-size 0.36B model holds 36 MB of float32 keys and values
    "prefix_cache_mb": (256.0, float, "memory for reusing prompt prefixes across requests, MiB (0 disables)"),
}
MINIMUM = {"max_batch": 1, "max_queue": 0, "timeout": 0.001, "max_body": 1, "prefix_cache_mb": 0}


def default(name: str):
    return LIMITS[name][0]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    for name, (value, kind, text) in LIMITS.items():
        ap.add_argument("--" + name.replace("_", "-"), type=kind, default=value, help=f"{text} (default %(default)s)")


def check(values: dict) -> None:
    """OptionError for the first limit below its minimum."""
    for name, least in MINIMUM.items():
        if name in values and values[name] < least:
            raise OptionError(name, f"must be >= {least}, got {values[name]}")
