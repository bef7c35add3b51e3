"""Ray Data adapters: read planned shards as a Datasource; write each shard's rows as
Lance fragments in tasks whose output rows tell the driver what to commit."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterable

import pyarrow as pa
import pyarrow.compute as pc
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from operators.sources.plan import read_groups, read_shards
from operators.timing import EMBEDDED_AT, LOADED_BY, stage_totals, with_stage_seconds
from operators.write import write_fragments
from schemas.source import Shard
from schemas.spec import SourceSpec

SHARD_COLUMN = "_shard"
SHARD_CHUNKS_COLUMN = "_shard_chunks"
"""Work columns: the chunk's shard, and how many chunks that shard has in all, so the
driver knows when every row of a shard is in a written fragment."""

WRITTEN_SCHEMA = pa.schema([
    ("shard", pa.string()), ("shard_chunks", pa.int64()), ("rows", pa.int64()),
    ("fragments", pa.string()), ("tokens", pa.int64()), ("truncated_tokens", pa.int64()),
    ("seconds", pa.string()), ("first_embedded_at", pa.float64()), ("loads", pa.string()),
])
"""One row per (write task, shard): the fragments written and what they cost."""


class ShardDatasource(Datasource):
    """Read tasks over planned shards: read, validate, chunk and tokenize each shard.

    Chunking runs inside the read task (a CPU task) so token ids, not strings, travel to
    the embed actors, and the actors spend their cores on inference only. Each task
    yields one block per shard; consecutive shards of a compressed file share a task
    (`read_groups`), so the file is decompressed once.
    """

    def __init__(self, shards: list[Shard], *, source: SourceSpec, metadata: pa.Schema,
                 chosen: dict[str, str], chunker: Callable[[pa.Table], pa.Table],
                 tasks: int | None = None) -> None:
        """`tasks` is how many read tasks to aim for (None: one per shard)."""
        super().__init__()
        self.groups = read_groups(shards, tasks=len(shards) if tasks is None else tasks)
        self._source = source
        self._metadata = metadata
        self._chosen = chosen
        self._chunker = chunker

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        source, metadata, chunker = self._source, self._metadata, self._chunker
        chosen = self._chosen

        def block(shard: Shard, docs: pa.Table, read_s: float) -> pa.Table:
            started = time.perf_counter()
            chunks = chunker(docs)
            tokenize_s = time.perf_counter() - started
            return label_chunks(chunks, shard.shard_id, read_s=read_s, tokenize_s=tokenize_s)

        def make(group: tuple[Shard, ...]) -> ReadTask:
            def read() -> Iterable[pa.Table]:
                started = time.perf_counter()
                for shard, docs in read_shards(group, source=source, metadata=metadata,
                                               chosen=chosen):
                    yield block(shard, docs, time.perf_counter() - started)
                    started = time.perf_counter()

            rows = sum(s.records - len(s.skip) for s in group)
            meta = BlockMetadata(num_rows=rows, size_bytes=None, exec_stats=None,
                                 input_files=(group[0].path,))
            return ReadTask(read, meta, per_task_row_limit=per_task_row_limit)

        return [make(g) for g in self.groups]

    def get_name(self) -> str:
        return "QuiverShards"


def label_chunks(chunks: pa.Table, shard_id: str, *, read_s: float,
                 tokenize_s: float) -> pa.Table:
    """A shard's chunk rows as the embed stream carries them: with the shard they belong
    to and how many rows that shard has in all (the driver commits a shard once all are
    written), and the row's share of the read and tokenize seconds."""
    label = pa.array([shard_id] * chunks.num_rows, pa.string())
    chunks = chunks.append_column(SHARD_COLUMN, label).append_column(
        SHARD_CHUNKS_COLUMN, pa.array([chunks.num_rows] * chunks.num_rows, pa.int64()))
    return with_stage_seconds(chunks, read=read_s, tokenize=tokenize_s)


MIN_ROWS_PER_WRITE = 10_000


def write_shard_fragments(batch: pa.Table, *, uri: str, schema: pa.Schema,
                          max_rows_per_file: int, storage_options: dict[str, str],
                          replace: bool = False) -> pa.Table:
    """Write a batch of embedded rows as uncommitted fragments, one set per shard
    (`replace`: for a table the job's commit replaces, whose schema may differ).

    A fragment never holds rows of two shards, so the driver can commit a shard's
    fragments as soon as all of that shard's rows are written, and a resumed job that
    redoes an uncommitted shard can never commit any of its rows twice.
    """
    out: list[dict] = []
    shards = batch.column(SHARD_COLUMN)
    for shard in pc.unique(shards).to_pylist():
        rows = batch.filter(pc.equal(shards, shard))
        started = time.perf_counter()
        fragments = write_fragments(rows.select(schema.names).cast(schema), uri,
                                    schema=schema, max_rows_per_file=max_rows_per_file,
                                    storage_options=storage_options, replace=replace)
        seconds: Counter[str] = Counter(stage_totals(rows))
        seconds["write"] = time.perf_counter() - started
        out.append({
            "shard": shard, "shard_chunks": int(rows.column(SHARD_CHUNKS_COLUMN)[0].as_py()),
            "rows": rows.num_rows,
            "fragments": json.dumps([f.to_json() for f in fragments]),
            "tokens": int(pc.sum(rows.column("_tokens")).as_py() or 0),
            "truncated_tokens": int(pc.sum(rows.column("_truncated_tokens")).as_py() or 0),
            "seconds": json.dumps(dict(seconds)),
            "first_embedded_at": pc.min(rows.column(EMBEDDED_AT)).as_py()
            if EMBEDDED_AT in rows.column_names else None,
            "loads": json.dumps(sorted(pc.unique(rows.column(LOADED_BY).cast(pa.string()))
                                       .to_pylist()) if LOADED_BY in rows.column_names
                                else []),
        })
    return pa.Table.from_pylist(out, schema=WRITTEN_SCHEMA)
