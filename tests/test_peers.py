"""tools.peers setup's llama.cpp build and smoke run (tools/llama_build.py), without building llama.cpp.

Guards issue 31, item 6: llama-cpp-python's default build (-march=native) compiled AMX kernels that the Xeon VMs
of these sessions do not run, and q8_0 / q4_0 died with SIGILL (exit 132) while setup reported success. Checks:
the CMake options derived from /proc/cpuinfo flag lines of three kinds of CPU (AMX always off, AVX-512 extensions
only with AVX-512 itself), the wheel cache keyed by them, and a smoke run killed by a signal ending `setup` with
one `error:` line (what crashed, the signal, the rebuild, the wheel directory) and exit 1, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.core.errors import Failure
from tools import llama_build as L
from tools import peers

# `flags` lines of /proc/cpuinfo. Zen 4 has AVX-512 with VNNI / BF16 / VBMI but no AVX-VNNI (the VEX form).
EPYC = ("fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall "
        "nx mmxext fxsr_opt pdpe1gb rdtscp lm rep_good nopl cpuid extd_apicid tsc_known_freq pni pclmulqdq ssse3 fma "
        "cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy "
        "cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw topoext perfctr_core invpcid_single ssbd ibrs ibpb "
        "stibp vmmcall fsgsbase bmi1 avx2 smep bmi2 erms invpcid avx512f avx512dq rdseed adx smap avx512ifma "
        "clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves avx512_bf16 clzero "
        "xsaveerptr wbnoinvd arat avx512vbmi umip pku ospke avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni "
        "avx512_bitalg avx512_vpopcntdq rdpid fsrm")
# Sapphire Rapids in a VM (these sessions' Xeon): lists amx_tile / amx_int8 / amx_bf16 and AVX-VNNI.
XEON = ("fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss ht "
        "syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid tsc_known_freq pni "
        "pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c "
        "rdrand hypervisor lahf_lm abm 3dnowprefetch cpuid_fault fsgsbase tsc_adjust bmi1 hle avx2 smep bmi2 erms "
        "invpcid rtm avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl "
        "xsaveopt xsavec xgetbv1 xsaves avx_vnni avx512_bf16 arat avx512vbmi umip avx512_vbmi2 gfni vaes vpclmulqdq "
        "avx512_vnni avx512_bitalg avx512_vpopcntdq rdpid cldemote movdiri movdir64b fsrm serialize tsxldtrk "
        "amx_bf16 avx512_fp16 amx_tile amx_int8 arch_capabilities")
# Haswell: AVX2, FMA, F16C, BMI2, no AVX-512.
AVX2_ONLY = ("fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush dts acpi mmx fxsr sse "
             "sse2 ss ht tm pbe syscall nx pdpe1gb rdtscp lm constant_tsc arch_perfmon pebs bts rep_good nopl "
             "xtopology nonstop_tsc cpuid aperfmperf pni pclmulqdq dtes64 monitor ds_cpl vmx est tm2 ssse3 sdbg fma "
             "cx16 xtpr pdcm pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand lahf_lm abm "
             "cpuid_fault epb invpcid_single pti fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid xsaveopt dtherm "
             "ida arat pln pts")
# Knights Landing: AVX-512 F and CD but not BW / VL / DQ, which ggml's GGML_AVX512 compiles for.
XEON_PHI = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c bmi2 avx512f avx512cd avx512er avx512pf avx512_vnni"


def options(flags: str) -> dict[str, str]:
    """cmake_args as {option: ON/OFF}, checking each is a -D definition."""
    args = L.cmake_args(L.cpu_flags(f"processor\t: 0\nflags\t\t: {flags}\nbogomips\t: 5199.99\n"))
    assert all(a.startswith("-D") and a.count("=") == 1 for a in args), args
    return dict(a[2:].split("=") for a in args)


AMX_OFF = {"GGML_AMX_TILE": "OFF", "GGML_AMX_INT8": "OFF", "GGML_AMX_BF16": "OFF"}


def test_epyc_gets_avx512_with_vnni_bf16_vbmi_and_no_amx():
    got = options(EPYC)
    assert got["GGML_NATIVE"] == "OFF"
    assert {k: got[k] for k in ("GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_BMI2", "GGML_AVX512", "GGML_AVX512_VNNI",
                                "GGML_AVX512_BF16", "GGML_AVX512_VBMI")} == dict.fromkeys(
        ("GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_BMI2", "GGML_AVX512", "GGML_AVX512_VNNI", "GGML_AVX512_BF16",
         "GGML_AVX512_VBMI"), "ON")
    assert got["GGML_AVX_VNNI"] == "OFF"  # Zen 4 lists no avx_vnni
    assert AMX_OFF.items() <= got.items()


def test_xeon_that_lists_amx_gets_every_isa_but_amx():
    got = options(XEON)
    assert "amx_tile" in XEON and "amx_int8" in XEON  # the CPU says it has AMX ...
    assert AMX_OFF.items() <= got.items()              # ... and the build leaves it out
    assert got["GGML_NATIVE"] == "OFF"                 # -march=native would turn it back on
    assert all(got[o] == "ON" for o in L.ISA), {o: got[o] for o in L.ISA if got[o] != "ON"}


def test_avx2_only_cpu_gets_no_avx512():
    got = options(AVX2_ONLY)
    assert got["GGML_AVX2"] == got["GGML_FMA"] == got["GGML_F16C"] == got["GGML_SSE42"] == "ON"
    assert all(got[o] == "OFF" for o in ("GGML_AVX512", *L.AVX512_EXTENSIONS, "GGML_AVX_VNNI"))
    assert AMX_OFF.items() <= got.items()


def test_avx512_extensions_need_the_whole_avx512_base():
    got = options(XEON_PHI)  # avx512f and avx512_vnni listed, avx512bw / vl / dq not
    assert got["GGML_AVX512"] == "OFF" and got["GGML_AVX512_VNNI"] == "OFF"
    assert options(XEON_PHI + " avx512bw avx512vl avx512dq")["GGML_AVX512_VNNI"] == "ON"  # control: base complete


def test_no_x86_flags_keeps_the_native_build_and_its_own_wheel_directory(tmp_path):
    arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics\nCPU implementer\t: 0x41\n"
    assert L.cpu_flags(arm) == set() and L.cmake_args(set()) == []
    assert L.wheel_dir(tmp_path, []) == tmp_path / "wheels" / "native"
    xeon, epyc = L.cmake_args(L.cpu_flags(f"flags : {XEON}")), L.cmake_args(L.cpu_flags(f"flags : {EPYC}"))
    assert L.wheel_dir(tmp_path, xeon) == L.wheel_dir(tmp_path, list(xeon))  # same options, same wheels
    assert L.wheel_dir(tmp_path, xeon) != L.wheel_dir(tmp_path, epyc)        # a wheel is never used for others


def dies_with_sigill(path) -> list:
    return [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"]


def test_a_smoke_run_killed_by_sigill_is_a_smoke_crash_with_what_to_do(tmp_path):
    gguf = tmp_path / "q4_0.gguf"
    gguf.touch()
    with pytest.raises(L.SmokeCrash) as crash:
        L.smoke({"q4_0": gguf}, tmp_path, dies_with_sigill)
    line = crash.value.cli_line()
    assert "\n" not in line and line.startswith("error: ")
    for part in ("q4_0.gguf", "SIGILL", "exit 132", "pip uninstall", str(tmp_path / "wheels"), "CMAKE_ARGS",
                 "smoke-q4_0.log"):
        assert part in line, (part, line)
    with pytest.raises(L.SmokeCrash, match="SIGILL"):  # a shell reports the same crash as 128 + 4
        L.smoke({"q4_0": gguf}, tmp_path, lambda p: ["sh", "-c", "exit 132"])


def test_a_smoke_run_that_fails_without_a_signal_or_passes(tmp_path):
    gguf = tmp_path / "q8_0.gguf"
    gguf.touch()
    L.smoke({"q8_0": gguf}, tmp_path, lambda p: [sys.executable, "-c", "print('fine')"])  # control: no error
    with pytest.raises(Failure) as failed:
        L.smoke({"q8_0": gguf}, tmp_path, lambda p: [sys.executable, "-c", "print('boom'); raise SystemExit(3)"])
    assert not isinstance(failed.value, L.SmokeCrash)
    assert "exit 3" in str(failed.value) and "boom" in str(failed.value)


def test_setup_ends_with_one_error_line_when_a_quantized_file_crashes(tmp_path, monkeypatch, capsys):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    (checkpoint / "model.safetensors").write_bytes(b"")
    made = []

    def fake_ggufs(peer, work, cache):
        files = {kind: work / f"{kind}.gguf" for kind in ("f32", *peers.QUANTS)}
        for path in files.values():
            path.write_bytes(b"GGUF")
        made.append(files)
        return files

    for step in ("install_llama_cpp", "install_llama_server"):
        monkeypatch.setattr(peers, step, lambda cache: None)
    monkeypatch.setattr(peers, "peer_checkpoint", lambda checkpoint, out: out)
    monkeypatch.setattr(peers, "make_ggufs", fake_ggufs)
    monkeypatch.setattr(peers, "make_genai", lambda *a: pytest.fail("setup went on past the crash"))
    monkeypatch.setattr(peers, "smoke_command", dies_with_sigill)
    rc = peers.main(["setup", "--checkpoint", str(checkpoint), "--cache", str(tmp_path / "cache")])
    out, err = capsys.readouterr()
    assert rc == 1 and made
    assert err.count("\n") == 1 and err.startswith("error: llama.cpp crashed") and "SIGILL" in err, err
    assert "q8_0.gguf" in err  # the first quantized file run
    assert "Traceback" not in out + err
    assert not (tmp_path / "cache" / "peers.json").exists()  # nothing listed as ready


def test_smoke_command_runs_the_llama_worker_on_the_file():
    cmd = [str(c) for c in peers.smoke_command(Path("/x/q8_0.gguf"))]
    assert cmd[:3] == [sys.executable, "-m", "tools.peers"] and cmd[cmd.index("--model") + 1] == "/x/q8_0.gguf"
    assert cmd[cmd.index("--worker") + 1] == "llama"


class FakeLlamaCpp:
    """The few llama.cpp calls tools.llama_batch makes, over a fake model whose logits at a batch index are a one-hot
    of (that token's id + its position + 1): so each row's greedy ids tell which token and position the worker fed."""
    VOCAB = 64

    def __init__(self):
        self.decoded: list[list[tuple[int, int, int, int]]] = []
        self.logits: dict[int, np.ndarray] = {}

    def llama_batch_init(self, n, embd, seqs):
        class Batch:
            pass
        b = Batch()
        b.n_tokens, b.token, b.pos, b.n_seq_id, b.logits = 0, [0] * n, [0] * n, [0] * n, [0] * n
        b.seq_id = [[0] for _ in range(n)]
        return b

    def llama_batch_free(self, batch):
        pass

    def llama_memory_clear(self, memory, data):
        pass

    def llama_get_memory(self, ctx):
        return None

    def llama_synchronize(self, ctx):
        pass

    def llama_decode(self, ctx, b):
        rows = [(b.token[i], b.pos[i], b.seq_id[i][0], b.logits[i]) for i in range(b.n_tokens)]
        self.decoded.append(rows)
        self.logits = {i: np.eye(self.VOCAB, dtype=np.float32)[(t + p + 1) % self.VOCAB]
                       for i, (t, p, _, want) in enumerate(rows) if want}
        return 0

    def llama_get_logits_ith(self, ctx, i):
        return self.logits[i]  # KeyError: logits read at an index the worker did not ask for


def test_batched_llama_feeds_each_row_its_own_sequence_and_reads_its_own_logits(monkeypatch):
    """tools.llama_batch (llama.cpp's batch > 1 rows): every prompt token goes to its row's sequence at its position,
    logits are asked for only at each row's last prompt position and then at every decode token, and each row's
    greedy ids follow from its own logits. Negative control: a worker reading the last row's logits for every row
    (one index for the whole batch, as the batch-1 worker's `llama_get_logits_ith(ctx, -1)`) gives other ids."""
    from tools import llama_batch

    monkeypatch.setattr(np.ctypeslib, "as_array", lambda logits, shape: logits)
    fake = FakeLlamaCpp()
    prompts = [[3, 5, 7], [11, 13, 17]]
    _, ids = llama_batch.run_batched((fake, None, None, fake.VOCAB, 0.0), prompts, 3)
    prompt_batch, *steps = fake.decoded
    assert prompt_batch == [(t, p, r, int(p == 2)) for r, row in enumerate(prompts) for p, t in enumerate(row)]
    assert [[(pos, seq) for _, pos, seq, _ in s] for s in steps] == [[(3, 0), (3, 1)], [(4, 0), (4, 1)]]
    expected = []
    for row in prompts:  # token t at position p -> next id t + p + 1
        out = [row[-1] + 2 + 1]
        for pos in (3, 4):
            out.append(out[-1] + pos + 1)
        expected.append(out)
    assert ids == expected
    monkeypatch.setattr(llama_batch, "_argmax", lambda lc, ctx, index, vocab: int(lc.logits[max(lc.logits)].argmax()))
    _, wrong = llama_batch.run_batched((fake, None, None, fake.VOCAB, 0.0), prompts, 3)
    assert wrong != expected
