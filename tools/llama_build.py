"""llama.cpp for tools.peers: llama-cpp-python built for this CPU's instruction sets, its server extra, its GGUF
converter, and a smoke run of each quantized file before anything is measured with it.

In:  the peers cache directory (~/.cache/ernie-peers by default) and this CPU's flags (/proc/cpuinfo).
Out: llama-cpp-python LLAMA_CPP installed from a wheel in DIR/wheels/<key>/ (built there when missing: about 15
     minutes on 2 cores), <key> naming the CMake options it was built with (listed in CMAKE_ARGS beside it);
     llama.cpp's convert_hf_to_gguf.py from the same version's sdist; `smoke` raises `SmokeCrash`, one line saying
     what crashed, with which signal, and what to do, when a quantized file kills the process that runs it.

Why not llama-cpp-python's default build: it compiles ggml with -march=native (GGML_NATIVE=ON), which turns on
every extension the CPU lists, AMX included. On the Intel Xeons of these sessions q8_0 and q4_0 died with SIGILL
(exit 132) in ggml_backend_amx_mul_mat while f32 ran (FACTS.md). (Their VM runs AMX tile instructions only in a
process that asked Linux for them first, arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA): a 10-line probe's tileloadd
ran after it and died with SIGILL, exit 132, without it.) So the build names each ISA option the CPU has (ggml's
x86 options, as its ggml-cpu/CMakeLists.txt maps them onto compiler flags) and turns AMX off; with that q4_0
runs (REPACK stays on). Every non-AMX extension this derives on that Xeon (AVX-512 F/BW/VL/DQ/CD, VBMI, VNNI,
BF16, AVX-VNNI) ran in a probe there.
A CPU without x86 flags (ARM) keeps the native build. Wheels built for one set of options are never installed
for another: the key is a hash of the options.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Callable

from runtime.core.errors import Failure

LLAMA_CPP = "0.3.36"  # wheel and converter must come from the same llama.cpp

# ggml's CMake option -> the /proc/cpuinfo flags all of which it compiles for (GGML_AVX512 is -mavx512f -mavx512cd
# -mavx512vl -mavx512dq -mavx512bw). The AVX-512 extensions are turned on only with GGML_AVX512 itself.
ISA = {
    "GGML_SSE42": ("sse4_2",),
    "GGML_AVX": ("avx",),
    "GGML_AVX2": ("avx2",),
    "GGML_BMI2": ("bmi2",),
    "GGML_FMA": ("fma",),
    "GGML_F16C": ("f16c",),
    "GGML_AVX_VNNI": ("avx_vnni",),
    "GGML_AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "GGML_AVX512_VBMI": ("avx512vbmi",),
    "GGML_AVX512_VNNI": ("avx512_vnni",),
    "GGML_AVX512_BF16": ("avx512_bf16",),
}
AVX512_EXTENSIONS = ("GGML_AVX512_VBMI", "GGML_AVX512_VNNI", "GGML_AVX512_BF16")
AMX = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")  # always off: listed by VMs that do not grant it


class SmokeCrash(Failure):
    """A quantized file killed the llama.cpp process that ran it (a signal): the build, not the file, is at fault."""


def sh(cmd: list, log: Path, env: dict | None = None) -> None:
    """Run cmd with its output in `log`; raise with the log's last line when it fails."""
    with open(log, "w") as f:
        rc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc:
        last = (log.read_text(errors="replace").strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{log.stem} failed: {last} (log: {log})")


def cpu_flags(cpuinfo: str) -> set[str]:
    """The flags of the first CPU in /proc/cpuinfo's text; empty where it has no `flags` line (ARM: `Features`)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def cmake_args(flags: set[str]) -> list[str]:
    """CMAKE_ARGS for llama-cpp-python: native off, each ISA option ON where the CPU lists all its flags and OFF
    otherwise, AMX off. [] for a CPU without x86 flags: llama.cpp's native build."""
    if not flags:
        return []
    on = {option for option, needs in ISA.items() if flags.issuperset(needs)}
    if "GGML_AVX512" not in on:
        on -= set(AVX512_EXTENSIONS)
    return ["-DGGML_NATIVE=OFF", *(f"-D{o}={'ON' if o in on else 'OFF'}" for o in ISA), *(f"-D{o}=OFF" for o in AMX)]


def this_cpu_args() -> list[str]:
    try:
        return cmake_args(cpu_flags(Path("/proc/cpuinfo").read_text()))
    except OSError:
        return []


def wheel_dir(cache: Path, args: list[str]) -> Path:
    """Where wheels built with `args` live: DIR/wheels/<first 12 hex of their hash>, or DIR/wheels/native."""
    key = hashlib.sha256(" ".join(args).encode()).hexdigest()[:12] if args else "native"
    return cache / "wheels" / key


def install_llama_cpp(cache: Path) -> None:
    """llama-cpp-python LLAMA_CPP from the wheel built for this CPU's options (building it when missing). An
    installed LLAMA_CPP is kept as it is: `smoke` tells when it does not run here."""
    try:
        if importlib.metadata.version("llama-cpp-python") == LLAMA_CPP:
            return
    except importlib.metadata.PackageNotFoundError:
        pass
    args = this_cpu_args()
    wheels = wheel_dir(cache, args)
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob(f"llama_cpp_python-{LLAMA_CPP}-*.whl"))
    if not found:
        how = " ".join(args) or "its native build"
        print(f"building llama-cpp-python {LLAMA_CPP} (about 15 minutes on 2 cores) with {how}...", flush=True)
        (wheels / "CMAKE_ARGS").write_text(" ".join(args) + "\n")
        # --no-cache-dir: pip would otherwise reuse a wheel it built from the same sdist with other options
        sh([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", f"llama-cpp-python=={LLAMA_CPP}",
            "-w", wheels], cache / "build.log", env=os.environ | {"CMAKE_ARGS": " ".join(args)})
        found = sorted(wheels.glob(f"llama_cpp_python-{LLAMA_CPP}-*.whl"))
    sh([sys.executable, "-m", "pip", "install", found[-1]], cache / "install.log")


