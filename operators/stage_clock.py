"""Seconds per search stage (query embedding, first stage, rescoring, fetch), per request.

The query server reports where a search's time went as a Prometheus histogram per stage.
The stages run deep in `jobs.table` and `operators.search`, which know nothing of HTTP or
Prometheus, so they only time themselves into whatever collector the caller opened
(`collecting`); with none open (the Python API, a job), `stage` costs one context
variable lookup.

A context variable, not a global: the server runs requests in a thread pool, and each
request's stages must land in its own collector. The collector is a plain dict that the
context carries by reference, so stages timed in a worker thread are seen by the caller
that opened it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

STAGES = ("embed", "first_stage", "rescore", "fetch")
"""The stages a search is split into. A float search through Lance is one call that finds
and fetches the rows together: it is timed as `first_stage`."""

_COLLECTOR: ContextVar[dict[str, float] | None] = ContextVar("quiver_search_stages",
                                                             default=None)


@contextmanager
def collecting() -> Iterator[dict[str, float]]:
    """Collect the seconds of every `stage` run inside this block, summed by stage."""
    seconds: dict[str, float] = {}
    token = _COLLECTOR.set(seconds)
    try:
        yield seconds
    finally:
        _COLLECTOR.reset(token)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Time this block as stage `name` when a collector is open.

    >>> with collecting() as seen:
    ...     with stage("embed"):
    ...         pass
    >>> list(seen)
    ['embed']
    """
    seconds = _COLLECTOR.get()
    if seconds is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
