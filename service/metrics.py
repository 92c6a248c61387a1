"""Prometheus metrics, one registry per app so that several apps in one process never collide.

`app.state.metrics` holds the `Metrics`; the runtime records batches, the item service sets
`index_size`, the middleware here times every request by its route template (`/items/{item_id}`,
not the concrete path, so label cardinality stays bounded).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Every metric the service exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.request_seconds = Histogram(
            "simclr_embed_request_duration_seconds",
            "HTTP request latency by route template",
            ("method", "route", "status"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "simclr_embed_batch_size",
            "images per ONNX Runtime run (micro-batching)",
            ("model_id",),
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.inference_seconds = Histogram(
            "simclr_embed_inference_seconds",
            "time of one ONNX Runtime run",
            ("model_id",),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.images_embedded = Counter(
            "simclr_embed_images_embedded", "images embedded", ("model_id",), registry=self.registry
        )
        self.index_size = Gauge(
            "simclr_embed_index_size", "vectors in the search index", ("model_id",), registry=self.registry
        )
        self.index_fresh = Gauge(
            "simclr_embed_index_fresh_vectors",
            "vectors searched exactly beside the HNSW graph until the background inserts them (index_fresh_max)",
            ("model_id",),
            registry=self.registry,
        )
        self.broker_up = Gauge(
            "simclr_embed_broker_up",
            "1 when the job broker answered the last readiness check or scrape; job submission needs it",
            registry=self.registry,
        )
        self.active_model = Gauge(
            "simclr_embed_active_model_info",
            "1 for the active model",
            ("model_id", "method", "backbone", "embedding_dim", "variant"),
            registry=self.registry,
        )

    def set_active_model(
        self, model_id: str | None, method: str = "", backbone: str = "", dim: int = 0, variant: str = "fp32"
    ) -> None:
        """`variant`: which of the model's variants serves (fp32, int8)."""
        self.active_model.clear()
        if model_id is not None:
            self.active_model.labels(model_id, method, backbone, str(dim), variant).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetricsMiddleware:
    """Pure ASGI middleware (no body buffering): latency per method, route template and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "<unmatched>"
            self.metrics.request_seconds.labels(scope["method"], template, str(status)).observe(
                time.perf_counter() - start
            )
