"""A one-line progress bar on stderr, only when stderr is a terminal (never in CI logs or log files).

Log records written by the ``resnetc`` handlers clear the bar line first (a handler filter), so log lines and the
bar do not overwrite each other; the next update redraws it."""
from __future__ import annotations

import logging
import sys
import time


class ProgressBar(logging.Filter):
    def __init__(self, total: int, start: int = 0, stream=None, width: int = 30):
        super().__init__()
        self.stream = stream or sys.stderr
        self.total = max(int(total), 1)
        self.start = start
        self.width = width
        self.t0 = time.monotonic()
        self.shown = False
        self.last = 0.0
        self._logger = logging.getLogger("resnetc")

    @classmethod
    def maybe(cls, total: int, start: int = 0, stream=None):
        stream = stream or sys.stderr
        isatty = getattr(stream, "isatty", None)
        return cls(total, start, stream) if isatty and isatty() else None

    def __enter__(self):
        self._handlers = list(self._logger.handlers)
        for h in self._handlers:
            h.addFilter(self)
        return self

    def __exit__(self, *exc):
        for h in self._handlers:
            h.removeFilter(self)
        self.clear()

    def filter(self, record) -> bool:  # called before a log line is written
        self.clear()
        return True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False

    def update(self, it: int, loss=None) -> None:
        now = time.monotonic()
        if now - self.last < 0.1 and it < self.total:
            return
        self.last = now
        frac = min(max(it / self.total, 0.0), 1.0)
        done = int(frac * self.width)
        rate = (it - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - it) / rate if rate > 0 else 0.0
        text = f"\r[{'#' * done}{'.' * (self.width - done)}] {it}/{self.total}"
        if loss is not None:
            text += f" loss {float(loss):.4g}"
        text += f" {rate:.1f} it/s eta {eta:.0f}s\033[K"
        self.stream.write(text)
        self.stream.flush()
        self.shown = True
