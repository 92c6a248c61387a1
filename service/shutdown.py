"""Stop requests from signal handlers, without a lock anywhere on the handler's path.

A Python signal handler runs in the main thread between two bytecodes, wherever that thread
is: inside `threading.Event.wait()` or inside the handler itself when a second signal follows
the first (`make up` forwards SIGTERM to its child, so one `kill` of the group delivers two).
`Event.set()` takes the Condition lock the interrupted code may already hold, and a
non-reentrant lock taken twice by one thread never returns: `simclr-embed up` hung that way.
`StopFlag.set()` only stores True; `wait()` polls the flag with short sleeps.
"""

from __future__ import annotations

import signal
import time
from types import FrameType

POLL_S = 0.05


class StopFlag:
    """A one-way stop request: `set()` is safe in a signal handler, `wait()` in any thread."""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True  # one store: no lock, no allocation that could wait

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float) -> bool:
        """True as soon as the flag is set (within POLL_S), False after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not self._set:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(POLL_S, remaining))
        return True


def install_stop_handlers(flag: StopFlag, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
    """Route `signals` to `flag.set()` (main thread only, as `signal.signal` requires)."""

    def request_stop(signum: int, frame: FrameType | None) -> None:
        flag.set()

    for signum in signals:
        signal.signal(signum, request_stop)
