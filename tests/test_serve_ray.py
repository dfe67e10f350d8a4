"""Scale-out on Ray Serve (`runtime/serve_ray.py`): a local Ray head of our own, `python -m runtime.serve.ray`
joining it with 2 replicas of the tiny artifact, and the official `openai` client against Ray's proxy.

Checks: both replicas take traffic, also when they run on two nodes and all clients reach one proxy (Serve's
default router kept every request on the proxy's node; runtime/serve/routing.py); completions (stream or not)
and chat equal the single-process runtime's greedy output; a replica killed mid-load loses no request for good (each in-flight one on it ends with a
retryable HTTP 5xx, retried here at most twice; a stream it carried is cut, without `data: [DONE]`) and
Serve brings the replica count back to 2; SIGTERM deletes the application.

Isolation: the head binds loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 stops Ray from swapping 127.0.0.1 for
the routable address), requires a token of its own, uses its own temp dir and free ports, and starts in a
session of its own; teardown ends exactly the processes of that session (the Ray daemons and the workers
they spawned) and of the driver's. Never `ray stop`: it matches processes by name, so it would end every
Ray cluster on the machine.
"""

from __future__ import annotations

import collections
import concurrent.futures
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from runtime.generate import api as G

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# Loopback only; token auth with a token of our own, so neither ~/.ray/auth_token (which makes `ray start`
# turn auth on) nor its absence matters, and no other local user can join the cluster.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
MAX = 12            # new tokens per request in the parity checks
LONG = 3000         # new tokens per request under the kill: ~2-3 s each on the tiny model, so many are in flight
SPREAD = 256        # new tokens per request in the spread check: long enough that 4 clients' requests overlap
PROMPTS = ["Hello world", "The capital of France is", "def hello(name):", "Numbers 0 1 2",
           "ERNIE 4.5 is", "Über Größe", "你好，世界", "Export it to ONNX"]
LOAD_PROMPTS = ["def hello(name):", "Export it to ONNX", "The capital of France is", "Hello world"]


CI = os.environ.get("CI") == "true"  # CI installs the serve-ray extra: there a missing ray fails each test
MISSING = "ray[serve] is not installed: pip install -e '.[serve-ray]'"
if importlib.util.find_spec("ray") is None and not CI:  # find_spec: ray is imported only once RAY_ENV is set
    pytest.skip(MISSING, allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of session `sid`: a process we started with start_new_session and its descendants."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if os.getsid(int(entry)) == sid and state != "Z":
                pids.append(int(entry))
        except (OSError, IndexError):
            continue  # ended meanwhile
    return pids


def end_session(sid: int, grace_s: float = 10.0) -> list[int]:
    """SIGTERM every process of session `sid`, SIGKILL what is left after `grace_s`; returns survivors."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for pid in session_pids(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
    return session_pids(sid)


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


@contextmanager
def ray_start(cmd: list[str], env: dict, log: Path, what: str):
    """Run `ray start ...` in its own session; on exit end every process of that session (by PID)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            rc = "timeout"
        if rc != 0:
            pytest.fail(f"{' '.join(cmd[1:3])} for {what} failed ({rc}):\n{tail(log)}")
        yield
    finally:
        left = end_session(proc.pid, grace_s=3.0)  # gcs_server and raylet may not heed SIGTERM at once
        assert not left, f"Ray processes of {what} survived SIGKILL: {left}"


@contextmanager
def ray_head(tmp: Path, env: dict, cpus: int = 4, ip: str = "127.0.0.1"):
    """`ray start --head` on loopback (`ip`) in its own session and temp dir; yields the GCS address."""
    port, log = free_port(), tmp / "head.log"
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--node-ip-address", ip,
           "--port", str(port), "--ray-client-server-port", str(free_port()),
           "--dashboard-agent-listen-port", str(free_port()), "--temp-dir", str(tmp / "ray"),
           "--include-dashboard=false", "--num-cpus", str(cpus), "--disable-usage-stats"]
    with ray_start(cmd, env, log, "our head"):
        yield f"{ip}:{port}"


