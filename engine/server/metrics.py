"""Server metrics in Prometheus' text format: what the server measures itself (tokens, time to first
token, latency, HTTP requests) and the engine's live state (requests running and waiting, KV use)."""

from __future__ import annotations

import bisect
import collections
import time
from collections.abc import AsyncIterator
from typing import Any, Optional

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_RATE_WINDOW_S = 10  # tokens per second is averaged over this many whole seconds


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, count in zip(self.buckets + (float("inf"),), self.counts):
            cumulative += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(f'{self.name}_bucket{{le="{le}"}} {cumulative}')
        lines += [f"{self.name}_sum {self.sum!r}", f"{self.name}_count {self.count}"]
        return lines


class Metrics:
    """Counters kept by the server; `metered` wraps every engine stream the server reads."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: collections.Counter[str] = collections.Counter()
        self.http: collections.Counter[tuple[str, int]] = collections.Counter()
        self.ttft = Histogram(
            "ferry_time_to_first_token_seconds",
            "Seconds from receiving a request to its first generated token.",
            _TTFT_BUCKETS,
        )
        self.latency = Histogram(
            "ferry_e2e_request_latency_seconds", "Seconds from receiving a request to its last token.", _LATENCY_BUCKETS
        )
        self._tokens_per_second: collections.deque[list[int]] = collections.deque()  # [whole second, tokens]

    async def metered(self, stream: AsyncIterator[dict[str, Any]], started: float) -> AsyncIterator[dict[str, Any]]:
        """Pass an engine stream through, counting its tokens and timing its first and last token.
        `started` is time.perf_counter() when the HTTP request arrived."""
        seen_first: set[int] = set()
        try:
            async for chunk in stream:
                index = chunk.get("index", 0)
                if chunk["output_ids"]:
                    self._add_tokens(len(chunk["output_ids"]))
                    if index not in seen_first:
                        seen_first.add(index)
                        self.ttft.observe(time.perf_counter() - started)
                finish = chunk["meta_info"]["finish_reason"]
                if finish is not None:
                    self.prompt_tokens += chunk["meta_info"]["prompt_tokens"]
                    self.finished[finish["type"]] += 1
                    self.latency.observe(time.perf_counter() - started)
                yield chunk
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    def count_http(self, path: str, status: int) -> None:
        self.http[(path, status)] += 1

    def _add_tokens(self, count: int) -> None:
        self.generation_tokens += count
        second = int(time.monotonic())
        if self._tokens_per_second and self._tokens_per_second[-1][0] == second:
            self._tokens_per_second[-1][1] += count
        else:
            self._tokens_per_second.append([second, count])
        while self._tokens_per_second and self._tokens_per_second[0][0] <= second - _RATE_WINDOW_S:
            self._tokens_per_second.popleft()

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last whole seconds (the current one is still filling)."""
        now = int(time.monotonic())
        recent = sum(n for second, n in self._tokens_per_second if now - _RATE_WINDOW_S <= second < now)
        return recent / _RATE_WINDOW_S

    def render(self, server_info: Optional[dict[str, Any]]) -> str:
        """The Prometheus text page; `server_info` is the engine's live state, None if it did not answer."""
        lines: list[str] = []

        def metric(name: str, kind: str, help: str, samples: list[tuple[str, Any]]) -> None:
            lines.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}"])
            lines.extend(f"{name}{labels} {value}" for labels, value in samples)

        metric("ferry_engine_up", "gauge", "1 when the engine answers.", [("", int(server_info is not None))])
        if server_info is not None:
            pool, free = server_info["kv_pool_tokens"], server_info["kv_free_tokens"]
            metric(
                "ferry_num_requests_running",
                "gauge",
                "Requests in the running batch.",
                [("", server_info["num_running"])],
            )
            metric(
                "ferry_num_requests_waiting",
                "gauge",
                "Requests waiting for admission.",
                [("", server_info["num_waiting"])],
            )
            metric("ferry_kv_pool_tokens", "gauge", "KV cache size in tokens.", [("", pool)])
            metric("ferry_kv_used_tokens", "gauge", "KV cache slots in use.", [("", pool - free)])
            metric("ferry_kv_usage", "gauge", "Share of the KV cache in use.", [("", (pool - free) / max(pool, 1))])
            if "kv_cached_tokens" in server_info:
                metric(
                    "ferry_kv_cached_tokens",
                    "gauge",
                    "KV slots held by the prefix cache (evictable).",
                    [("", server_info["kv_cached_tokens"])],
                )
        metric(
            "ferry_prompt_tokens_total", "counter", "Prompt tokens of finished requests.", [("", self.prompt_tokens)]
        )
        metric("ferry_generation_tokens_total", "counter", "Generated tokens.", [("", self.generation_tokens)])
        metric(
            "ferry_generation_tokens_per_second",
            "gauge",
            f"Generated tokens per second over the last {_RATE_WINDOW_S} s.",
            [("", self.tokens_per_second())],
        )
        metric(
            "ferry_requests_finished_total",
            "counter",
            "Finished generations by finish reason.",
            [(f'{{finish_reason="{reason}"}}', n) for reason, n in sorted(self.finished.items())],
        )
        http = sorted(self.http.items())
        metric(
            "ferry_http_requests_total",
            "counter",
            "HTTP requests by path and status.",
            [(f'{{path="{path}",status="{status}"}}', n) for (path, status), n in http],
        )
        lines += self.ttft.render() + self.latency.render()
        return "\n".join(lines) + "\n"
