"""Reading planned shards: each shard's documents as an Arrow table (`doc_id`, `text`,
`doc_hash`, typed metadata), with the records the plan rejected dropped and the number
found checked against the plan's; and grouping shards into read tasks (`read_groups`).

It exists apart from planning because the job's read tasks need only a shard and the
plan's chosen types, not the passes that made them. A read holds one shard's documents in
memory at a time: a run of consecutive shards is streamed in one pass and each shard is
yielded as soon as its last record is read. Pass 3 (`rejects`) reads its shards through
`shard_records` and groups them by `_compressed` too.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from operators.sources import FORMATS
from operators.sources.base import (
    RawRecord,
    coerce_json,
    compression_of,
    document_hash,
    mismatch,
    record_kinds,
)
from operators.sources.partitions import records
from operators.sources.scan import validate
from operators.sources.skips import Skips, attached
from schemas.errors import SourceChangedError
from schemas.records import CONTENT_HASH_BYTES, DOC_HASH_COLUMN
from schemas.source import Shard, Unit
from schemas.spec import SourceSpec


def shard_records(shard: Shard, source: SourceSpec) -> Iterator[RawRecord]:
    """The shard's records, read from its start (offset) to its last record."""
    end = shard.start + shard.records
    for rec in records(
            FORMATS[shard.kind], shard.unit, source, start=shard.start, offset=shard.offset,
            position=shard.first_position, part=shard.part):
        if rec.ordinal >= end:
            return
        yield rec


class _Documents:
    """The columns of the valid documents of one shard after another, filled record by
    record; `table` builds one Arrow table of every shard since the last one, so many
    small shards cost one table build, not one each."""

    def __init__(self, metadata: pa.Schema, chosen: dict[str, str]) -> None:
        self._metadata, self._chosen = metadata, chosen
        self._as_json = {n for n, k in chosen.items() if k == "json"}
        self._as_float = {n for n, k in chosen.items() if k == "float"}
        self._schema = pa.schema([pa.field("doc_id", pa.string()),
                                  pa.field("text", pa.large_string()),
                                  pa.field(DOC_HASH_COLUMN, pa.binary(CONTENT_HASH_BYTES)),
                                  *metadata])
        self._columns: dict[str, list[Any]] = {n: [] for n in self._schema.names}
        self.shards: list[tuple[Shard, int]] = []
        """The finished shards since the last `table`, each with its rows there."""
        self.rows = 0
        self.shard: Shard | None = None
        self._only: Collection[str] | None = None
        self._found = self._kept = 0

    def start(self, shard: Shard, only: Collection[str] | None = None) -> None:
        """Begin `shard`; with `only`, keep just the documents it names."""
        self.shard, self._only, self._found, self._kept = shard, only, 0, 0

    def add(self, rec: RawRecord, source: SourceSpec) -> None:
        """Keep the record if the plan did: valid, well typed and not a duplicate."""
        shard = self.shard
        assert shard is not None
        doc_id, text = validate(rec, source, shard.kind)
        if doc_id is None or rec.ordinal in shard.skip \
                or mismatch(record_kinds(rec, source, shard.kind), self._chosen) is not None:
            return
        self._found += 1
        if self._only is not None and doc_id not in self._only:
            return  # counted (the plan's count still checks the file), not kept
        assert rec.value is not None
        self._kept += 1
        self._columns["doc_id"].append(doc_id)
        self._columns["text"].append(text)
        self._columns[DOC_HASH_COLUMN].append(document_hash(doc_id, text, rec.value, source,
                                                            shard.kind))
        for name in self._metadata.names:
            v = rec.value.get(name)
            if name in self._as_json:
                v = coerce_json(v)
            elif name in self._as_float and v is not None:
                v = float(v)
            self._columns[name].append(v)

    def finish(self) -> None:
        """End the current shard, after checking its documents against the plan's."""
        shard, found = self.shard, self._found
        assert shard is not None
        if shard.documents is not None and found != shard.documents:
            raise SourceChangedError(f"{shard.path}: {found} valid records in shard "
                                     f"{shard.shard_id}, but {shard.documents} when the job "
                                     "was planned; the source changed. Run the job again.")
        self.shards.append((shard, self._kept))
        self.rows += self._kept
        self.shard = None

    def table(self) -> pa.Table:
        """The finished shards' documents as one table; starts afresh."""
        table = pa.table(self._columns, schema=self._schema)
        self._columns = {n: [] for n in self._schema.names}
        self.shards, self.rows = [], 0
        return table


def follows(before: Shard, shard: Shard) -> bool:
    """Whether `shard` starts where `before` ends, in the same unit."""
    return shard.unit == before.unit and shard.part == before.part \
        and shard.start == before.start + before.records


