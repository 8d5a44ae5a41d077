"""Progress a person can read: done / total, rate and ETA for a long command.

    progress = Progress("label", total=n, unit="images")  # total None: unknown (no ETA, no percent);
                                                           # done=k: k already done (a resume)
    for batch in batches:
        progress.add(len(batch))                           # prints when it is time to
    progress.close()                                       # the last line, always

On a terminal (stdout is a TTY) it rewrites one live line (at most every `tty_every_s`); otherwise (a log, CI,
`ray job logs`) it prints a line every `every_s` seconds. The rate is over the last `window_s` seconds, so
start-up does not drag the ETA. `snapshot()` is the same figures as a dict (what `label` writes to its
progress file for `--status`); `on_report(snapshot)` is called each time a line is due, printed or not.
`enabled=False` keeps the counting and the callback and prints nothing.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from typing import TextIO


def format_duration(seconds: float | None) -> str:
    """1h02m, 4m05s, 12s; '?' when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class Progress:
    """Counts work done against a total and reports it (see the module doc)."""

    def __init__(
        self,
        name: str,
        total: int | None = None,
        unit: str = "items",
        done: int = 0,
        every_s: float = 10.0,
        tty_every_s: float = 0.5,
        window_s: float = 60.0,
        stream: TextIO | None = None,
        enabled: bool = True,
        on_report: Callable[[dict], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.name, self.total, self.unit = name, total, unit
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = tty_every_s if self.tty else every_s
        self.window_s, self.enabled, self.on_report, self.clock = window_s, enabled, on_report, clock
        self.done = done  # work already done before this run (a resume): in done/total, not in the rate
        self.started = clock()
        self.samples: deque[tuple[float, int]] = deque([(self.started, done)])
        self.last_report = self.started
        self.live = False  # a live line is on the terminal, not yet ended with a newline

    def add(self, n: int = 1) -> None:
        """`n` more done; reports when a line is due."""
        self.done += n
        now = self.clock()
        self.samples.append((now, self.done))
        while len(self.samples) > 2 and now - self.samples[1][0] > self.window_s:
            self.samples.popleft()
        if now - self.last_report >= self.every_s:
            self.report(now)

    def set_total(self, total: int | None) -> None:
        self.total = total

    def rate(self) -> float:
        """Per second over the window (since the start for the first `window_s`)."""
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0

    def snapshot(self) -> dict:
        """done, total, rate (per second), eta_s (None when unknown), elapsed_s."""
        rate = self.rate()
        left = None if self.total is None else max(self.total - self.done, 0)
        eta = 0.0 if left == 0 else (left / rate if left is not None and rate > 0 else None)
        return {"done": self.done, "total": self.total, "rate": rate, "eta_s": eta, "elapsed_s": self.clock() - self.started}

    def line(self) -> str:
        s = self.snapshot()
        if self.total:
            done = f"{s['done']:,}/{self.total:,} {self.unit} ({100 * s['done'] / self.total:.1f}%)"
        else:
            done = f"{s['done']:,} {self.unit}"
        return f"{self.name}: {done}, {s['rate']:,.1f} {self.unit}/s, ETA {format_duration(s['eta_s'])}"

    def report(self, now: float | None = None) -> None:
        self.last_report = self.clock() if now is None else now
        if self.on_report is not None:
            self.on_report(self.snapshot())
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\x1b[2K" + self.line())
            self.live = True
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Report the final figures and end the live line."""
        self.report()
        if self.enabled and self.live:
            self.stream.write("\n")
            self.stream.flush()
            self.live = False
