"""The driver's side of one streaming execution: turn written fragments into commits.

Write tasks emit one row per (write call, shard) saying how many of the shard's rows
and documents the call wrote (`jobs._lance_io.write_shard_fragments`). A shard is
complete once all its documents are written; closed sets of write calls (see
`Checkpointer`) are committed every `commit_interval_s` (and, when the spec asks, as
soon as `shards_per_commit` shards are ready) while the actors keep embedding.
Everything kept here is bounded by the shards and write calls in flight, never by the
rows of the corpus.
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
from operators.write import commit, create_empty
from schemas.errors import TableError


@dataclass
class _Shard:
    """What the write tasks reported of one shard so far."""

    docs: int
    rows: int = 0
    firsts: int = 0
    """Documents whose first chunk is written."""
    first_chunks: int = 0
    """Chunks of those documents, in all."""
    writes: set[str] = field(default_factory=set)

    @property
    def complete(self) -> bool:
        return self.firsts == self.docs and self.rows == self.first_chunks


@dataclass
class _Write:
    """One set of fragments a write call wrote, and the shards with rows in them."""

    fragments: list[FragmentMetadata] = field(default_factory=list)
    shards: set[str] = field(default_factory=set)


def _linked(names: list[str], writes: dict[str, _Write]) -> list[list[str]]:
    """The write sets grouped into closed sets: two sets holding rows of one shard are
    in the same group (so a commit can take a group, and `shards_per_commit` can be
    met without committing everything that is ready at once).

    >>> w = {"a": _Write(shards={"s1"}), "b": _Write(shards={"s1", "s2"}),
    ...      "c": _Write(shards={"s3"})}
    >>> _linked(["a", "b", "c"], w)
    [['a', 'b'], ['c']]
    """
    group_of: dict[str, int] = {}
    groups: list[list[str]] = []
    for name in names:
        joined = sorted({group_of[s] for s in writes[name].shards if s in group_of})
        if not joined:
            target = len(groups)
            groups.append([])
        else:
            target = joined[0]
            for other in joined[1:]:  # a set bridging two groups merges them
                groups[target].extend(groups[other])
                for member in groups[other]:
                    for s in writes[member].shards:
                        group_of[s] = target
                groups[other] = []
        groups[target].append(name)
        for s in writes[name].shards:
            group_of[s] = target
    return [g for g in groups if g]


@dataclass
class Checkpointer:
    """Commits complete shards as the write tasks report them.

    A fragment may hold rows of several shards, and a shard's rows may be spread over
    several write calls. A commit takes a closed set of write calls: every shard with
    rows in them is complete, and every write call holding rows of those shards is in
    the set. So each shard is committed whole, in one commit that names it.

    `mode` is 'create' (the first commit replaces the table: an overwrite or a cut-over;
    a new table is `create`d empty first and appended to), 'append', or 'update' (a
    reindex: one commit at the end that also carries `deletions`).
    """

    uri: str
    schema: pa.Schema
    mode: str
    read_version: int | None
    job: str
    storage_options: dict[str, str]
    expect_latest: int
    shards_per_commit: int | None
    """Commit as soon as this many shards are ready; None: by time alone."""
    commit_interval_s: float
    ready: list[tuple[list[str], list[FragmentMetadata]]] = field(default_factory=list)
    """Closed sets not yet committed: their shards and fragments, in completion order."""
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
    create: bool = False
    """A new table: made empty (`operators.write.create_empty`) just before the first
    commit, which then appends to it like every later one, so a takeover's fence
    reaches the first checkpoint too (a Lance `Overwrite` that made the table would
    land over it). A job that fails before its first commit leaves no table."""
    created: int | None = None
    """The version of the empty table this run made: one its cleanup removes."""
    commit_seconds: list[float] = field(default_factory=list)
    """Each commit's seconds, in order (a commit must not slow down as the table grows)."""
    first_commit_at: float | None = None
    loads: set[str] = field(default_factory=set)
    """Distinct model loads that embedded rows (bounded by actors and their restarts)."""
    _shards: dict[str, _Shard] = field(default_factory=dict)
    _writes: dict[str, _Write] = field(default_factory=dict)
    _last_commit: float = float("-inf")
    """When the last commit landed: none yet, so the first complete shard commits at once
    (the table exists, and its progress shows, from the first shard on)."""
    _committed_shards: int = 0
    on_shard_written: Callable[[str], None] | None = None
    """Called with each shard id once all its rows are written (progress)."""

    def consume(self, written: pa.Table) -> None:
        """Take a block of write-task rows (`jobs._lance_io.WRITTEN_SCHEMA`)."""
        touched = False
        for row in written.to_pylist():
            write = self._writes.setdefault(row["write"], _Write())
            if row["fragments"] is not None:  # on the set's first row
                write.fragments.extend(FragmentMetadata.from_json(json.dumps(f))
                                       for f in json.loads(row["fragments"]))
            if row["tokens"] is not None:  # the write call's totals, on its first row
                self.tokens += row["tokens"]
                self.truncated_tokens += row["truncated_tokens"]
                self.seconds.update(json.loads(row["seconds"]))
                self.loads.update(json.loads(row["loads"]))
                at = row["first_embedded_at"]
                if at is not None and (self.first_embedded_at is None
                                       or at < self.first_embedded_at):
                    self.first_embedded_at = at
            shard = self._shards.setdefault(row["shard"], _Shard(row["shard_docs"]))
            write.shards.add(row["shard"])
            shard.writes.add(row["write"])
            shard.rows += row["rows"]
            shard.firsts += row["firsts"]
            shard.first_chunks += row["first_chunks"]
            self.rows += row["rows"]
            if shard.firsts > shard.docs or (shard.firsts == shard.docs
                                             and shard.rows > shard.first_chunks):
                raise TableError(f"shard {row['shard']}: {shard.rows} rows written for "
                                 f"{shard.first_chunks} chunks of {shard.docs} documents; "
                                 "refusing to commit duplicates")
            if shard.complete:
                touched = True
                if self.on_shard_written is not None:
                    self.on_shard_written(row["shard"])
        if touched:
            self._close()
        if self.mode == "update":
            return  # a reindex is one commit: readers see the old table or the new one
        count = self.shards_per_commit
        while count is not None and self._ready_shards() >= count:
            self._commit(count)
        due = time.perf_counter() - self._last_commit >= self.commit_interval_s
        if self.ready and due:
            self._commit(None)

    def _close(self) -> None:
        """Move every closed set of write calls to `ready`: write calls whose shards are
        all complete, less those sharing a shard with a write call that is not."""
        shards, writes = self._shards, self._writes
        open_shards = {s for s, state in shards.items() if not state.complete}
        blocked = {w for s in open_shards for w in shards[s].writes}
        frontier = blocked
        while frontier:  # a shard of a blocked write call blocks its other write calls
            stuck = {s for w in frontier for s in writes[w].shards} - open_shards
            open_shards |= stuck
            frontier = {w for s in stuck for w in shards[s].writes} - blocked
            blocked |= frontier
        closed = [w for w in writes if w not in blocked]
        for members in _linked(closed, writes):  # each closed set on its own
            done = sorted({s for w in members for s in writes[w].shards})
            self.ready.append((done, [f for w in members for f in writes.pop(w).fragments]))
            for s in done:
                del shards[s]

    def _ready_shards(self) -> int:
        return sum(len(group) for group, _ in self.ready)

    def add_empty(self, shards: list[str]) -> None:
        """Shards with nothing to write (every record rejected): committed like others."""
        if shards:
            self.ready.append((list(shards), []))

    def finish(self, *, always: bool = False) -> None:
        """Commit what is left; `always` makes an empty table when nothing was committed."""
        if self._shards:
            left = ", ".join(sorted(self._shards)[:5])
            raise TableError(f"{len(self._shards)} shard(s) never finished writing "
                              f"({left}); nothing of them was committed")
        if self.mode == "update":  # one commit, deletions included, even with no shards
            self._commit(None)
            return
        while self.ready:
            self._commit(self.shards_per_commit)
        if always and not self.versions:
            self._commit(0)  # an empty source still makes an (empty) table

    def _commit(self, count: int | None) -> None:
        """Commit ready sets, the first ones holding `count` shards or more (None: all)
        in one transaction."""
        taken = len(self.ready)
        if count is not None:
            held = 0
            for i, (group, _) in enumerate(self.ready):
                held += len(group)
                if held >= count:
                    taken = i + 1
                    break
        sets, self.ready = self.ready[:taken], self.ready[taken:]
        shards = [shard for group, _ in sets for shard in group]
        fragments = [*self.carried, *(f for _, frags in sets for f in frags)]
        started = time.perf_counter()
        if self.create:
            made = create_empty(self.uri, self.schema, job=self.job,
                                storage_options=self.storage_options, lease=self.lease)
            self.created = self.read_version = self.expect_latest = made.version
            self.create = False
        ds = commit(self.uri, fragments, mode=self.mode, schema=self.schema,
                    read_version=self.read_version, job=self.job, shards=shards,
                    storage_options=self.storage_options,
                    removed_fragment_ids=self.deletions[0],
                    updated_fragments=self.deletions[1], expect_latest=self.expect_latest,
                    lease=self.lease)
        self.seconds["commit"] += time.perf_counter() - started
        self.commit_seconds.append(round(time.perf_counter() - started, 4))
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
