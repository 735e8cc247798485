"""Data parallelism's dispatch (dp_size scheduler replicas behind one frontend): which replica takes a
request, which holds it (for its abort), how much work each has outstanding, and which are lost.

A request goes to the live replica with the least outstanding work (prompt plus most new tokens of the
requests it holds), except that a prompt starting like an earlier one (the same first
_AFFINITY_TOKENS tokens: a shared system prompt, a multi-turn conversation) prefers the replica that
served it, whose prefix cache holds that start, unless that replica is much busier than the least
loaded one. With dp_size 1 every request goes to the one replica, as before.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional

import zmq

from engine.shared.ipc import Endpoints, push_socket
from engine.shared.protocol import AbortRequest, Codec, ControlRequest, GenerateBatch, GenerateRequest

_AFFINITY_TOKENS = 64  # the start of a prompt that keys the affinity table
_AFFINITY_ENTRIES = 100_000  # remembered prompt starts, least recently used dropped first
# "Much busier": the preferred replica keeps a prompt while its outstanding work is at most twice the least
# loaded replica's plus this many tokens (recomputing a prefix costs less than queueing behind a backlog).
_AFFINITY_SLACK_TOKENS = 8192


class Replicas:
    """The frontend's sockets to the scheduler replicas, and its view of their load and health."""

    def __init__(self, context: zmq.Context, endpoints: Endpoints, dp_size: int) -> None:
        self.sockets = [push_socket(context, Endpoints.in_dir(endpoints.dir, r).scheduler) for r in range(dp_size)]
        self.codec = Codec(Any)
        self.loads = [0] * dp_size  # outstanding tokens (prompt + max_new_tokens) of the requests each holds
        self.counts = [0] * dp_size  # outstanding requests
        self.errors: list[Optional[str]] = [None] * dp_size  # why a lost replica was lost
        self.owner: dict[str, int] = {}  # rid -> its replica, until its last message arrives
        self.weight: dict[str, int] = {}  # rid -> its share of its replica's load, until finished or aborted
        self.affinity: OrderedDict[tuple[int, ...], int] = OrderedDict()

    @property
    def size(self) -> int:
        return len(self.sockets)

    def live(self) -> list[int]:
        return [r for r in range(self.size) if self.errors[r] is None]

    # ---- requests ----

    def send(self, reqs: list[GenerateRequest]) -> None:
        """Dispatch each request to a replica; one GenerateBatch per replica that takes any."""
        batches: dict[int, list[GenerateRequest]] = {}
        for req in reqs:
            replica = self._choose(req.input_ids)
            weight = len(req.input_ids) + req.sampling.max_new_tokens
            self.owner[req.rid], self.weight[req.rid] = replica, weight
            self.loads[replica] += weight
            self.counts[replica] += 1
            batches.setdefault(replica, []).append(req)
        for replica, batch in batches.items():
            self.sockets[replica].send(self.codec.encode(GenerateBatch(reqs=batch)))

    def _choose(self, input_ids: list[int]) -> int:
        live = self.live()
        assert live, "no live replica: the frontend fails every call first"
        least = min(live, key=lambda r: (self.loads[r], self.counts[r]))
        if len(input_ids) < _AFFINITY_TOKENS or self.size == 1:
            return least
        key = tuple(input_ids[:_AFFINITY_TOKENS])
        preferred = self.affinity.get(key)
        busy = preferred is None or self.errors[preferred] is not None
        if busy or self.loads[preferred] > 2 * self.loads[least] + _AFFINITY_SLACK_TOKENS:
            preferred = least
        self.affinity[key] = preferred
        self.affinity.move_to_end(key)
        if len(self.affinity) > _AFFINITY_ENTRIES:
            self.affinity.popitem(last=False)
        return preferred

    def finished(self, rid: str) -> None:
        """rid's last message arrived: it holds nothing any more."""
        self._release(rid)
        self.owner.pop(rid, None)

    def abort(self, rids: list[str]) -> None:
        """Send each replica the aborts of the rids it holds; their load is released now."""
        by_replica: dict[int, list[str]] = {}
        for rid in rids:
            replica = self.owner.get(rid)
            if replica is not None and self.errors[replica] is None:
                by_replica.setdefault(replica, []).append(rid)
            self._release(rid)
        for replica, batch in by_replica.items():
            self.sockets[replica].send(self.codec.encode(AbortRequest(rids=batch)))

    def _release(self, rid: str) -> None:
        weight = self.weight.pop(rid, None)
        if weight is not None:
            replica = self.owner[rid]
            self.loads[replica] -= weight
            self.counts[replica] -= 1

    # ---- control calls and health ----

    def send_call(self, replica: int, call: ControlRequest) -> None:
        self.sockets[replica].send(self.codec.encode(call))

    def lose(self, replica: int, error: str) -> list[str]:
        """Mark `replica` lost; returns the rids it held (their callers are failed by the caller)."""
        if self.errors[replica] is not None:
            return []
        self.errors[replica] = error
        rids = [rid for rid, owner in self.owner.items() if owner == replica]
        for rid in rids:
            self.finished(rid)
        self.loads[replica] = self.counts[replica] = 0
        return rids

    def load_info(self, replica: int) -> dict[str, Any]:
        """What server info shows of a replica from the frontend's side."""
        info = {"dp_rank": replica, "alive": self.errors[replica] is None}
        info |= {"outstanding_requests": self.counts[replica], "outstanding_tokens": self.loads[replica]}
        return info | ({"error": self.errors[replica]} if self.errors[replica] is not None else {})

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
