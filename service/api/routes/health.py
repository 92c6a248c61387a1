"""Routes: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from service.api.errors import error_body

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process answers; nothing else is checked."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "not ready; `checks` says why"}})
async def readyz(request: Request) -> JSONResponse:
    """200 when a model is loaded, the item index is loaded and the broker answers; else 503.

    Components on `app.state` report themselves: `items.stats()["served_model"]` (None: no
    index loaded) and `jobs.ping() -> bool`.
    """
    state = request.app.state
    checks: dict[str, str] = {}
    runtime = state.runtime
    checks["model"] = f"ok: {runtime.active_id}" if runtime.active_id else (runtime.last_error or "no active model")
    items = getattr(state, "items", None)
    if items is not None:
        stats = await run_in_threadpool(items.stats)
        served = stats["served_model"]
        checks["index"] = f"ok: {served}, {stats['index_size']} vectors" if served else "no search index is loaded"
    jobs = getattr(state, "jobs", None)
    if jobs is not None:
        up = await run_in_threadpool(jobs.ping)
        checks["broker"] = "ok" if up else "the job broker does not answer (or none is set: SIMCLR_EMBED_BROKER_URL)"
    failing = {k: v for k, v in checks.items() if not v.startswith("ok")}
    if failing:
        message = "not ready: " + "; ".join(f"{k}: {v}" for k, v in failing.items())
        return JSONResponse({**error_body("not_ready", message), "checks": checks}, status_code=503)
    return JSONResponse({"status": "ready", "checks": checks})


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    state = request.app.state
    items = getattr(state, "items", None)
    if items is not None:  # the index size is read at scrape time: always current, no coupling
        stats = await run_in_threadpool(items.stats)
        state.metrics.index_size.clear()
        if stats["served_model"]:
            state.metrics.index_size.labels(stats["served_model"]).set(stats["index_size"])
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
