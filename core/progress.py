"""What a run shows while it works: progress bars that suit where they are shown, and expected log
records kept out of the way (``quiet``).

On a terminal (or in a notebook) a bar is tqdm's, redrawn in place. When stderr is a file or a pipe
(a cluster job's log, ``mixgrpo train ... 2> log``) a redrawn bar fills the log with
carriage-return frames, so the bar writes a whole line instead: when it starts, at most every
``LOG_INTERVAL_S`` seconds while it runs, and when it ends.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

from tqdm.auto import tqdm

#: seconds between two progress lines written to a log
LOG_INTERVAL_S = 30.0


class LineProgress(tqdm):
    """tqdm writing one line per update it shows (every ``mininterval`` s, ``LOG_INTERVAL_S`` by
    default), and the final state when it closes; never a carriage return."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        kwargs.setdefault("ncols", 100)
        self._shown_n: float | None = None
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "":  # a request to clear the bar: a log has nothing to clear
            return True
        self.fp.write((self.__str__() if msg is None else msg).rstrip() + "\n")
        self.fp.flush()
        self._shown_n = self.n
        return True

    def clear(self, nolock: bool = False) -> None:
        """Nothing to clear in a log."""

    def close(self) -> None:
        if getattr(self, "disable", True):
            return
        if self.leave is not False and self._shown_n != self.n:
            self.display()
        self.disable = True
        self._decr_instances(self)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress_bar(*args: Any, **kwargs: Any) -> tqdm:
    """A tqdm bar (same arguments) on a terminal or in a notebook, else a ``LineProgress``."""
    stream = kwargs.get("file") or sys.stderr
    if _is_terminal(stream) or "ipykernel" in sys.modules:
        return tqdm(*args, **kwargs)
    return LineProgress(*args, **kwargs)


@contextlib.contextmanager
def quiet(logger: logging.Logger, prefix: str) -> Iterator[None]:
    """Drop the records of ``logger`` whose message starts with ``prefix`` (and no other) while
    inside: messages a library logs for something expected (gin's search misses, diffusers' dtype
    casts), which would otherwise bury the ones that matter."""
    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(prefix)

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)
