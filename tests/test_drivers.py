"""The Node and browser drivers (drivers/) pass the artifact's golden check, and fail a falsified one.

In:  the tiny artifact fixture; node, drivers/{node,web}/node_modules and the system chromium
     (`make install-drivers`). The browser page is served with http.server on 127.0.0.1 (a free
     port, in a thread) and driven headless through drivers/web/run-headless.mjs (puppeteer-core).
Out: (a) drivers/node/check.mjs passes with agreement 1.0 and picks the golden ids; (b) the web page
     streams the golden ids and ends "passed"; (c) both report failure on a copy of the artifact whose
     golden.json has one greedy id changed. Missing tools skip locally but FAIL when CI=true.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from runtime.core.contract import file_entry

ROOT = Path(__file__).resolve().parents[1]
NODE_DIR, WEB_DIR = ROOT / "drivers" / "node", ROOT / "drivers" / "web"
TIMEOUT = 180  # seconds for one driver run (the tiny artifact takes a few)


def require(ok, reason: str) -> None:
    """Skip with `reason` when a tool is missing; in CI (CI=true) that is a failure: CI must run the drivers."""
    if ok:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}: CI=true, so the driver tests must run (`make install-drivers`)", pytrace=False)
    pytest.skip(f"{reason} (run `make install-drivers`)")


@pytest.fixture(scope="module")
def node() -> str:
    require(shutil.which("node"), "node is not on PATH")
    return shutil.which("node")


@pytest.fixture(scope="module")
def node_driver(node) -> list[str]:
    require((NODE_DIR / "node_modules" / "onnxruntime-node").is_dir(), "drivers/node/node_modules is missing")
    return [node, str(NODE_DIR / "check.mjs")]


@pytest.fixture(scope="module")
def browser(node) -> tuple[list[str], dict]:
    """The headless runner's command and environment (the system chromium)."""
    require((WEB_DIR / "node_modules" / "onnxruntime-web").is_dir() and (WEB_DIR / "node_modules" / "puppeteer-core").is_dir(),
            "drivers/web/node_modules is missing")
    require(shutil.which("chromium"), "chromium is not on PATH")
    return [node, str(WEB_DIR / "run-headless.mjs")], {**os.environ, "CHROMIUM_PATH": shutil.which("chromium")}


@pytest.fixture(scope="module")
def falsified(tiny_artifact, tmp_path_factory) -> Path:
    """A copy of the artifact whose golden.json has one greedy id changed (its manifest entry fixed to match)."""
    out = tmp_path_factory.mktemp("falsified") / "tiny"
    shutil.copytree(tiny_artifact, out)
    manifest = json.loads((out / "manifest.json").read_text())
    golden_path = out / manifest["files"]["golden"]["path"]
    golden = json.loads(golden_path.read_text())
    row = golden["cases"][0]["greedy_ids"][0]
    row[5] = (row[5] + 1) % manifest["model"]["dims"]["vocab_size"]
    golden_path.write_text(json.dumps(golden))
    manifest["files"]["golden"].update(file_entry(golden_path))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


@pytest.fixture(scope="module")
def server(tiny_artifact, falsified, tiny_quantized):
    """http://127.0.0.1:PORT serving the repository root, /good/ (the artifact), /bad/ (the falsified copy)
    and /int4/ (the int4 standard-op artifact)."""
    mounts = {"/good": Path(tiny_artifact), "/bad": falsified, "/int4": tiny_quantized[("int4", "standard")]}

    class Handler(http.server.SimpleHTTPRequestHandler):
        extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                          ".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm"}

        def translate_path(self, path):
            prefix = next((p for p in mounts if path.startswith(p + "/")), None)
            self.directory = str(mounts[prefix] if prefix else ROOT)
            return super().translate_path(path[len(prefix):] if prefix else path)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(10)


def golden_of(artifact: Path) -> dict:
    manifest = json.loads((artifact / "manifest.json").read_text())
    return json.loads((artifact / manifest["files"]["golden"]["path"]).read_text())


