"""The OpenAI-compatible server: the official `openai` client as a real client, continuous batching
under load (greedy results equal solo runs), bounded queue, disconnects, time budgets, bad input,
API keys. Loopback only, bounded request counts and times."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from contextlib import contextmanager

import httpx
import pytest

from runtime.generate import api as G
from runtime.serve.engine import Engine, QueueFull, prefill_groups
from runtime.serve.app import BodyLimit, create_app

MAX = 12  # new tokens per request in these tests


@contextmanager
def serving(gen, *, max_batch=8, max_queue=32, api_key=None, timeout_s=60.0, max_body=1 << 16, start=True):
    import uvicorn

    engine = Engine(gen, max_batch, max_queue)
    if start:
        engine.start()
    app = BodyLimit(create_app(lambda: engine, "tiny", api_key, timeout_s, max_body), max_body)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        if start:
            engine.stop()


def solo(gen, text, chat=False):
    opts = gen.options(max_new_tokens=MAX, temperature=0)
    [r] = G.generate(gen, [G.encode_prompt(gen, text, chat=chat)], opts)
    return r


def client(url, **kw):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=kw.pop("api_key", "none"), max_retries=0, timeout=60, **kw)


def test_openai_client_completions_and_chat(server, gen):
    url, _ = server
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    r = c.completions.create(model="tiny", prompt="Hello world", max_tokens=MAX, temperature=0)
    expected = solo(gen, "Hello world")
    assert r.choices[0].text == expected.text and r.usage.completion_tokens == len(expected.token_ids)
    assert r.choices[0].finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi there"}],
                                     max_tokens=MAX, temperature=0)
    assert chat.choices[0].message.content == solo(gen, "Hi there", chat=True).text
    assert chat.usage.prompt_tokens == len(G.encode_prompt(gen, "Hi there", chat=True))


def test_openai_client_streaming(server, gen):
    url, _ = server
    c = client(url)
    pieces = [ch.choices[0].text for ch in c.completions.create(model="tiny", prompt="The capital of France is",
                                                                max_tokens=MAX, temperature=0, stream=True)]
    assert "".join(pieces) == solo(gen, "The capital of France is").text
    deltas = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=MAX, temperature=0, stream=True)]
    assert "".join(deltas) == solo(gen, "Hi", chat=True).text


def test_sse_wire_format_ends_with_done(server):
    url, _ = server
    with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "stream": True},
                      timeout=60) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]"
    final = json.loads(lines[-2][len("data: "):])
    assert final["choices"][0]["finish_reason"] in ("stop", "length") and final["usage"]["completion_tokens"] >= 1


PROMPTS = ["Hello world", "The capital of France is", "def hello(name):", "Numbers 0 1 2",
           "ERNIE 4.5 is", "Über Größe", "你好，世界", "Export it to ONNX"]


def test_load_greedy_results_equal_solo_runs(server, gen):
    """32 requests from 8 concurrent clients: all complete, nothing lost, each equals its solo run."""
    url, engine = server
    expected = {p: solo(gen, p).text for p in PROMPTS}
    before = engine.counters["requests_completed"]

    def one(i):
        prompt = PROMPTS[i % len(PROMPTS)]
        r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": MAX, "temperature": 0},
                       timeout=120)
        return prompt, r.status_code, r.json()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(32)))
    assert all(code == 200 for _, code, _ in results)
    assert all(body["choices"][0]["text"] == expected[p] for p, _, body in results)
    assert engine.counters["requests_completed"] - before == 32
    # requests really shared the batch; how many at once depends on arrival timing on 2 busy cores (a clean-clone
    # CI run saw a peak of 3 once); rows joining a running batch are pinned deterministically in test_quantize
    assert engine.counters["peak_batch"] >= 2, "requests really shared the batch (joined a running one)"
    assert engine.metrics()["batch_size"] == 0


def test_rows_joining_a_running_batch_equal_solo_runs(gen):
    """Deterministic continuous batching: B joins while A is mid-generation, C after A left."""
    engine = Engine(gen, max_batch=4, max_queue=8)
    opts = gen.options(max_new_tokens=MAX, temperature=0)
    done = {}

    def emit_for(name):
        return lambda kind, payload: done.__setitem__(name, payload) if kind in ("done", "error") else None

    prompts = {name: G.encode_prompt(gen, text) for name, text in zip("ABC", PROMPTS)}
    engine.submit(prompts["A"], opts, emit_for("A"))
    for _ in range(3):  # the engine's thread is not started: drive its loop here, step by step
        engine.run_once()
    engine.submit(prompts["B"], opts, emit_for("B"))
    while "A" not in done:
        engine.run_once()
    assert "B" not in done, "B joined a running batch and is still running after A left"
    engine.submit(prompts["C"], opts, emit_for("C"))
    while len(done) < 3:
        engine.run_once()
    for name, text in zip("ABC", PROMPTS):
        assert done[name].token_ids == solo(gen, text).token_ids, name


def test_bounded_queue_refuses_at_once(gen):
    engine = Engine(gen, max_batch=1, max_queue=1)  # not started: nothing leaves the queue
    opts = gen.options(max_new_tokens=4)
    engine.submit([5, 6, 7], opts, lambda *a: None)
    with pytest.raises(QueueFull, match="busy"):
        engine.submit([5, 6, 7], opts, lambda *a: None)
    with serving(gen, max_batch=1, max_queue=0, start=False) as (url, _):
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 4}, timeout=30)
        assert r.status_code == 429 and r.json()["error"]["type"] == "server_busy" and r.headers["retry-after"]
        assert time.perf_counter() - t0 < 5


def test_client_disconnect_frees_its_row(server):
    url, engine = server
    before = engine.counters["requests_cancelled"]
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                      json={"prompt": "Hello", "max_tokens": 2000, "stream": True, "temperature": 0}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # read one chunk, then hang up
    deadline = time.time() + 20
    while engine.counters["requests_cancelled"] == before and time.time() < deadline:
        time.sleep(0.05)
    assert engine.counters["requests_cancelled"] == before + 1
    while engine.metrics()["batch_size"] and time.time() < deadline:
        time.sleep(0.05)
    assert engine.metrics()["batch_size"] == 0


def test_time_budget_is_a_clear_error(gen):
    with serving(gen, timeout_s=0.0) as (url, _):
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 50}, timeout=30)
    assert r.status_code == 504 and "exceeded its time budget" in r.json()["error"]["message"]


@pytest.mark.parametrize("payload, status, message", [
    (b"{not json", 400, ""),
    ({"prompt": 5, "max_tokens": 4}, 400, "prompt"),
    ({"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 10**6}, 400, "exceeds the model's context"),
    ({"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": ""}]}, 400, "content"),
    ({"prompt": "x" * 70000}, 413, "exceeds 65536 bytes"),
])
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server, payload, status, message):
    url, _ = server
    path = "/v1/chat/completions" if isinstance(payload, dict) and "messages" in payload else "/v1/completions"
    kw = {"content": payload} if isinstance(payload, bytes) else {"json": payload}
    r = httpx.post(f"{url}{path}", headers={"content-type": "application/json"}, timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param"} and message in err["message"] + str(err["param"])
    assert httpx.get(f"{url}/health", timeout=10).json() == {"status": "ok"}


def test_message_content_is_data_not_template(server, gen):
    url, _ = server
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "{{ 7 * 7 }}"}], "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(
        G.encode_prompt(gen, "{{ 7 * 7 }}", chat=True))


def test_api_key(gen):
    with serving(gen, api_key="s3cret") as (url, _):
        assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        r = client(url, api_key="s3cret").completions.create(model="tiny", prompt="Hi", max_tokens=2)
        assert r.choices[0].text is not None


def test_metrics_are_prometheus_text(server):
    url, _ = server
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for name in ("ernie_queue_depth", "ernie_batch_size", "ernie_tokens_per_s"):
        assert f"\n{name} " in "\n" + text


def test_prefill_groups_bound_padding_shortest_first():
    """A burst is prefilled shortest first, a group taking a longer prompt only while padding stays within 20%:
    the serving benchmark's 25-43-token prompts as one padded batch spent 38% of their compute on padding."""
    assert prefill_groups([30, 25, 43, 27]) == [[1, 3, 0], [2]]
    assert prefill_groups([10, 10, 10, 10]) == [[0, 1, 2, 3]]
    assert prefill_groups([5, 500]) == [[0], [1]]
    assert sorted(i for g in prefill_groups([7, 3, 9, 3, 40, 41]) for i in g) == list(range(6)), "every request once"


def test_bench_serve_reports_both_arrival_patterns(tiny_artifact, tmp_path):
    """tools.bench_serve end to end on the tiny artifact (a real `runtime.serve` subprocess): a row per arrival
    pattern and concurrency, generated tokens counted from the stream, ratios against the 1-client rows."""
    import socket

    from tools import bench_serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "serve.json"
    assert bench_serve.main(["--model", str(tiny_artifact), "--clients", "1", "2", "--requests-per-client", "2",
                             "--max-tokens", "4", "--port", str(port), "--json", str(out)]) == 0
    [ours] = json.loads(out.read_text())
    rows = {(r["arrivals"], r["clients"]): r for r in ours["rows"]}
    assert set(rows) == {(a, c) for a in ("together", "staggered") for c in (1, 2)}
    assert all(r["requests"] == 2 * r["clients"] and 0 < r["tokens"] <= 4 * r["requests"] for r in rows.values())
    assert rows[("staggered", 1)]["speedup"] == 1.0 and ours["solo_ttft"] > 0
