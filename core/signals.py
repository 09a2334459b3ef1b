"""Stopping a run at an iteration boundary: SIGTERM (what schedulers send before preemption) and a
first Ctrl-C ask the loop to stop after its current iteration, with a checkpoint; a second Ctrl-C
aborts at once."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def stop_on_signals() -> Iterator[list[str]]:
    """Yields a list that receives the name of a SIGTERM or first SIGINT (Ctrl-C) while inside; the
    loop then stops after its current iteration. A second Ctrl-C raises ``KeyboardInterrupt``.
    Outside the main thread (where handlers cannot be installed) nothing is caught."""
    caught: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def handle(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if caught and signum == signal.SIGINT:
            raise KeyboardInterrupt
        caught.append(name)
        print(f"\n{name}: stopping after this iteration with a checkpoint (Ctrl-C again to abort)", flush=True)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield caught
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
