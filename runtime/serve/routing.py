"""How Ray Serve's proxy picks a replica for each request (`runtime.serve.ray` sets it on the deployment).

In:  the replicas that are running, from Serve's router (it probes and caches each one's queue length).
Out: `SpreadRouter`: power of two choices over *every* replica, wherever it runs: two at random, the one
     with the shorter queue takes the request; when both are full, Serve backs off and draws again.

Why not Serve's default router: it is the same procedure, but it first tries only the replicas on the
proxy's own node, and goes further only when those refuse (hold `max_ongoing_requests`). Clients usually
reach one proxy (one address), so with replicas on several nodes that node's replica took everything:
measured with a head (proxy + one replica) and a second node (the other replica) on one machine, 16 of 16
requests from 4 and from 8 concurrent clients, and 32 of 32 from 16, all went to the head's replica
(each replica accepts max_batch + max_queue = 40). Locality saves a hop between nodes, a millisecond; an
idle replica saves a whole generation. Kept in its own small module: the proxy imports this class to
route, and should not import ONNX Runtime to do it.
"""

from __future__ import annotations

import random

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica


class SpreadRouter(FIFOMixin, RequestRouter):
    """Power of two choices over all replicas, no preference for the proxy's node."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # Our one rank is already every replica: when it refuses, wait before the next draw (Serve's
            # default sets this only after its local-node try; without it a full deployment spins).
            pending_request.routing_context.should_backoff = True
        if not candidate_replicas:
            return []
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
