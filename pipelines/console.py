"""The console every job shares: one line per stage as it starts and ends, a progress reporter
that is a bar on a terminal and compact periodic lines when piped to a file, and the verbose
switch (Ray's own logs and their known-noise filters live in ray_setup.py, Ray's edge)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

VERBOSE_ENV = "CLIPFORGE_VERBOSE"  # read by the processes Ray starts (worker setup hook)


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


class OpenClipChatter(logging.Filter):
    """open_clip logs to the root logger: its INFO steps, and one known warning if given."""

    def __init__(self, fragment: str | None):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        if f"{os.sep}open_clip{os.sep}" not in record.pathname:
            return True
        if record.levelno < logging.WARNING:
            return False
        return not (self.fragment and self.fragment in record.getMessage())


@contextlib.contextmanager
def quiet_open_clip(known_warning: str | None = None):
    """Around an open_clip call (unless verbose): drop its INFO steps and `known_warning`."""
    root = logging.getLogger()
    drop = OpenClipChatter(known_warning)
    if not is_verbose():
        root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def say(line: str, stream=None) -> None:
    stream = stream or sys.stdout
    print(line, file=stream, flush=True)


@contextlib.contextmanager
def stage(name: str, detail: str = "", stream=None):
    """`==> name detail` as the stage starts, `<== name done in 12s` (or failed) as it ends."""
    start = time.monotonic()
    say(f"==> {name}" + (f"  {detail}" if detail else ""), stream)
    try:
        yield
    except BaseException:
        say(f"<== {name} failed after {format_duration(time.monotonic() - start)}", stream)
        raise
    say(f"<== {name} done in {format_duration(time.monotonic() - start)}", stream)


def format_fields(fields: dict) -> str:
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())


class Progress:
    """Counts, rate and time left of `total` units: a bar redrawn in place on a terminal,
    else one line per `every_s` seconds (every update with 0) and a last one at the end."""

    def __init__(
        self,
        label: str,
        total: int,
        unit: str = "",
        *,
        start: int = 0,
        every_s: float = 10.0,
        stream=None,
        tty: bool | None = None,
    ):
        self.label = label
        self.total = max(int(total), 0)
        self.unit = unit
        self.every_s = every_s
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.start = start
        self.done = start
        self.fields = {}
        self.t0 = self.last_print = time.monotonic()
        self.printed_at, self.first = None, None  # first: (done, time) of the first update

    def rate(self) -> float:
        """Units per second since the first update: start-up before the first unit (Ray
        starting workers, say) would otherwise inflate the time left."""
        if self.first is None or self.done <= self.first[0]:
            return (self.done - self.start) / max(time.monotonic() - self.t0, 1e-9)
        return (self.done - self.first[0]) / max(time.monotonic() - self.first[1], 1e-9)

    def line(self) -> str:
        pct = f"{100 * self.done / self.total:3.0f}%" if self.total else ""
        unit = f"{self.unit} " if self.unit else ""
        rate = self.rate()
        left = self.total - self.done
        eta = format_duration(left / rate) if rate > 0 and left > 0 else ("done" if left <= 0 else "?")
        parts = [
            self.label,
            f"{unit}{self.done}/{self.total}",
            pct,
            format_fields(self.fields),
            f"{rate:.3g} {self.unit or 'it'}s/s",
            f"eta {eta}",
        ]
        if self.tty:
            filled = int(20 * self.done / self.total) if self.total else 0
            parts.insert(1, "[" + "#" * filled + "." * (20 - filled) + "]")
        return "  ".join(p for p in parts if p)

    def update(self, n: int = 1, **fields) -> None:
        self.set(self.done + n, **fields)

    def set(self, done: int, **fields) -> None:
        if self.first is None:
            self.first = (done, time.monotonic())
        self.done = done
        self.fields.update(fields)
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r\x1b[2K" + self.line())
            self.stream.flush()
        elif now - self.last_print >= self.every_s or self.done >= self.total:
            self.emit(now)

    def emit(self, now: float) -> None:
        say(self.line(), self.stream)
        self.last_print = now
        self.printed_at = self.done

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
        elif self.printed_at != self.done:
            self.emit(time.monotonic())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
