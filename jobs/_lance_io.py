"""Ray Data adapters: read planned shards as a Datasource, chunk them in their own tasks,
and write embedded rows as Lance fragments in tasks whose output rows tell the driver
what to commit."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from operators.sources.read import read_blocks, read_groups
from operators.sources.skips import Skips
from operators.timing import (
    EMBEDDED_AT,
    LOADED_BY,
    STAGE_COLUMNS,
    stage_totals,
    with_stage_seconds,
)
from operators.write import write_fragments
from schemas.source import Shard
from schemas.spec import SourceSpec

SHARD_COLUMN = "_shard"
SHARD_DOCS_COLUMN = "_shard_docs"
DOC_CHUNKS_COLUMN = "_doc_chunks"
FIRST_COLUMN = "_first"
"""Work columns that let the driver tell when a shard is complete, however Ray Data
cuts, merges or reorders blocks: each row names its shard and how many documents that
shard has in all; a document's first chunk is marked and says how many chunks the
document has. A shard is complete once all its documents' first chunks are written and
its written rows add up to their chunks (`jobs._checkpoint`). A reindex, whose rows are
a shard's changed chunks, counts the whole shard as one such document."""
LABEL_COLUMNS = (SHARD_COLUMN, SHARD_DOCS_COLUMN, DOC_CHUNKS_COLUMN, FIRST_COLUMN)

WRITTEN_SCHEMA = pa.schema([
    ("write", pa.string()), ("fragments", pa.string()),
    ("shard", pa.string()), ("shard_docs", pa.int64()), ("rows", pa.int64()),
    ("firsts", pa.int64()), ("first_chunks", pa.int64()),
    ("tokens", pa.int64()), ("truncated_tokens", pa.int64()),
    ("seconds", pa.string()), ("first_embedded_at", pa.float64()), ("loads", pa.string()),
])
"""One row per (write call, shard): the shard's share of the rows that call wrote.
`fragments` (the call's fragments, which may hold rows of many shards) and the call's
totals ride on its first row only."""


class ShardDatasource(Datasource):
    """Read tasks over planned shards: read and validate each shard's documents.

    Each task yields one table per shard, its rows labelled with the shard
    (`SHARD_COLUMN`, `SHARD_DOCS_COLUMN`); chunking and tokenizing run after it in
    their own tasks (`ChunkBlocks`), so a task that streams a whole compressed file
    leaves them to every core. Consecutive shards of a file share a task
    (`read_groups`): a compressed file is decompressed once per job, and the number of
    tasks follows the data, not the number of shards.
    """

    def __init__(self, shards: list[Shard], *, source: SourceSpec, metadata: pa.Schema,
                 chosen: dict[str, str], skips: Skips | None,
                 tasks: int | None = None) -> None:
        """`tasks` is how many read tasks to aim for (None: one per shard); `skips`, where
        the plan's left-out records are (each task carries only its part)."""
        super().__init__()
        self.groups = read_groups(shards, tasks=len(shards) if tasks is None else tasks)
        self._skips = skips
        self._source = source
        self._metadata = metadata
        self._chosen = chosen

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        source, metadata, chosen = self._source, self._metadata, self._chosen

        def make(group: tuple[Shard, ...]) -> ReadTask:
            skips = None if self._skips is None else self._skips.only(group)

            def read() -> Iterable[pa.Table]:
                # Small shards are read into one table and labelled together, at least
                # BLOCK_DOCS documents at a time: per-shard table work was what made
                # 20,000 shards of 10 records cost 1.85x the read task-seconds of 200.
                started = time.perf_counter()
                for block in read_blocks(group, source=source, metadata=metadata,
                                         chosen=chosen, rows=BLOCK_DOCS, skips=skips):
                    if block.table.num_rows:  # all-rejected shards are committed empty
                        yield label_documents(
                            [(shard.shard_id, n) for shard, n in block.shards], block.table,
                            read_s=time.perf_counter() - started)
                    started = time.perf_counter()

            rows = sum(s.documents or 0 for s in group)
            meta = BlockMetadata(num_rows=rows, size_bytes=None, exec_stats=None,
                                 input_files=(group[0].path,))
            return ReadTask(read, meta, per_task_row_limit=per_task_row_limit)

        return [make(g) for g in self.groups]

    def get_name(self) -> str:
        return "QuiverShards"