GROUP_RECORDS = 20_000
"""Records of a seekable file (plain JSON Lines or CSV, Parquet row group, Lance range)
read by one task, at most: consecutive shards share a task up to this many, so the
number of read tasks follows the data, not the shard count (20,000 shards of 10 records
are 10 tasks, not 20,000)."""


def read_groups(shards: Sequence[Shard], *, tasks: int) -> list[tuple[Shard, ...]]:
    """Shards grouped into read tasks: at least `tasks` of them where the shards allow.

    Consecutive shards of one unit (`follows`) are read in one pass (`read_shards`).
    A compressed file cannot seek: a task that starts at its k-th shard would decompress
    and drop everything before it, so reading a file cut into n groups would cost about
    n/2 decompressions of it (the cost grew with the square of the file's size). So all
    the consecutive shards of a compressed file are one task, which streams the file
    once and yields each shard as soon as it is read; it is never split. Chunking and
    tokenizing run in their own tasks after it (`jobs._lance_io`), spread over every
    core. Runs of a seekable file are cut into groups of at most `GROUP_RECORDS`
    records, and the longest seekable group is split in halves while there are fewer
    than `tasks` tasks, so that a few big files still keep every read slot busy.
    Groups keep source order.

    >>> from schemas.source import SourceFile, Unit
    >>> gz = Unit(0, "jsonl", SourceFile("a.jsonl.gz", 1, None))
    >>> plain = Unit(1, "jsonl", SourceFile("b.jsonl", 1, None))
    >>> shards = [Shard(f"{u.index}-{i}", "jsonl", u, 10 * i, 10, 1, offset=0)
    ...           for u in (gz, plain) for i in range(7)]
    >>> [len(g) for g in read_groups(shards, tasks=1)]
    [7, 7]
    >>> [len(g) for g in read_groups(shards, tasks=5)]
    [7, 1, 2, 2, 2]
    >>> tiny = [Shard(f"t-{i}", "jsonl", plain, 10 * i, 10, 1, offset=0) for i in range(3000)]
    >>> [len(g) for g in read_groups(tiny, tasks=1)]  # 20,000 records a task
    [2000, 1000]
    """
    import heapq

    runs: list[list[Shard]] = []
    records = 0
    for shard in shards:
        if runs and follows(runs[-1][-1], shard) and (
                compressed(shard) or records + shard.records <= GROUP_RECORDS):
            runs[-1].append(shard)
            records += shard.records
        else:
            runs.append([shard])
            records = shard.records
    heap = []  # (-splittable length, index of the group's first shard, group)
    first = 0
    for run in runs:
        heap.append((-_splittable(run), first, run))
        first += len(run)
    heapq.heapify(heap)  # the longest splittable group on top
    while heap and len(heap) < tasks and -heap[0][0] > 1:
        _, first, group = heapq.heappop(heap)
        half = len(group) // 2
        for at, part in ((first, group[:half]), (first + half, group[half:])):
            heapq.heappush(heap, (-_splittable(part), at, part))
    return [tuple(g) for _, _, g in sorted(heap, key=lambda item: item[1])]


def bridged(shards: Sequence[Shard], *, wanted: Collection[str]) -> list[Shard]:
    """The `wanted` shards, plus, in a compressed file, every shard between its first and
    last wanted one, so that `read_groups` makes the file one task that streams it once.
    A reindex whose changes touch every tenth shard of a `.gz` file would otherwise start
    the file from the top once per changed shard (measured at 20,000 shards: 116 read
    task-seconds for a 1% change). The bridging shards are read through, not used.

    >>> from schemas.source import SourceFile, Unit
    >>> gz = Unit(0, "jsonl", SourceFile("a.jsonl.gz", 1, None))
    >>> plain = Unit(1, "jsonl", SourceFile("b.jsonl", 1, None))
    >>> shards = [Shard(f"{u.index}-{i}", "jsonl", u, 10 * i, 10, 1, offset=0)
    ...           for u in (gz, plain) for i in range(6)]
    >>> [s.shard_id for s in bridged(shards, wanted={"0-1", "0-4", "1-1", "1-4"})]
    ['0-1', '0-2', '0-3', '0-4', '1-1', '1-4']
    """
    wanted = set(wanted)
    keep = [s.shard_id in wanted for s in shards]
    last_wanted: dict[Unit, int] = {}
    for i, shard in enumerate(shards):
        if keep[i] and compressed(shard):
            last_wanted[shard.unit] = i
    started: set[Unit] = set()
    for i, shard in enumerate(shards):
        if compressed(shard) and shard.unit in last_wanted:
            if keep[i]:
                started.add(shard.unit)
            elif shard.unit in started and i < last_wanted[shard.unit]:
                keep[i] = True
    return [s for s, k in zip(shards, keep, strict=True) if k]