@contextmanager
def ray_node(address: str, tmp: Path, env: dict):
    """A second node (its own raylet, 1 CPU) joining `address` from 127.0.0.3, still loopback, in its own session."""
    log = tmp / "node.log"
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--address", address, "--node-ip-address", "127.0.0.3",
           "--dashboard-agent-listen-port", str(free_port()), "--temp-dir", str(tmp / "ray"), "--num-cpus", "1",
           "--disable-usage-stats"]
    # Joining is refused while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and with 1 Ray swaps 127.0.0.1 (only that
    # loopback address) for the routable one: so the head of a two-node cluster is 127.0.0.2, this node 127.0.0.3.
    with ray_start(cmd, env | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}, log, "our second node"):
        yield


@contextmanager
def serve_ray(address: str, model: Path, port: int, tmp: Path, env: dict):
    """`python -m runtime.serve.ray` joining `address` with 2 replicas; yields the process once it serves."""
    log = tmp / "serve_ray.log"
    cmd = [sys.executable, "-m", "runtime.serve.ray", "--model", str(model), "--replicas", "2", "--address", address,
           "--port", str(port), "--max-batch", "4", "--max-queue", "16", "--threads", "1"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while "serving " not in tail(log, 10**6) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if "serving " not in tail(log, 10**6):
            pytest.fail(f"runtime.serve.ray did not come up (rc {proc.poll()}):\n{tail(log)}")
        yield proc, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # deletes the app, then exits
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        end_session(proc.pid, grace_s=2.0)


@contextmanager
def ray_driver():
    """(the `ray` module with RAY_ENV set for this process, the subprocesses' environment, a fresh temp dir)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | RAY_ENV
    tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's unix sockets live under it
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in RAY_ENV.items():
                mp.setenv(key, value)  # read by ray when it is first imported, just below
            try:
                import ray
                from ray import serve  # noqa: F401
            except ImportError as e:
                (pytest.fail if CI else pytest.skip)(f"{MISSING} ({e}){' (CI=true)' if CI else ''}")
            yield ray, env, tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def two_nodes(tiny_artifact):
    """(proxy url, `ray` connected as a driver): a head with 1 CPU and a second node with 1 CPU, one replica each
    (each reserves 1 CPU), and one proxy, on the head. Function-scoped: gone before `cluster` starts."""
    with ray_driver() as (ray, env, tmp), ray_head(tmp, env, cpus=1, ip="127.0.0.2") as address, \
            ray_node(address, tmp, env):
        from ray import serve

        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        try:
            port = free_port()
            # One proxy: by default Serve puts one on every node, and here both nodes share 127.0.0.1:port.
            # runtime.serve.ray then joins this Serve instance (its --port must match).
            serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
            with serve_ray(address, tiny_artifact, port, tmp, env):
                yield f"http://127.0.0.1:{port}", ray
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def cluster(tiny_artifact):
    """(proxy url, the `ray` module connected as a driver, the serve_ray process and its log)."""
    with ray_driver() as (ray, env, tmp), ray_head(tmp, env) as address:
        port = free_port()
        with serve_ray(address, tiny_artifact, port, tmp, env) as (proc, log):
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
            try:
                yield f"http://127.0.0.1:{port}", ray, proc, log
            finally:
                ray.shutdown()


@pytest.fixture(scope="module")
def gen(tiny_artifact):
    return G.load(tiny_artifact, "cpu")


def solo(gen, text, max_tokens=MAX, chat=False):
    opts = gen.options(max_new_tokens=max_tokens, temperature=0)
    [r] = G.generate(gen, [G.encode_prompt(gen, text, chat=chat)], opts)
    return r


def client(url):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


def replica_states(ray) -> dict:
    from ray import serve

    return serve.status().applications["ernie"].deployments["ErnieReplica"].replica_states


def replica_actors(ray) -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA::ernie#")]


def test_spread_router_draws_two_of_all_replicas_and_backs_off():
    """No cluster: the router's one rank is two distinct replicas from all of them, and it asks Serve to back off."""
    import asyncio
    from types import SimpleNamespace

    with ray_driver():  # ray reads RAY_ENV when first imported: never import it (routing does) outside
        from runtime.serve.routing import SpreadRouter
    replicas = ["a", "b", "c"]
    request = SimpleNamespace(routing_context=SimpleNamespace(should_backoff=False))  # Serve's default: False
    draws = [asyncio.run(SpreadRouter.choose_replicas(None, replicas, request)) for _ in range(60)]
    assert all(len(d) == 1 and len(set(d[0])) == 2 and set(d[0]) <= set(replicas) for d in draws)
    assert {r for d in draws for r in d[0]} == set(replicas)
    assert request.routing_context.should_backoff
    assert asyncio.run(SpreadRouter.choose_replicas(None, ["a"], None)) == [["a"]]


def test_requests_spread_over_replicas_on_two_nodes(two_nodes):
    """Issue 31, item 9: the load of its report (4 clients, 16 requests), long enough to overlap, through the one
    proxy. Serve's default router sent all 16 to the replica on the proxy's node (measured: 16/0)."""
    url, ray = two_nodes
    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert sorted(n["Resources"].get("CPU") for n in nodes) == [1.0, 1.0], nodes  # one replica fits on each
    assert replica_states(ray) == {"RUNNING": 2}
    c = client(url)

    def one(i):
        started = time.monotonic()
        raw = c.completions.with_raw_response.create(model="tiny", prompt=LOAD_PROMPTS[i % 4], max_tokens=SPREAD,
                                                     temperature=0)
        return raw.headers["x-replica"], started, time.monotonic()

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(16)))
    counts = collections.Counter(replica for replica, _, _ in results)
    spans = sorted(span for _, *span in results)
    overlap = max(sum(s <= start < e for s, e in spans) for start, _ in spans)  # requests in flight at once
    print(f"\nreplicas answered {dict(counts)}; up to {overlap} requests in flight; "
          f"{spans[-1][1] - spans[0][0]:.1f} s in all")
    assert overlap >= 3, "the requests did not overlap: the load is not the one this test claims"
    assert len(counts) == 2 and min(counts.values()) >= 4, f"one replica took (nearly) all: {dict(counts)}"