BLOCK_DOCS = 1_000
"""Documents a read task gathers (whole shards) before it hands a table over."""


def label_documents(shards: list[tuple[str, int]], docs: pa.Table, *,
                    read_s: float) -> pa.Table:
    """Whole shards' documents (`docs`, in shard order; `shards` gives each shard's id and
    rows), each row labelled with its shard and the shard's document count, and the
    rows' share of the read seconds.

    >>> t = label_documents([("a", 2), ("b", 1)], pa.table({"x": [1, 2, 3]}), read_s=3.0)
    >>> t.column("_shard").to_pylist(), t.column("_shard_docs").to_pylist()
    (['a', 'a', 'b'], [2, 2, 1])
    """
    counts = np.array([n for _, n in shards], np.int64)
    ids = pa.array([shard_id for shard_id, _ in shards], pa.string())
    at = np.repeat(np.arange(len(shards)), counts)
    docs = docs.append_column(SHARD_COLUMN, ids.take(pa.array(at)))
    docs = docs.append_column(SHARD_DOCS_COLUMN, pa.array(np.repeat(counts, counts)))
    return with_stage_seconds(docs, read=read_s)


class ChunkBlocks:
    """Chunk and tokenize a block of labelled documents (of any shards, any slice of
    them), keeping each chunk's label and marking each document's first chunk."""

    def __init__(self, chunker: Callable[[pa.Table], pa.Table]) -> None:
        self._chunker = chunker

    def __call__(self, docs: pa.Table) -> pa.Table:
        read_s = float(pc.sum(docs.column(STAGE_COLUMNS["read"])).as_py() or 0.0)
        started = time.perf_counter()
        chunks = self._chunker(docs.drop_columns([*LABEL_COLUMNS[:2],
                                                  STAGE_COLUMNS["read"]]))
        first = chunks.column("chunk").to_numpy() == 0  # every document has a chunk 0
        row = np.cumsum(first) - 1  # the document (row of `docs`) each chunk is from
        starts = np.flatnonzero(first)
        per_doc = np.diff(np.append(starts, len(first)))
        labels = {SHARD_COLUMN: docs.column(SHARD_COLUMN).take(row),
                  SHARD_DOCS_COLUMN: docs.column(SHARD_DOCS_COLUMN).take(row),
                  DOC_CHUNKS_COLUMN: pa.array(per_doc[row].astype(np.int64)),
                  FIRST_COLUMN: pa.array(first)}
        for name, column in labels.items():
            chunks = chunks.append_column(name, column)
        return with_stage_seconds(chunks, read=read_s,
                                  tokenize=time.perf_counter() - started)


def label_chunks(chunks: pa.Table, shard_id: str, *, read_s: float,
                 tokenize_s: float) -> pa.Table:
    """A reindex's changed chunks of one shard, labelled as one document (the shard
    is complete once all of them are written), with their share of the read and
    tokenize seconds."""
    n = chunks.num_rows
    labels = {SHARD_COLUMN: pa.array([shard_id] * n, pa.string()),
              SHARD_DOCS_COLUMN: pa.array(np.ones(n, np.int64)),
              DOC_CHUNKS_COLUMN: pa.array(np.full(n, n, np.int64)),
              FIRST_COLUMN: pa.array(np.arange(n) == 0)}
    for name, column in labels.items():
        chunks = chunks.append_column(name, column)
    return with_stage_seconds(chunks, read=read_s, tokenize=tokenize_s)


MIN_ROWS_PER_WRITE = 10_000


