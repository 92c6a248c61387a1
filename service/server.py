"""`simclr-embed serve`: the API alone under uvicorn (no broker or worker started).

This is the one way the API is started: `simclr-embed up` runs it as its API child process.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import logging

import uvicorn

from service.app import create_app
from service.settings import Settings

# glibc's mallopt parameter; a fixed threshold also stops glibc raising it after each large free.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20


def return_freed_memory_to_os() -> bool:
    """Serve every allocation of 1 MiB or more (decoded images, batches) from its own mmap.

    glibc otherwise raises its mmap threshold to the size of the largest block freed (up to
    32 MiB), after which image-sized buffers come from per-thread heaps that keep the pages
    when freed: a process that once decoded many large images stayed gigabytes larger
    (docs/reliability.md). With a fixed threshold each such buffer is unmapped when freed.
    Returns False where the C library is not glibc (nothing changed).
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        mallopt = None
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


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
    if not return_freed_memory_to_os():
        logging.getLogger(__name__).info("not glibc: the allocator's own policy decides when freed memory returns")
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.access_log,
        timeout_graceful_shutdown=10,
    )
    return 0
