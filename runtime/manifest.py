"""The artifact contract: `manifest.json`, validated before anything else is loaded.

In:  an artifact directory written by `python -m ernie_export`.
Out: the manifest dict, after checking its format and version, that every listed file exists
     with the recorded size and (optionally) SHA-256. `ArtifactError` says what is wrong and
     what to do. This module is shared by the exporter (which writes it) and the runtime.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

FORMAT = "ernie4_5-onnx"
FORMAT_VERSION = 1  # bump on any change of graph I/O names, dtypes, shapes or file layout
MANIFEST = "manifest.json"
REQUIRED_FILES = ("prefill", "decode", "weights", "tokenizer", "generation")


class ArtifactError(RuntimeError):
    """An artifact directory the runtime must not use; the message says what to do."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def load_manifest(directory: str | Path, verify_hashes: bool = True) -> dict:
    """Read and validate `manifest.json` of an artifact directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"artifact directory {directory} does not exist: run `make export` (or `python -m ernie_export`) first")
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} has no {MANIFEST}: it is not a complete artifact; re-run the export")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); re-run the export") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not an {FORMAT} manifest (format={manifest.get('format')!r}); re-run the export")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"artifact format version {version!r} is not supported by this runtime (it reads version "
                            f"{FORMAT_VERSION}); re-export with a matching ernie_export or upgrade the runtime")
    files = manifest.get("files", {})
    missing_roles = [r for r in REQUIRED_FILES if r not in files]
    if missing_roles:
        raise ArtifactError(f"{path} lists no {', '.join(missing_roles)} file; re-run the export")
    for role, entry in files.items():
        f = directory / entry["path"]
        if not f.is_file():
            raise ArtifactError(f"artifact file {f} ({role}) is missing; re-run the export or restore the file")
        if f.stat().st_size != entry["size"]:
            raise ArtifactError(f"artifact file {f} has {f.stat().st_size} bytes, the manifest says {entry['size']}: "
                                "it is truncated or modified; re-run the export or restore the file")
        if verify_hashes and sha256_file(f) != entry["sha256"]:
            raise ArtifactError(f"artifact file {f} does not match its SHA-256 in the manifest: it is corrupt or "
                                "modified; re-run the export or restore the file")
    return manifest
