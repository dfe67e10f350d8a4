"""`python -m runtime.serve.ray --model ART --replicas N`: the OpenAI-compatible server scaled out on Ray Serve.

In:  an artifact directory, readable at the same path on every node that hosts a replica (with this
     project installed there too); the number of replicas and each one's limits (batch, queue, time
     budget, body size, ONNX Runtime threads, CPUs/GPUs it reserves); an optional API key (flag or
     ERNIE_API_KEY); the host/port of Ray's HTTP proxy (127.0.0.1:8000 unless told otherwise); a Ray
     cluster to join (`--address auto|HOST:PORT|ray://HOST:10001`) or none: a local one is started.
Out: the API of `runtime.serve` (POST /v1/completions and /v1/chat/completions, stream or not; GET
     /v1/models, /health, /metrics) behind Ray's proxy, which spreads requests over N replicas on any node
     (runtime.serve.routing: power of two choices, no preference for the proxy's node). Each
     replica loads the artifact and runs its own continuous-batching `Engine`, so /metrics is the
     answering replica's; every response names that replica in an `x-replica` header.

Failure contract. A replica takes at most `max_batch + max_queue` requests; beyond that, on all
replicas, each proxy queues `max_queue` more (at least 1), then answers 429 with Retry-After at once.
A replica that dies loses the requests it holds: a non-streaming one ends with HTTP 500 from the proxy
and a stream ends without its `data: [DONE]` line. Those are retryable: greedy requests give the same
text on any replica. Serve starts a replacement replica by itself; until it is up the survivors serve.

`serve run runtime.serve.ray:build_app model=ART replicas=2` deploys the same application (`build_app`
takes the same keys as the flags, as strings or typed). Ray is imported only by this module and routing.py.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

from ray import serve
from ray.serve.config import RequestRouterConfig

from runtime.core.errors import ErnieError, Failure, OptionError, SourceProblem, UsageError, run_cli
from runtime.serve.engine import Engine
from runtime.generate.api import load
from runtime.serve import limits
from runtime.serve.app import BodyLimit, add_engine_arguments, create_app
from runtime.serve.routing import SpreadRouter

APP = "ernie"  # the Serve application's name; its route prefix is "/"

# build_app's keys: default, and the type a string from `serve run key=value` is converted to.
OPTIONS: dict[str, tuple[object, type]] = {
    "model": (None, str),
    "name": (None, str),          # the model id /v1/models reports (default: the artifact folder's name)
    "replicas": (1, int),
    **{name: (value, kind) for name, (value, kind, _) in limits.LIMITS.items()},
    "api_key": (None, str),       # default: $ERNIE_API_KEY where build_app runs; none: open
    "provider": ("auto", str),
    "threads": (None, int),       # ONNX Runtime intra-op threads per replica (default: num_cpus)
    "num_cpus": (1.0, float),     # CPUs each replica reserves in Ray's scheduler
    "num_gpus": (0.0, float),
}


def settings(args: dict) -> dict:
    """Fill defaults, convert `serve run` strings and check `build_app`'s keys; raises ValueError."""
    unknown = set(args) - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)}; known: {sorted(OPTIONS)}")
    cfg = {key: default for key, (default, _) in OPTIONS.items()}
    cfg.update({key: None if value in (None, "") else OPTIONS[key][1](value) for key, value in args.items()})
    if not cfg["model"]:
        raise ValueError("model: the artifact directory is required")
    cfg["name"] = cfg["name"] or os.path.basename(os.path.normpath(cfg["model"]))
    cfg["api_key"] = cfg["api_key"] or os.environ.get("ERNIE_API_KEY") or None
    if cfg["threads"] is None:
        cfg["threads"] = max(1, int(cfg["num_cpus"]))
    if cfg["replicas"] < 1:
        raise ValueError(f"replicas must be >= 1, got {cfg['replicas']}")
    try:
        limits.check(cfg)
    except OptionError as e:
        raise ValueError(str(e)) from None
    return cfg


class ReplicaHeader:
    """ASGI middleware: name the replica that answered in an `x-replica` response header."""

    def __init__(self, app, replica: str):
        self.app, self.header = app, (b"x-replica", replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)
        await self.app(scope, receive, tagged)


def replica_app(engine: Engine, cfg: dict, replica: str):
    """One replica's ASGI app: `create_app` over its engine, the body limit, the replica header."""
    app = create_app(lambda: engine, cfg["name"], cfg["api_key"], cfg["timeout"], cfg["max_body"])
    app.add_middleware(BodyLimit, limit=cfg["max_body"])
    app.add_middleware(ReplicaHeader, replica=replica)  # added last: outermost, so every answer has it
    return app


@serve.deployment(name="ErnieReplica", health_check_period_s=5, health_check_timeout_s=30)
@serve.ingress()  # late-bound: __serve_build_asgi_app__ builds the app once the engine exists
class ErnieReplica:
    """One replica: loads the artifact, runs its own engine, serves it through `create_app`."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        gen = load(cfg["model"], cfg["provider"], cfg["threads"])
        self.engine = Engine(gen, cfg["max_batch"], cfg["max_queue"], cfg["prefix_cache_mb"]).start()
        self.replica = serve.get_replica_context().replica_id.unique_id

    def __serve_build_asgi_app__(self):
        return replica_app(self.engine, self.cfg, self.replica)

    def check_health(self) -> None:
        """Serve replaces a replica whose check fails: the engine's thread must be alive."""
        if not self.engine._thread.is_alive():
            raise RuntimeError("the engine's thread has stopped")

    def __del__(self):
        if hasattr(self, "engine"):  # not when loading failed
            self.engine.stop()