def install_llama_server(cache: Path) -> None:
    """llama.cpp's OpenAI-compatible server (tools.bench_serve's peer): the wheel's `server` extra, whose
    packages are pure Python (pip takes them from the registry and keeps the installed wheel)."""
    if importlib.util.find_spec("sse_starlette") is None or importlib.util.find_spec("starlette_context") is None:
        sh([sys.executable, "-m", "pip", "install", f"llama-cpp-python[server]=={LLAMA_CPP}"], cache / "server.log")


def converter(cache: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py with its conversion/ and gguf-py/ (it puts gguf-py on sys.path itself)."""
    root = cache / f"llama.cpp-{LLAMA_CPP}"
    script = root / "convert_hf_to_gguf.py"
    if script.exists():
        return script
    sdist = cache / "sdist" / f"llama_cpp_python-{LLAMA_CPP}.tar.gz"
    if not sdist.exists():
        sh([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP}", "--no-binary", ":all:",
            "--no-deps", "-d", sdist.parent], cache / "download.log")
    prefix = f"llama_cpp_python-{LLAMA_CPP}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()
                   and m.name[len(prefix):].partition("/")[0] in ("convert_hf_to_gguf.py", "conversion", "gguf-py")]
        for m in members:
            m.name = m.name[len(prefix):]
        tmp = root.parent / f"{root.name}.part"
        shutil.rmtree(tmp, ignore_errors=True)
        tar.extractall(tmp, members, filter="data")
    tmp.rename(root)
    return script


def _signal_of(returncode: int) -> int:
    """The signal that ended a process: Python reports -N, a shell 128 + N; 0 when none did."""
    return -returncode if returncode < 0 else returncode - 128 if 128 < returncode < 160 else 0


def smoke(files: dict[str, Path], cache: Path, command: Callable[[Path], list], timeout_s: float = 600) -> None:
    """Run `command(file)` for each file, output in <file's folder>/smoke-<kind>.log. A run killed by a signal
    raises SmokeCrash naming the file, the signal and the rebuild; any other failure raises Failure."""
    for kind, path in files.items():
        log = path.parent / f"smoke-{kind}.log"
        with open(log, "w") as out:
            try:
                rc = subprocess.run([str(c) for c in command(path)], stdout=out, stderr=subprocess.STDOUT,
                                    timeout=timeout_s).returncode
            except subprocess.TimeoutExpired:
                raise Failure(f"the smoke run of {path.name} took over {timeout_s:.0f} s (log: {log})") from None
        if signum := _signal_of(rc):
            args = this_cpu_args()
            name = signal.Signals(signum).name if signum in signal.valid_signals() else f"signal {signum}"
            raise SmokeCrash(
                f"llama.cpp crashed on its smoke run of {path.name}: killed by {name} (exit {128 + signum}); the "
                f"installed llama-cpp-python uses instructions this CPU does not run (e.g. a -march=native build with "
                f"AMX). Run `pip uninstall -y llama-cpp-python`, delete {wheel_dir(cache, args)}, and run setup "
                f"again: it rebuilds with CMAKE_ARGS=\"{' '.join(args)}\" (log: {log})")
        if rc:
            last = (log.read_text(errors="replace").strip().splitlines() or ["no output"])[-1]
            raise Failure(f"the smoke run of {path.name} failed (exit {rc}): {last} (log: {log})")
