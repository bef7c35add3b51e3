"""The driver's side of one streaming execution: turn written fragments into commits.

Write tasks emit one row per (task, shard) naming the fragments they wrote. A shard is
complete once its rows add up to the chunk count its read task announced; complete
shards are committed in groups (`shards_per_commit`, or whatever is complete after
`commit_interval_s`) while the actors keep embedding. Everything kept here is bounded by
the shards in flight, never by the rows of the corpus.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lance
import pyarrow as pa
from lance.fragment import FragmentMetadata

from jobs._plan import progress
from operators.write import commit
from schemas.errors import TableError


@dataclass
class _Pending:
    chunks: int
    written: int = 0
    fragments: list[FragmentMetadata] = field(default_factory=list)


@dataclass
class Checkpointer:
    """Commits complete shards as the write tasks report them.

    `mode` is 'create' (the first commit makes the table), 'append', or 'update' (a
    reindex: one commit at the end that also carries `deletions`).
    """

    uri: str
    schema: pa.Schema
    mode: str
    read_version: int | None
    job: str
    storage_options: dict[str, str]
    expect_latest: int
    shards_per_commit: int
    commit_interval_s: float
    ready: list[tuple[str, list[FragmentMetadata]]] = field(default_factory=list)
    """Complete shards not yet committed, with their fragments, in completion order."""
    deletions: tuple[list[int], list] = ([], [])
    carried: list[FragmentMetadata] = field(default_factory=list)
    """Rows written before the stream (a reindex's kept chunks), in the first commit."""
    total_shards: int = 0
    lease: Any = None
    """The run's table lease (`operators.lease.Lease`), checked before every commit."""
    rows: int = 0
    tokens: int = 0
    truncated_tokens: int = 0
    seconds: Counter[str] = field(default_factory=Counter)
    first_embedded_at: float | None = None
    versions: list[int] = field(default_factory=list)
    """Versions this job committed, in order."""
    first_commit_at: float | None = None
    loads: set[str] = field(default_factory=set)
    """Distinct model loads that embedded rows (bounded by actors and their restarts)."""
    _pending: dict[str, _Pending] = field(default_factory=dict)
    _last_commit: float = float("-inf")
    """When the last commit landed: none yet, so the first complete shard commits at once
    (the table exists, and its progress shows, from the first shard on)."""
    _committed_shards: int = 0
    on_shard_written: Callable[[str], None] | None = None
    """Called with each shard id once all its rows are written (progress)."""

    def consume(self, written: pa.Table) -> None:
        """Take a block of write-task rows (`jobs._lance_io.WRITTEN_SCHEMA`)."""
        for row in written.to_pylist():
            shard = self._pending.setdefault(row["shard"], _Pending(row["shard_chunks"]))
            shard.written += row["rows"]
            shard.fragments.extend(FragmentMetadata.from_json(json.dumps(f))
                                   for f in json.loads(row["fragments"]))
            self.rows += row["rows"]
            self.tokens += row["tokens"]
            self.truncated_tokens += row["truncated_tokens"]
            self.seconds.update(json.loads(row["seconds"]))
            self.loads.update(json.loads(row["loads"]))
            at = row["first_embedded_at"]
            if at is not None and (self.first_embedded_at is None or at < self.first_embedded_at):
                self.first_embedded_at = at
            if shard.written > shard.chunks:
                raise TableError(f"shard {row['shard']}: {shard.written} rows written for "
                                  f"{shard.chunks} chunks; refusing to commit duplicates")
            if shard.written == shard.chunks:
                self.ready.append((row["shard"], self._pending.pop(row["shard"]).fragments))
                if self.on_shard_written is not None:
                    self.on_shard_written(row["shard"])
        if self.mode == "update":
            return  # a reindex is one commit: readers see the old table or the new one
        while len(self.ready) >= self.shards_per_commit:
            self._commit(self.shards_per_commit)
        due = time.perf_counter() - self._last_commit >= self.commit_interval_s
        if self.ready and due:
            self._commit(len(self.ready))

    def add_empty(self, shards: list[str]) -> None:
        """Shards with nothing to write (every record rejected): committed like others."""
        self.ready.extend((s, []) for s in shards)

    def finish(self, *, always: bool = False) -> None:
        """Commit what is left; `always` makes an empty table when nothing was committed."""
        if self._pending:
            left = ", ".join(sorted(self._pending)[:5])
            raise TableError(f"{len(self._pending)} shard(s) never finished writing "
                              f"({left}); nothing of them was committed")
        if self.mode == "update":  # one commit, deletions included, even with no shards
            self._commit(len(self.ready))
            return
        while self.ready:
            self._commit(self.shards_per_commit)
        if always and not self.versions:
            self._commit(0)  # an empty source still makes an (empty) table

    def _commit(self, count: int) -> None:
        """Commit the first `count` ready shards in one transaction."""
        group, self.ready = self.ready[:count], self.ready[count:]
        shards = [shard for shard, _ in group]
        fragments = [*self.carried, *(f for _, frags in group for f in frags)]
        started = time.perf_counter()
        ds = commit(self.uri, fragments, mode=self.mode, schema=self.schema,
                    read_version=self.read_version, job=self.job, shards=shards,
                    storage_options=self.storage_options,
                    removed_fragment_ids=self.deletions[0],
                    updated_fragments=self.deletions[1], expect_latest=self.expect_latest,
                    lease=self.lease)
        self.seconds["commit"] += time.perf_counter() - started
        self._committed_shards += len(shards)
        self.versions.append(ds.version)
        if self.first_commit_at is None:
            self.first_commit_at = time.time()
        progress(f"checkpoint committed: version {ds.version}, "
                 f"{self._committed_shards}/{self.total_shards} shards, {self.rows} chunks "
                 "so far")
        self.mode, self.read_version, self.expect_latest = "append", ds.version, ds.version
        self.deletions, self.carried = ([], []), []
        self._last_commit = time.perf_counter()

    @property
    def model_loads(self) -> int:
        return len(self.loads)

    def table(self) -> lance.LanceDataset:
        return lance.dataset(self.uri, storage_options=self.storage_options or None)