def test_both_replicas_take_traffic_and_match_the_single_process_runtime(cluster, gen):
    url, ray, _, _ = cluster
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    assert replica_states(ray) == {"RUNNING": 2}
    expected = {p: solo(gen, p).text for p in PROMPTS}

    def one(prompt):
        raw = c.completions.with_raw_response.create(model="tiny", prompt=prompt, max_tokens=MAX, temperature=0)
        return prompt, raw.headers["x-replica"], raw.parse()

    seen = set()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for _ in range(4):  # the router picks between replicas at random: a few rounds of 8 see both
            results = list(pool.map(one, PROMPTS))
            assert all(r.choices[0].text == expected[p] for p, _, r in results)
            seen |= {replica for _, replica, _ in results}
            if len(seen) == 2:
                break
    assert len(seen) == 2, f"all traffic went to {seen}"


def test_streaming_and_chat_match_the_single_process_runtime(cluster, gen):
    url, _, _, _ = cluster
    c = client(url)
    pieces = [ch.choices[0].text for ch in c.completions.create(model="tiny", prompt="The capital of France is",
                                                                max_tokens=MAX, temperature=0, stream=True)]
    assert "".join(pieces) == solo(gen, "The capital of France is").text
    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi there"}],
                                     max_tokens=MAX, temperature=0)
    assert chat.choices[0].message.content == solo(gen, "Hi there", chat=True).text
    deltas = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=MAX, temperature=0, stream=True)]
    assert "".join(deltas) == solo(gen, "Hi", chat=True).text