def run_node(cmd: list[str], artifact: Path) -> tuple[int, dict]:
    p = subprocess.run(cmd + ["--model", str(artifact), "--json"], capture_output=True, text=True, timeout=TIMEOUT)
    assert p.stdout.strip(), f"check.mjs printed nothing (exit {p.returncode}): {p.stderr[-2000:]}"
    return p.returncode, json.loads(p.stdout)


def run_page(browser: tuple[list[str], dict], url: str) -> dict:
    cmd, env = browser
    p = subprocess.run(cmd + [url, "--timeout", str(TIMEOUT - 30)], capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert p.returncode == 0 and p.stdout.strip(), f"the page did not finish (exit {p.returncode}): {p.stderr[-2000:]}"
    return json.loads(p.stdout)


def streamed_ids(text: str, golden: dict) -> dict:
    """The page's '<case> <step>: <id per row>' lines -> {case: [row][step]}."""
    ids = {c["name"]: [[] for _ in c["prompt_ids"]] for c in golden["cases"]}
    for line in text.strip().splitlines():
        head, tail = line.split(":")
        name, step = head.rsplit(" ", 1)
        for row, token in enumerate(tail.split()):
            assert len(ids[name][row]) == int(step), f"steps out of order in the stream at {line!r}"
            ids[name][row].append(int(token))
    return ids


def test_node_driver_passes_golden(node_driver, tiny_artifact):
    code, result = run_node(node_driver, tiny_artifact)
    golden = golden_of(tiny_artifact)
    assert code == 0 and result["passed"], result
    assert result["agreement"] == 1.0 and result["max_abs_logit_diff"] <= golden["tolerance"]
    assert [c["greedy_ids"] for c in result["cases"]] == [c["greedy_ids"] for c in golden["cases"]]


def test_web_page_streams_golden_ids(browser, server, tiny_artifact):
    page = run_page(browser, f"{server}/drivers/web/index.html?model=/good/")
    golden = golden_of(tiny_artifact)
    assert page["title"] == "passed" and page["status"].startswith("passed"), page["status"]
    assert page["result"]["agreement"] == 1.0
    want = {c["name"]: c["greedy_ids"] for c in golden["cases"]}
    assert streamed_ids(page["tokens"], golden) == want
    assert {c["name"]: c["greedy_ids"] for c in page["result"]["cases"]} == want


def test_node_driver_fails_a_falsified_golden(node_driver, falsified):
    code, result = run_node(node_driver, falsified)
    assert code == 1 and not result["passed"] and result["agreement"] < 1.0, result


def test_web_page_fails_a_falsified_golden(browser, server, falsified):
    page = run_page(browser, f"{server}/drivers/web/index.html?model=/bad/")
    assert page["title"] == "failed" and page["status"].startswith("failed"), page["status"]
    assert page["result"]["agreement"] < 1.0


@pytest.mark.parametrize("profile", [("int4", "standard"), ("int4", "ort"), ("int8", "standard")], ids="-".join)
def test_node_driver_runs_quantized_profiles(node_driver, tiny_quantized, profile):
    """The quantized graphs port: onnxruntime-node runs them with the manifest's session options alone and
    meets the tolerance and agreement the export measured for the shipped kernels."""
    _node_meets_its_golden(node_driver, tiny_quantized[profile])


def test_node_driver_runs_kv8_profile(node_driver, tiny_kv8):
    """The int4 profile with 8-bit key/value projections (q, k and v fed to GroupQueryAttention apart) ports too."""
    _node_meets_its_golden(node_driver, tiny_kv8["ort"])


def _node_meets_its_golden(node_driver, artifact):
    code, result = run_node(node_driver, artifact)
    golden = golden_of(artifact)
    assert code == 0 and result["passed"], result
    assert result["max_abs_logit_diff"] <= golden["tolerance"] and result["agreement"] >= golden["min_agreement"]


def test_web_page_runs_int4_standard(browser, server, tiny_quantized):
    """The int4 standard-op graphs (ai.onnx ops only) in onnxruntime-web's WebAssembly build."""
    page = run_page(browser, f"{server}/drivers/web/index.html?model=/int4/")
    golden = golden_of(tiny_quantized[("int4", "standard")])
    assert page["title"] == "passed" and page["status"].startswith("passed"), page["status"]
    assert page["result"]["agreement"] >= golden["min_agreement"]
