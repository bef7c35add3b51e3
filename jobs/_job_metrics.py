"""A running job's counters in Ray's own metrics (`ray.util.metrics`).

Ray exports what its processes record to its Prometheus endpoint (each node's
`--metrics-export-port`) and its dashboard's Grafana panels, so a job's progress shows
beside Ray's own metrics with no server of Quiver's. Ray prefixes the names with `ray_`
and counters end in `_total`: `quiver_job_chunks` is scraped as
`ray_quiver_job_chunks_total`. Every series carries a `table` tag (the table folder's
name), which stays bounded: one per table, not per run.

Two sources, and how far each is exact:

- the driver records the job's own counts as it learns them: documents read, rejected
  and embedded, chunks written, tokens and commits (`DriverMeter`). They are exact: the
  driver lives for the whole job and its totals are the summary's;
- each embed actor records its rows, tokens, forward batches, out-of-memory retries and
  its busy and idle seconds (`MeteredEmbedder`). Ray reports a worker's metrics every
  few seconds, so what an actor recorded just before it exits can be lost: these are
  approximate, and the dashboards plot them as rates.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from operators.embed import Embedder

DRIVER_COUNTERS = {
    "quiver_job_documents_read": "Source documents the job planned from (valid and rejected).",
    "quiver_job_documents_rejected": "Source documents refused (see the rejects table).",
    "quiver_job_documents_embedded": "Documents whose every chunk is written.",
    "quiver_job_chunks": "Chunks written to the table.",
    "quiver_job_tokens": "Tokens embedded (real tokens, no padding).",
    "quiver_job_commits": "Checkpoint commits.",
}
ACTOR_COUNTERS = {
    "quiver_embed_rows": "Chunks embedded by the embed actors.",
    "quiver_embed_tokens": "Tokens embedded by the embed actors.",
    "quiver_embed_batches": "Forward passes run by the embed actors.",
    "quiver_embed_oom_retries": "Batches retried in halves after running out of GPU memory.",
    "quiver_embed_busy_seconds": "Seconds the embed actors spent embedding blocks.",
    "quiver_embed_idle_seconds": "Seconds the embed actors waited for a block (after their "
                                 "model loaded).",
}
_COUNTERS: dict[str, Any] = {}
"""This process's Ray counters, made on first use (Ray must be up by then)."""


def table_tag(uri: str) -> str:
    """The `table` tag of a table URI: its folder's name without `.lance`.

    >>> table_tag("s3://bucket/tables/docs.lance/")
    'docs'
    """
    name = PurePosixPath(uri.rstrip("/")).name
    return name.removesuffix(".lance") or name


def _inc(name: str, value: float, tags: dict[str, str]) -> None:
    """Add `value` to counter `name` (Ray refuses increments that are not positive)."""
    if value <= 0:
        return
    counter = _COUNTERS.get(name)
    if counter is None:
        from ray.util.metrics import Counter

        description = DRIVER_COUNTERS.get(name) or ACTOR_COUNTERS[name]
        counter = _COUNTERS[name] = Counter(name, description=description,
                                            tag_keys=("table",))
    counter.inc(value, tags=tags)


class DriverMeter:
    """The driver's exact counts: set totals as they grow; the increments are recorded."""

    def __init__(self, table_uri: str) -> None:
        self.tags = {"table": table_tag(table_uri)}
        self._sent: dict[str, float] = {}

    def totals(self, **counts: float) -> None:
        """Record each count's growth since the last call (names without the prefix:
        `documents_read`, `documents_rejected`, `documents_embedded`, `chunks`,
        `tokens`, `commits`)."""
        for short, total in counts.items():
            name = f"quiver_job_{short}"
            if name not in DRIVER_COUNTERS:
                raise KeyError(f"no job counter {short!r}")
            _inc(name, total - self._sent.get(name, 0), self.tags)
            self._sent[name] = max(total, self._sent.get(name, 0))


class ActorMeter:
    """An embed actor's counters, recorded around each block it embeds: rows, tokens,
    forward batches, out-of-memory retries, and its busy and idle seconds (idle from
    the model's load or the last block). One per actor process; the pool's actors
    (`MeteredEmbedder`) and the one-model actors of `jobs._embed_service` share it."""

    def __init__(self) -> None:
        self._idle_since = time.perf_counter()  # the model is loaded: waiting from here

    def block(self, embedder: Embedder, batch: pa.Table, *, table: str,
              embed: Callable[[pa.Table], pa.Table] | None = None) -> pa.Table:
        """`embed(batch)` (by default `embedder(batch)`), recorded under the `table` tag."""
        tags = {"table": table}
        before = (embedder.forward_batches, embedder.oom_retries)
        started = time.perf_counter()
        _inc("quiver_embed_idle_seconds", started - self._idle_since, tags)
        out = (embed or embedder)(batch)
        self._idle_since = time.perf_counter()
        _inc("quiver_embed_busy_seconds", self._idle_since - started, tags)
        _inc("quiver_embed_rows", out.num_rows, tags)
        if "_tokens" in out.column_names:
            _inc("quiver_embed_tokens", pc.sum(out.column("_tokens")).as_py() or 0, tags)
        _inc("quiver_embed_batches", embedder.forward_batches - before[0], tags)
        _inc("quiver_embed_oom_retries", embedder.oom_retries - before[1], tags)
        return out


class MeteredEmbedder(Embedder):
    """`operators.embed.Embedder` as the job's pool actor: the same work, each block
    recorded by an `ActorMeter`."""

    def __init__(self, *args, table_uri: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._table = table_tag(table_uri)
        self._meter = ActorMeter()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self._meter.block(self, batch, table=self._table, embed=super().__call__)