def complete_with_retries(url: str, prompt: str) -> tuple[str, list[int]]:
    """A greedy completion; a 5xx (a replica lost under it) is retried at most twice. (text, statuses retried)."""
    import openai

    c, retried = client(url), []
    for _ in range(3):
        try:
            r = c.completions.create(model="tiny", prompt=prompt, max_tokens=LONG, temperature=0)
            return r.choices[0].text, retried
        except openai.APIStatusError as e:
            if e.status_code < 500:
                raise
            retried.append(e.status_code)
    raise AssertionError(f"{prompt!r} failed 3 times: {retried}")


def test_a_replica_killed_mid_load_loses_no_request_and_is_replaced(cluster, gen):
    import httpx

    url, ray, _, _ = cluster
    expected = {p: solo(gen, p, LONG) for p in LOAD_PROMPTS}
    probe = next((p for p, r in expected.items() if r.finish_reason == "length"), None)
    assert probe, "no prompt runs to length on this artifact: the probe stream would end too early"
    before = set(replica_actors(ray))
    # A long stream pins down a replica that surely has work in flight when it dies: that one is the victim.
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                      json={"prompt": probe, "max_tokens": 20000, "temperature": 0, "stream": True}) as stream:
        victim = stream.headers["x-replica"]
        lines = stream.iter_lines()
        assert next(ln for ln in lines if ln).startswith("data: {")
        [name] = [n for n in before if n.endswith(f"#{victim}")]
        handle = ray.get_actor(name, namespace="serve")  # before the load: under it this took seconds
        with concurrent.futures.ThreadPoolExecutor(4) as pool:  # 4 clients, 16 requests
            futures = [pool.submit(complete_with_retries, url, LOAD_PROMPTS[i % 4]) for i in range(16)]
            time.sleep(0.5)  # the first 4 are spread over both replicas and running (each takes ~1-3 s)
            pending = sum(not f.done() for f in futures)
            ray.kill(handle, no_restart=True)  # at once, like a crash: no graceful shutdown
            killed_at = time.monotonic()
            rest = []
            with pytest.raises(httpx.HTTPError):  # the cut stream: the proxy closes it mid-body
                rest.extend(lines)
            assert "data: [DONE]" not in rest
            results = [f.result(timeout=180) for f in futures]
    assert pending >= 12, "the kill came after much of the load had finished"
    for i, (text, _) in enumerate(results):
        assert text == expected[LOAD_PROMPTS[i % 4]].text, LOAD_PROMPTS[i % 4]
    retried = [s for _, statuses in results for s in statuses]
    print(f"\n{len(retried)} request(s) retried after the kill: {retried}")
    assert all(s >= 500 for s in retried)

    deadline = killed_at + 90
    while time.monotonic() < deadline:  # Serve notices the death and starts a replacement
        actors = set(replica_actors(ray))
        if replica_states(ray) == {"RUNNING": 2} and len(actors) == 2 and not any(a.endswith(f"#{victim}")
                                                                                  for a in actors):
            break
        time.sleep(0.5)
    assert replica_states(ray) == {"RUNNING": 2}, replica_states(ray)
    after = set(replica_actors(ray))
    assert len(after) == 2 and len(after - before) == 1, (before, after)
    print(f"replaced in {time.monotonic() - killed_at:.1f} s")
    seen = {client(url).completions.with_raw_response.create(model="tiny", prompt=p, max_tokens=MAX,
                                                             temperature=0).headers["x-replica"]
            for p in PROMPTS * 2}
    assert victim not in seen and seen <= {a.rsplit("#", 1)[1] for a in after}


def test_sigterm_deletes_the_application(cluster):
    """Last: stops the server. The driver deletes its app (not the cluster's Serve) and exits 0."""
    from ray import serve

    _, _, proc, log = cluster
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, tail(log)
    assert "ernie" not in serve.status().applications
