"""Prometheus metrics and a health check, served over HTTP on the event loop (no threads).

Each gateway owns its own `CollectorRegistry` (no process-global state). With several worker
processes each worker serves its own port (metrics_listen port + worker index) instead of
prometheus_client's multiprocess mode: that mode needs a shared directory that must be wiped on
every start and keeps dead workers' files, while per-worker targets are plain scrape configs and
Prometheus sums them with `sum without (instance)`.

`GET /healthz` answers 200 "ok" while this worker's loop runs, its SMTP listener is open and its
scanner can score; 503 with the reason otherwise. It does not probe the downstream: a downstream
outage is answered with 4xx per message and must not get the gateway restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from milter.gateway.logfmt import kv

log = logging.getLogger("milter.gateway.metrics")

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
RELOAD_OUTCOMES = ("ok", "failed")
RECYCLE_REASONS = ("max_rss", "max_jobs", "scan_timeout", "broken")


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.messages = Counter(
            "milter_messages", "Messages answered, by action and verdict", ["action", "verdict"], registry=r
        )
        self.replies = Counter("milter_replies", "Replies to DATA by SMTP code class", ["code"], registry=r)
        self.scan_seconds = Histogram(
            "milter_scan_seconds",
            "Prepare + model + policy time per message",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.delivery_seconds = Histogram(
            "milter_delivery_seconds",
            "Downstream delivery time per message",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "milter_batch_size", "Messages per model call", buckets=BATCH_BUCKETS, registry=r
        )
        self.errors = Counter("milter_errors", "Failures by kind", ["kind"], registry=r)
        # DKIM / DMARC outcomes, and the DNS wait per message: a rising temperror count is DNS trouble.
        self.auth_results = Counter(
            "milter_auth_results", "DKIM signatures, DMARC evaluations and ARC chains by result",
            ["check", "result"], registry=r,
        )
        self.auth_seconds = Histogram(
            "milter_auth_dns_seconds",
            "Time a message waited for its DKIM / DMARC lookups",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # DNS blocklists ([reputation]): a rising "refused" count means the list refuses our resolver.
        self.dnsbl_results = Counter(
            "milter_dnsbl_results", "DNS blocklist answers by zone and result (listed clean refused error)",
            ["zone", "result"], registry=r,
        )
        self.dnsbl_seconds = Histogram(
            "milter_dnsbl_seconds", "Time a message's blocklist lookups took", buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.sessions = Gauge("milter_sessions", "Open SMTP sessions", registry=r)
        self.pending = Gauge("milter_pending_messages", "Messages received and not yet answered", registry=r)
        # milter_model_info{name=...,providers=...} 1: which model this worker scores with right now
        # (after a reload, each worker's target shows whether it took the new one).
        self.model = Info("milter_model", "The model in use", registry=r)
        # milter_model_graph_info{graph="tensor",provider="CUDAExecutionProvider"} 1: which graph scores
        # the mail on which provider (docs/gpu.md); "tree-ensemble" / CPUExecutionProvider without a GPU.
        self.model_graph = Gauge(
            "milter_model_graph_info", "The graph scoring the mail and its provider", ["graph", "provider"],
            registry=r,
        )
        self.model_reloads = Counter(
            "milter_model_reloads", "Model reloads (SIGHUP) by outcome", ["outcome"], registry=r
        )
        for outcome in RELOAD_OUTCOMES:  # export 0, not nothing, so alerts on "failed" see a series
            self.model_reloads.labels(outcome)
        # [model] registry = "store": the fleet's models this worker adopted, or refused and kept its own
        # (milter.gateway.fleet); a store it could not read counts as milter_errors{kind="registry"}.
        self.registry_adoptions = Counter(
            "milter_registry_adoptions", "Fleet models adopted from the store, by outcome", ["outcome"],
            registry=r,
        )
        for outcome in (*RELOAD_OUTCOMES, "deferred"):  # deferred: tried again at the next poll
            self.registry_adoptions.labels(outcome)
        # A scan past server.scan_timeout is counted here, and as milter_errors{kind="scan"} with the rest.
        self.scan_timeouts = Counter(
            "milter_scan_timeouts", "Messages whose scan passed server.scan_timeout", registry=r
        )
        self.prepare_recycles = Counter(
            "milter_prepare_recycles", "Prepare pools replaced, by reason", ["reason"], registry=r
        )
        for reason in RECYCLE_REASONS:
            self.prepare_recycles.labels(reason)
        self.prepare_rss = Gauge(
            "milter_prepare_rss_bytes", "Resident memory of the prepare process after its latest job",
            registry=r,
        )
        self.heap_trims = Counter(
            "milter_heap_trims", "Trims of glibc's free memory (server.heap_trim_interval)", registry=r
        )
        self.heap_trimmed = Counter(
            "milter_heap_trimmed_bytes", "Resident memory the heap keeper's trims gave back", registry=r
        )

        # The correspondence history (milter.gateway.history): 1 once loaded, 0 while unknown (loading,
        # or its table unreadable); messages judged without it; entries held in this worker's memory.
        self.history_ready = Gauge(
            "milter_history_ready", "1 when the correspondence history is loaded, 0 while unknown", registry=r
        )
        self.history_unknown = Counter(
            "milter_history_unknown", "Messages judged without the correspondence history", registry=r
        )
        self.history_entries = Gauge(
            "milter_history_entries", "Correspondence history entries held in memory", registry=r
        )

    def set_model(self, name: str, providers: Sequence[str], graph: str = "tree-ensemble") -> None:
        self.model.info({"name": name, "providers": ",".join(providers)})
        # one series at a time: the graph and provider scoring now, not every one ever used
        self.model_graph.clear()
        self.model_graph.labels(graph, providers[0] if providers else "none").set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """Minimal HTTP/1.0 server for /metrics and /healthz."""

    def __init__(self, metrics: GatewayMetrics, health: Callable[[], str | None]) -> None:
        self._metrics = metrics
        self._health = health  # returns None when healthy, else the reason
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._handle, host, port)
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                request = await reader.readuntil(b"\r\n\r\n")
            parts = request.split(b" ", 2)
            path = parts[1].split(b"?")[0] if len(parts) > 1 else b""
            if path == b"/metrics":
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, self._metrics.render()
            elif path == b"/healthz":
                problem = self._health()
                status = "200 OK" if problem is None else "503 Service Unavailable"
                ctype, body = "text/plain", (problem or "ok").encode() + b"\n"
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            head = f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError) as exc:
            log.debug(kv("metrics_request_failed", error=type(exc).__name__))
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
