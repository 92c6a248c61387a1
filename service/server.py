"""`simclr-embed serve`: the API alone under uvicorn (no broker or worker started)."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from service.app import create_app
from service.settings import Settings


def main(argv: list[str] | None = None) -> int:
    defaults = Settings()
    parser = argparse.ArgumentParser(prog="simclr-embed serve", description="run the API (FastAPI + uvicorn)")
    parser.add_argument("--host", default=defaults.host, help="default: SIMCLR_EMBED_HOST or %(default)s")
    parser.add_argument("--port", type=int, default=defaults.port, help="default: SIMCLR_EMBED_PORT or %(default)s")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--access-log", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    settings = defaults.model_copy(update={"host": args.host, "port": args.port})
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.access_log,
        timeout_graceful_shutdown=10,
    )
    return 0