def write_shard_fragments(batch: pa.Table, *, uri: str, schema: pa.Schema,
                          max_rows_per_file: int, storage_options: dict[str, str],
                          replace: bool = False, shards_per_set: int | None = None
                          ) -> pa.Table:
    """Write a batch of embedded rows, of any number of shards, as uncommitted fragments
    (`replace`: for a table the job's commit replaces, whose schema may differ), and say
    how many rows of each shard they hold.

    The shards whose every row is in the batch share one set of fragments. A shard with
    only some of its rows here (cut by the batch's edges) gets a set of its own: the
    driver commits a set only together with every other set holding rows of the same
    shards, once all of them are complete (`jobs._checkpoint`), and a shared set with a
    cut shard in it would tie each batch to the next one up to the end of the job. So a
    shard is always committed whole, in one commit, and a resumed job that redoes an
    uncommitted shard can never commit any of its rows twice. `shards_per_set` caps the
    shards of one set (`write.shards_per_commit`: a commit cannot hold fewer shards
    than a set it takes).
    """
    started = time.perf_counter()
    seconds: Counter[str] = Counter(stage_totals(batch))
    shards = batch.column(SHARD_COLUMN)
    first = batch.column(FIRST_COLUMN)
    counts = pa.table({"shard": shards, "rows": pa.array(np.ones(batch.num_rows, np.int64)),
                       "firsts": pc.cast(first, pa.int64()),
                       "first_chunks": pc.if_else(first, batch.column(DOC_CHUNKS_COLUMN), 0),
                       "shard_docs": batch.column(SHARD_DOCS_COLUMN)}).group_by(
        "shard", use_threads=False).aggregate([("rows", "sum"), ("firsts", "sum"),
                                               ("first_chunks", "sum"), ("shard_docs", "max")])
    whole = pc.and_(pc.equal(counts.column("firsts_sum"), counts.column("shard_docs_max")),
                    pc.equal(counts.column("rows_sum"), counts.column("first_chunks_sum")))
    counts = pa.concat_tables([counts.filter(whole), counts.filter(pc.invert(whole))])
    together = int(pc.sum(whole).as_py() or 0)  # the first `together` rows share a set
    names = counts.column("shard").to_pylist()
    per_set = shards_per_set or max(together, 1)
    members = [names[i:min(i + per_set, together)] for i in range(0, together, per_set)] \
        + [[s] for s in names[together:]]
    write_ids: list[str] = []
    fragments: list[str | None] = []
    for shard_set in members:
        part = batch if len(members) == 1 else batch.filter(
            pc.is_in(shards, value_set=pa.array(shard_set, pa.string())))
        written = write_fragments(part, uri, schema=schema,
                                  max_rows_per_file=max_rows_per_file,
                                  storage_options=storage_options, replace=replace)
        write_ids += [uuid.uuid4().hex] * len(shard_set)
        fragments += [json.dumps([f.to_json() for f in written])] + [None] * (len(shard_set) - 1)
    seconds["write"] = time.perf_counter() - started
    n = counts.num_rows
    once = [None] * (n - 1)
    return pa.table({
        "write": pa.array(write_ids, pa.string()),
        "fragments": pa.array(fragments, pa.string()),
        "shard": counts.column("shard"),
        "shard_docs": counts.column("shard_docs_max"),
        "rows": counts.column("rows_sum"),
        "firsts": counts.column("firsts_sum"),
        "first_chunks": counts.column("first_chunks_sum"),
        "tokens": pa.array([int(pc.sum(batch.column("_tokens")).as_py() or 0), *once],
                           pa.int64()),
        "truncated_tokens": pa.array(
            [int(pc.sum(batch.column("_truncated_tokens")).as_py() or 0), *once], pa.int64()),
        "seconds": pa.array([json.dumps(dict(seconds)), *once], pa.string()),
        "first_embedded_at": pa.array([pc.min(batch.column(EMBEDDED_AT)).as_py()
                                       if EMBEDDED_AT in batch.column_names else None,
                                       *once], pa.float64()),
        "loads": pa.array([json.dumps(sorted(pc.unique(batch.column(LOADED_BY).cast(
            pa.string())).to_pylist()) if LOADED_BY in batch.column_names else []), *once],
            pa.string()),
    }, schema=WRITTEN_SCHEMA)
