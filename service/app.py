"""The FastAPI application factory and its lifespan.

Each component is built by a factory in its own module and kept on `app.state`:
`registry` (ModelRegistry), `runtime` (service.runtime.RuntimeManager), `items`
(service.items.service.build_item_service), `classifiers`
(service.classifiers.service.build_classifier_service), `jobs` (service.jobs.client.build_job_client),
plus `settings` and `metrics`. Start order: registry (stale staging swept) -> runtime (active
model loaded) -> items (listens to activations) -> classifiers (refit
when the served index changes) -> jobs; shutdown in reverse.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool

from service import __version__
from service.api.errors import install_error_handlers
from service.api.limits import BodyLimitMiddleware, DecodeBudget
from service.api.routes import (
    classifiers,
    embed,
    finetune_jobs,
    health,
    index_jobs,
    items,
    jobs,
    models,
    search,
    web,
)
from service.classifiers.service import build_classifier_service
from service.contract.registry import ModelRegistry
from service.items.service import build_item_service
from service.jobs.client import build_job_client
from service.metrics import Metrics, RequestMetricsMiddleware
from service.runtime import RuntimeManager
from service.settings import Settings

log = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    registry = ModelRegistry(settings.models_dir)
    if swept := registry.sweep_staging():
        log.warning("removed %d half-published models from %s", swept, registry.root / ".staging")
    runtime = RuntimeManager(registry, settings, app.state.metrics)
    await runtime.start()
    app.state.registry, app.state.runtime = registry, runtime
    app.state.items = await run_in_threadpool(build_item_service, settings, runtime)
    app.state.classifiers = await run_in_threadpool(build_classifier_service, settings, app.state.items, runtime)
    app.state.jobs = build_job_client(settings)
    try:
        yield
    finally:
        app.state.jobs.close()
        await run_in_threadpool(app.state.classifiers.close)
        await run_in_threadpool(app.state.items.close)
        await runtime.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    # /docs (Swagger UI) and /redoc with their scripts served from the package, so they work offline.
    app = FastAPIOffline(title="simclr-embed", version=__version__, lifespan=lifespan, static_url="/docs-static")
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.decode_budget = DecodeBudget(settings.decode_budget_pixels)
    install_error_handlers(app)
    for module in (health, embed, items, search, models, jobs, finetune_jobs, index_jobs, classifiers, web):
        app.include_router(module.router)
    # Added last = outermost: metrics time everything, the size limit guards every body.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
        )
    app.add_middleware(RequestMetricsMiddleware, metrics=app.state.metrics)
    return app
