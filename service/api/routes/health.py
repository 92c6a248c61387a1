"""Routes: liveness, readiness and Prometheus metrics.

Readiness means ready to serve /embed and /search: a model and its index are loaded. The job
broker is reported (`checks.broker`, the `simclr_embed_broker_up` gauge) but does not make a
replica unready: a load balancer must not drop a replica that serves well because job
submission is down; while it is, `POST /train-jobs` answers 503 `jobs_unavailable`. The item
store is reported the same way (`checks.store`): while it is unreachable a host with a
loaded index keeps answering searches from memory, so it stays ready; one that started
during the outage serves the active model's snapshot from its own disk (ready, writes 503
until the store answers), and without one has no index and is not ready until the store
answers.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import State

from service.api.errors import error_body

router = APIRouter(tags=["health"])
# The checks that decide readiness; others (the broker) are reported only.
SERVING_CHECKS = ("model", "index")


async def broker_check(state: State) -> str:
    """The broker's line in `checks`, its gauge set on the way (1: answers, 0: not)."""
    jobs = getattr(state, "jobs", None)
    up = jobs is not None and await run_in_threadpool(jobs.ping)
    state.metrics.broker_up.set(1 if up else 0)
    if up:
        return "ok"
    if jobs is None or not jobs.broker_url:
        return "not configured (SIMCLR_EMBED_BROKER_URL): job submission answers 503; serving is unaffected"
    return "does not answer: job submission answers 503 until it does; serving is unaffected"


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process answers; nothing else is checked."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "not ready; `checks` says why"}})
async def readyz(request: Request) -> JSONResponse:
    """200 when a model and the item index are loaded (ready to serve /embed and /search); else
    503. The broker's state is in `checks` either way (see the module docstring).

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
        checks["store"] = stats["store"]
    checks["broker"] = await broker_check(state)
    failing = {k: checks[k] for k in SERVING_CHECKS if k in checks and not checks[k].startswith("ok")}
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
        for gauge, key in ((state.metrics.index_size, "index_size"), (state.metrics.index_fresh, "index_fresh")):
            gauge.clear()
            if stats["served_model"]:
                gauge.labels(stats["served_model"]).set(stats[key])
    await broker_check(state)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
