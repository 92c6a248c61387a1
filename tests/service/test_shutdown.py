"""The stop handler `up` installs takes no lock: a signal may land anywhere, even inside itself.

A signal handler runs in the main thread between two bytecodes of whatever it interrupted. The
tests emulate that exactly: a profile hook calls the installed handler again at every function call
and after every C call (lock acquisitions included) made inside the handler, or inside the main loop's `wait()`, so
each point where a real second signal could land is tried. The run happens on a helper thread
so that a deadlock fails the test instead of hanging it: `threading.Event`, the handler `up`
had, takes its Condition lock in `set()` and never returns when re-entered there.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from service.shutdown import StopFlag, install_stop_handlers


@pytest.fixture
def installed() -> Iterator[tuple[StopFlag, Callable[..., Any]]]:
    """A fresh flag behind the real SIGINT/SIGTERM handlers; the previous handlers restored after."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    flag = StopFlag()
    install_stop_handlers(flag)
    handler = signal.getsignal(signal.SIGTERM)
    assert callable(handler) and handler is signal.getsignal(signal.SIGINT)
    try:
        yield flag, handler
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def signal_everywhere(body: Callable[[], object], handler: Callable[..., Any]) -> tuple[bool, list[int]]:
    """Run `body` on a thread, calling `handler(SIGTERM, None)` at each Python call and after
    each C call it makes.
    Returns (finished within 2 s, how many nested calls were made)."""
    calls: list[int] = []
    nesting = False

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal nesting
        if event in ("call", "c_return") and not nesting:
            nesting = True
            try:
                handler(signal.SIGTERM, None)
                calls.append(1)
            finally:
                nesting = False

    def run() -> None:
        sys.setprofile(profile)
        try:
            body()
        finally:
            sys.setprofile(None)

    thread = threading.Thread(target=run, daemon=True)  # daemon: a deadlocked one must not block exit
    thread.start()
    thread.join(2.0)
    return not thread.is_alive(), calls


def test_a_second_signal_inside_the_handler_returns_at_once(installed) -> None:
    flag, handler = installed
    start = time.monotonic()
    finished, calls = signal_everywhere(lambda: handler(signal.SIGTERM, None), handler)
    assert finished, "the stop handler deadlocked when a second signal arrived inside it"
    assert calls and time.monotonic() - start < 1.0 and flag.is_set()


def test_a_signal_while_the_main_loop_waits_returns_and_ends_the_wait(installed) -> None:
    flag, handler = installed
    woke: list[bool] = []
    start = time.monotonic()
    finished, calls = signal_everywhere(lambda: woke.append(flag.wait(30.0)), handler)
    assert finished, "the stop handler deadlocked when a signal arrived during wait()"
    assert woke == [True] and calls and time.monotonic() - start < 1.0


def test_wait_times_out_without_a_signal() -> None:
    flag = StopFlag()
    start = time.monotonic()
    assert flag.wait(0.2) is False and 0.2 <= time.monotonic() - start < 1.0
    flag.set()
    assert flag.wait(10.0) is True
