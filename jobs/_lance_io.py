"""Ray Data adapters: read source shards as a Datasource, write a Lance table as a Datasink."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping

import pyarrow as pa
import pyarrow.compute as pc
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasink, Datasource, ReadTask

from operators.read import read_shard
from operators.timing import first_embedded_at, stage_totals, with_stage_seconds
from operators.write import commit, write_fragments
from schemas.source import Shard
from schemas.spec import SourceSpec


class ShardDatasource(Datasource):
    """One read task per planned shard: read, validate, chunk and tokenize it.

    Chunking runs inside the read task (a CPU task) so token ids, not strings, travel to
    the embed actors, and the actors spend their cores on inference only.
    """

    def __init__(self, shards: list[Shard], *, source: SourceSpec, metadata: pa.Schema,
                 chunker: Callable[[pa.Table], pa.Table],
                 keep: Mapping[str, frozenset[str]] | None = None,
                 hashes_only: bool = False) -> None:
        """`keep` limits each shard to those chunk ids (a reindex embeds only changes);
        `hashes_only` yields just (id, content_hash, shard), the reindex's first pass."""
        super().__init__()
        self._shards = shards
        self._source = source
        self._metadata = metadata
        self._chunker = chunker
        self._keep = keep
        self._hashes_only = hashes_only

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        source, metadata, chunker = self._source, self._metadata, self._chunker
        keep, hashes_only = self._keep, self._hashes_only

        def make(shard: Shard) -> ReadTask:
            def read() -> Iterable[pa.Table]:
                started = time.perf_counter()
                docs = read_shard(shard, source=source, metadata=metadata)
                read_s = time.perf_counter() - started
                chunks = chunker(docs)
                tokenize_s = time.perf_counter() - started - read_s
                if keep is not None:
                    wanted = pa.array(sorted(keep.get(shard.shard_id, ())), pa.string())
                    chunks = chunks.filter(pc.is_in(chunks.column("id"), value_set=wanted))
                if hashes_only:
                    yield chunks.select(["id", "content_hash"]).append_column(
                        "shard", pa.array([shard.shard_id] * chunks.num_rows, pa.string()))
                    return
                yield with_stage_seconds(chunks, read=read_s, tokenize=tokenize_s)

            meta = BlockMetadata(num_rows=shard.records - len(shard.skip), size_bytes=None,
                                 exec_stats=None, input_files=(shard.path,))
            return ReadTask(read, meta, per_task_row_limit=per_task_row_limit)

        return [make(s) for s in self._shards]

    def get_name(self) -> str:
        return "QuiverShards"


MIN_ROWS_PER_WRITE = 10_000


class LanceCommitSink(Datasink[dict]):
    """Workers write Lance fragments; the driver commits them all in one transaction.

    The commit records the job fingerprint and the shard ids of this checkpoint, so a
    rerun knows exactly which shards are already in the table.
    """

    def __init__(self, uri: str, *, schema: pa.Schema, mode: str, read_version: int | None,
                 job: str, shards: list[str], max_rows_per_file: int,
                 storage_options: dict[str, str],
                 deletions: tuple[list[int], list] = ([], []),
                 expect_latest: int | None = None) -> None:
        """`deletions` (removed fragment ids, fragments with deletion vectors) go into the
        same commit as the new fragments, as a Lance Update (mode 'update')."""
        self.uri = uri
        self.deletions = deletions
        self.expect_latest = expect_latest
        self.schema = schema
        self.mode = mode
        self.read_version = read_version
        self.job = job
        self.shards = shards
        self.max_rows_per_file = max_rows_per_file
        self.storage_options = storage_options
        self.version: int | None = None
        self.rows = 0
        self.tokens = 0
        self.truncated_tokens = 0
        self.seconds: Counter[str] = Counter()
        """Seconds per stage over this checkpoint's rows, plus `write` and `commit`."""
        self.first_embedded_at: float | None = None

    def write(self, blocks: Iterable[pa.Table], ctx) -> dict:
        # Actors get small blocks to stay evenly busy; one write per call keeps files big.
        kept = []
        rows = tokens = truncated = 0
        seconds: Counter[str] = Counter()
        first: list[float] = []
        for block in blocks:
            if block.num_rows == 0:
                continue
            rows += block.num_rows
            tokens += int(pc.sum(block.column("_tokens")).as_py() or 0)
            truncated += int(pc.sum(block.column("_truncated_tokens")).as_py() or 0)
            seconds.update(stage_totals(block))
            if (at := first_embedded_at(block)) is not None:
                first.append(at)
            kept.append(block.select(self.schema.names).cast(self.schema))
        started = time.perf_counter()
        fragments = write_fragments(
            pa.concat_tables(kept), self.uri, schema=self.schema,
            max_rows_per_file=self.max_rows_per_file, storage_options=self.storage_options,
        ) if kept else []
        seconds["write"] = time.perf_counter() - started
        return {"fragments": fragments, "rows": rows, "tokens": tokens,
                "truncated_tokens": truncated, "seconds": dict(seconds),
                "first_embedded_at": min(first, default=None)}

    @property
    def min_rows_per_write(self) -> int:
        """Rows Ray Data gathers before a write task, so data files are not one per block."""
        return min(self.max_rows_per_file, MIN_ROWS_PER_WRITE)

    def on_write_complete(self, write_result) -> None:
        fragments = [f for r in write_result.write_returns for f in r["fragments"]]
        self.rows = sum(r["rows"] for r in write_result.write_returns)
        self.tokens = sum(r["tokens"] for r in write_result.write_returns)
        self.truncated_tokens = sum(r["truncated_tokens"] for r in write_result.write_returns)
        for r in write_result.write_returns:
            self.seconds.update(r["seconds"])
        self.first_embedded_at = min((r["first_embedded_at"] for r in write_result.write_returns
                                      if r["first_embedded_at"] is not None), default=None)
        started = time.perf_counter()
        ds = commit(self.uri, fragments, mode=self.mode, schema=self.schema,
                    read_version=self.read_version, job=self.job, shards=self.shards,
                    storage_options=self.storage_options,
                    removed_fragment_ids=self.deletions[0], updated_fragments=self.deletions[1],
                    expect_latest=self.expect_latest)
        self.version = ds.version
        self.seconds["commit"] = time.perf_counter() - started

    def get_name(self) -> str:
        return "QuiverLance"