def deployment_options(cfg: dict) -> dict:
    """How Serve runs the replicas: count, resources, how many requests each may hold, how the proxy picks one.

    Routing (issue 31, item 9: "16 requests from 4 clients, one replica answered"). Serve's default router
    draws two replicas and sends the request to the one with the shorter queue (lengths cached from each
    send and answer, probed when missing or older than 10 s), but it first draws only among the replicas on
    the proxy's own node, and leaves that node only when those refuse, i.e. hold max_ongoing_requests
    (max_batch + max_queue, 40 by default). Measured on a 2-core Xeon, tiny artifact, Ray 2.60: on ONE node
    the default router spread well (16 requests from 4 clients, 12 or 256 tokens each: 7/9 to 11/5 in 15
    runs, 12/4 from one client; also with the probe deadline cut to 1 ms, 100 probes missing it); on TWO
    nodes (head: proxy + one replica; second node: the other) every request went to the head's replica:
    16/16 from 4 and from 8 clients, 32/32 from 16. SpreadRouter (runtime/serve/routing.py) is the same
    procedure over all replicas: 7/9 on the same two nodes (tests/test_serve_ray.py, two_nodes).
    """
    return {
        "num_replicas": cfg["replicas"],
        "ray_actor_options": {"num_cpus": cfg["num_cpus"], "num_gpus": cfg["num_gpus"]},
        "max_ongoing_requests": cfg["max_batch"] + cfg["max_queue"],  # all the engine holds, never a 429 there
        "max_queued_requests": max(1, cfg["max_queue"]),               # per proxy (Serve's least: 1), then 429
        "backpressure_config": {"status_code": 429, "retry_after_s": 1},
        "request_router_config": RequestRouterConfig(request_router_class=SpreadRouter),
    }


def build_app(args: dict):
    """The Serve application (`serve.run(build_app({...}))` or `serve run runtime.serve.ray:build_app k=v`)."""
    cfg = settings(dict(args))
    return ErnieReplica.options(**deployment_options(cfg)).bind(cfg)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m runtime.serve.ray", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="artifact directory (the same path on every replica's node)")
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--address", help="Ray cluster to join: auto, HOST:PORT or ray://HOST:10001 (default: start a "
                    "local one)")
    ap.add_argument("--host", default="127.0.0.1", help="proxy bind address (default: loopback only); like "
                    "--port, it applies where Serve is not running on the cluster yet")
    ap.add_argument("--port", type=int, default=8000, help="proxy port (default: 8000)")
    ap.add_argument("--name", help="model id reported by /v1/models (default: the artifact folder's name)")
    add_engine_arguments(ap)  # per replica; the proxy also queues --max-queue
    ap.add_argument("--threads", type=int, help="ONNX Runtime threads per replica (default: --num-cpus)")
    ap.add_argument("--num-cpus", type=float, default=1.0, help="CPUs each replica reserves")
    ap.add_argument("--num-gpus", type=float, default=0.0, help="GPUs each replica reserves")
    return ap


def connect(address: str | None, cfg: dict) -> bool:
    """Join `address`, or start a local cluster big enough for the replicas; True when we started it."""
    import ray

    if address:
        ray.init(address=address, log_to_driver=False)
        return False
    cpus = max(os.cpu_count() or 1, int(cfg["replicas"] * cfg["num_cpus"] + 0.999))
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    return True


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM too: leave through main's cleanup


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when stopped by Ctrl-C or SIGTERM (a server's normal end); an error: its kind's status."""
    args = parser().parse_args(argv)
    return run_cli(lambda: deploy(args))


def deploy(args: argparse.Namespace) -> None:
    """Check the flags, join or start the cluster, deploy, and serve until interrupted; always clean up."""
    import ray

    keys = ("model", "replicas", "name", "max_batch", "max_queue", "timeout", "max_body", "api_key", "provider",
            "threads", "num_cpus", "num_gpus")
    try:
        cfg = settings({k: getattr(args, k) for k in keys})
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not args.address and not (Path(cfg["model"]) / "manifest.json").is_file():
        raise SourceProblem(f"{cfg['model']} is not an artifact directory (no manifest.json)")
    try:
        started = connect(args.address, cfg)
    except ConnectionError as e:
        raise OptionError("address", f"{args.address}: cannot join the Ray cluster: {e}") from None
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, whose own SIGTERM handler aborts
        signal.signal(sig, _interrupt)
    deployed = False
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        deployed = True
        serve.run(build_app(cfg), name=APP, route_prefix="/")  # returns once every replica is up
        print(f"serving {cfg['name']} on {cfg['replicas']} replica(s) at http://{args.host}:{args.port}/v1",
              flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    except ErnieError:
        raise
    except RuntimeError as e:  # the deployment failed (e.g. the artifact is missing on a node)
        raise Failure(str(e)) from None
    finally:
        if deployed:
            serve.delete(APP)
        if started:
            serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