def _splittable(group: list[Shard]) -> int:
    """A group's length where splitting it is free (a seekable file), else 0."""
    return 0 if compressed(group[0]) else len(group)


def compressed(shard: Shard) -> bool:
    return shard.kind in ("jsonl", "csv") and compression_of(shard.path) is not None


def read_shards(shards: Sequence[Shard], *, source: SourceSpec, metadata: pa.Schema,
                chosen: dict[str, str], only: Mapping[str, Collection[str]] | None = None,
                skips: Skips | None = None) -> Iterator[tuple[Shard, pa.Table]]:
    """Each shard with its documents (`doc_id`, `text`, `doc_hash`, typed metadata), in
    one pass; with `only`, just the documents it names for each shard id (a reindex's
    changed ones), the others validated and counted but not built.

    The shards follow each other in one unit (`follows`), so the file is opened once at
    the first shard and read straight through: a compressed file is decompressed once,
    not once per shard up to that shard's offset. Each shard is yielded as soon as its
    last record is read. Rejected records (invalid, ill-typed, and the duplicates and
    excluded ids the plan's `skips` hold) are dropped; pass 3 has written them to the
    rejects.
    """
    blocks = read_blocks(shards, source=source, metadata=metadata, chosen=chosen, only=only,
                         rows=0, skips=skips)  # one block per shard
    for shard, block in zip(shards, blocks, strict=True):
        yield shard, block.table


@dataclass
class Block:
    """Documents of whole consecutive shards, in one table (`read_blocks`)."""

    shards: list[tuple[Shard, int]]
    """Each shard, with its rows in `table` (in order)."""
    table: pa.Table


def read_blocks(shards: Sequence[Shard], *, source: SourceSpec, metadata: pa.Schema,
                chosen: dict[str, str], only: Mapping[str, Collection[str]] | None = None,
                rows: int, skips: Skips | None = None) -> Iterator[Block]:
    """`read_shards`, with whole shards gathered until they hold at least `rows`
    documents (0: one shard per block): a task reading 20,000 shards of 10 records
    builds 200 tables, not 20,000. The shards' left-out records are fetched from
    `skips` here, in the task."""
    if not shards:
        return
    if any(s.left_out and not s.skip for s in shards):
        if skips is None:
            raise ValueError("the shards leave records out by id, but no skips were given")
        shards = attached(shards, skips)
    for before, shard in zip(shards, shards[1:], strict=False):
        if not follows(before, shard):
            raise ValueError(f"shard {shard.shard_id} does not follow {before.shard_id}")
    first, last = shards[0], shards[-1]
    end = last.start + last.records
    todo = iter(shards)
    docs = _Documents(metadata, chosen)

    def start(shard: Shard) -> None:
        docs.start(shard, None if only is None else only.get(shard.shard_id, ()))

    def done() -> Iterator[Block]:
        docs.finish()
        if docs.rows >= rows or not rows:
            held = docs.shards
            yield Block(held, docs.table())

    start(next(todo))
    for rec in records(
            FORMATS[first.kind], first.unit, source, start=first.start, offset=first.offset,
            position=first.first_position, part=first.part):
        if rec.ordinal >= end:
            break
        while rec.ordinal >= docs.shard.start + docs.shard.records:
            yield from done()
            start(next(todo))
        docs.add(rec, source)
    yield from done()
    for shard in todo:  # records the file no longer has: the count check names it
        start(shard)
        yield from done()
    if docs.shards:
        held = docs.shards
        yield Block(held, docs.table())


def read_shard(shard: Shard, *, source: SourceSpec, metadata: pa.Schema,
               chosen: dict[str, str], skips: Skips | None = None) -> pa.Table:
    """One shard's documents (see `read_shards`)."""
    return next(read_shards([shard], source=source, metadata=metadata, chosen=chosen,
                            skips=skips))[1]


def sample_documents(shards: Sequence[Shard], *, wanted: int, source: SourceSpec,
                     metadata: pa.Schema, chosen: dict[str, str],
                     skips: Skips | None = None) -> pa.Table | None:
    """The documents of enough shards, spread evenly over the source, to hold about
    `wanted` documents (None without any): what `quiver plan`'s calibration and int8
    calibration sample from. Deterministic, so a rerun samples the same documents."""
    from operators.quantize import sample_positions

    shards = [s for s in shards if s.documents is None or s.documents]
    per_shard = max(1, min(s.documents or s.records for s in shards)) if shards else 1
    count = min(len(shards), max(1, -(-wanted // per_shard)))
    tables = [read_shard(shards[i], source=source, metadata=metadata, chosen=chosen,
                         skips=skips)
              for i in sample_positions(len(shards), count)]
    return pa.concat_tables(tables) if tables else None
