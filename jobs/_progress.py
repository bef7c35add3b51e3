"""Progress people can read: one live bar on a terminal, a plain line every few seconds
elsewhere, and Ray's own logs in a file instead of on the screen.

The bar counts documents of shards fully written, against the plan's document count
(known exactly before embedding starts: the plan's pass counted them), so the ETA is
the remaining documents at the rate so far. Ray Data's per-operator progress, its
execution logs, Ray's start-up warnings and Lance's write warnings from the workers
need no action from the user; with `quiet_ray_logs` they go to a log file (or stay
quiet), and `--verbose` keeps them on stderr. One line is left: Ray's C++ core worker
prints a notice about actor constructor arguments straight to stderr when Ray Data
starts its actor pool; silencing it (`RAY_BACKEND_LOG_LEVEL`) makes every Ray process
print a line saying so, which is worse.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import TextIO

PLAIN_EVERY_S = 10.0
"""Seconds between progress lines when stderr is not a terminal."""


def _duration(seconds: float) -> str:
    """
    >>> _duration(42.4), _duration(3725)
    ('42s', '1h02m')
    """
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class JobProgress:
    """The embed phase's progress: documents done of `total`, chunks per second, ETA.

    Args:
        total: Documents the job embeds (the plan's count), or chunks (`unit`) for a
            reindex, which embeds changed chunks.
        stream: Where it goes (stderr: stdout is for `--json`).
        live: A live bar (rich) instead of plain lines; default: whether `stream` is a
            terminal.
        label: What the work is called.
        unit: What `total` counts.
    """

    def __init__(self, total: int, *, stream: TextIO | None = None,
                 live: bool | None = None, label: str = "embedding",
                 unit: str = "documents") -> None:
        self.total, self.stream = max(total, 0), stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.label, self.unit = label, unit
        self.documents = self.chunks = 0
        self.started = time.perf_counter()
        self._last_line = self.started
        self._bar = None  # started with the first update, after Ray's start-up output

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
        )

        self._bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn(self.unit), TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[spent]}"), TextColumn("ETA {task.fields[eta]}"),
            console=Console(file=self.stream), transient=False)
        self._task = self._bar.add_task(self.label, total=self.total or None, rate="",
                                        eta="-", spent="")
        self._bar.start()

    def rate(self) -> float:
        """Chunks per second so far."""
        return self.chunks / max(time.perf_counter() - self.started, 1e-9)

    def eta(self) -> float | None:
        """Seconds left at the document rate so far (None before the first document)."""
        if not self.documents:
            return None
        spent = time.perf_counter() - self.started
        return spent / self.documents * max(self.total - self.documents, 0)

    def line(self) -> str:
        """The plain progress line.

        >>> p = JobProgress(200, live=False)
        >>> p.documents, p.chunks = 50, 120
        >>> p.line().startswith("[quiver] embedding: 50/200 documents (25.0%), ")
        True
        """
        share = 100 * self.documents / self.total if self.total else 100.0
        eta = self.eta()
        return (f"[quiver] {self.label}: {self.documents}/{self.total} {self.unit} "
                f"({share:.1f}%), {self.chunks} chunks at {self.rate():.0f}/s"
                + (f", ETA {_duration(eta)}" if eta is not None else ""))

    def update(self, *, documents: int, chunks: int) -> None:
        """Set the counts (documents of fully written shards, chunks written)."""
        if (documents, chunks) == (self.documents, self.chunks):
            return
        self.documents, self.chunks = documents, chunks
        if self.live:
            if self._bar is None:
                self._start_bar()
            eta = self.eta()
            self._bar.update(self._task, completed=documents, rate=f"{self.rate():.0f} "
                             "chunks/s", eta="-" if eta is None else _duration(eta),
                             spent=_duration(time.perf_counter() - self.started))
            return
        now = time.perf_counter()
        if now - self._last_line >= PLAIN_EVERY_S:
            self._say(now)

    def _say(self, now: float) -> None:
        self._last_line, self._said = now, (self.documents, self.chunks)
        print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        """Stop the bar (a terminal) or print the last line (elsewhere) if not said yet."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        elif self.documents and getattr(self, "_said", None) != (self.documents, self.chunks):
            self._say(time.perf_counter())


class _State:
    log_file: Path | None = None


def quiet_ray_logs(log_file: Path) -> None:
    """Send Ray's and Ray Data's logs to `log_file` instead of stderr from now on, hide
    Ray Data's own progress bars, and keep Lance's Rust warnings from the workers off
    the screen. Call before Ray starts."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    _State.log_file = log_file
    os.environ.setdefault("LANCE_LOG", "error")  # workers inherit it through the raylet
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    route_ray_logs()


def route_ray_logs() -> None:
    """Move every `ray.*` logger's console handlers to the log file (Ray and Ray Data
    install theirs when they start, so this runs again after each); a no-op unless
    `quiet_ray_logs` was called."""
    if _State.log_file is None:
        return
    to_file = None
    for name in ["ray", *[n for n in logging.Logger.manager.loggerDict if n.startswith("ray")]]:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and \
                    not isinstance(handler, logging.FileHandler) and \
                    getattr(handler, "stream", None) in (sys.stderr, sys.stdout):
                logger.removeHandler(handler)
                if to_file is None:
                    to_file = logging.FileHandler(_State.log_file, encoding="utf-8")
                    to_file.setFormatter(logging.Formatter(
                        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
                logger.addHandler(to_file)
    try:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    except ImportError:
        pass
