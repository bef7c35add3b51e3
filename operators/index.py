"""Indices for a finished table: BTREE on `id`, and ANN indices when the table is big.

Below `IndexSpec.ann_min_rows` rows (100,000 by default) a flat scan is exact and takes
milliseconds, so no ANN index is built. Above it:

- `vector` (float32/float16) gets Lance's IVF_HNSW_SQ by default (IVF_RQ, IVF_PQ, IVF_SQ
  and IVF_FLAT on request) with sqrt(rows) partitions, for PQ dims/8 sub-vectors of 8
  bits, for RQ (RaBitQ) 1 bit per dimension;
- `vector_bits` gets an IVF_FLAT index with the hamming metric and sqrt(rows) partitions;
- `vector_i8` has no Lance index (Lance has no int8 distance): it is scanned in numpy.

At search time `operators.search.default_nprobes` probes enough partitions to scan about
4,000 rows (at least 20), and no refine step (Lance's default): recall@10 0.986 on scifact
chunks (98 partitions, 41 probes) and 0.969 on 1M embedding-like vectors (20 probes, p50
~10 ms; benchmarks/ann.py, benchmarks/query.py).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from datetime import timedelta

import lance
import pyarrow.compute as pc

from schemas.manifest import CodeManifest, Metric
from schemas.records import BITS_COLUMN, CODE_COLUMN, VECTOR_COLUMN, lance_indexed_code
from schemas.spec import IndexSpec, WriteSpec


@dataclass(frozen=True)
class IndexReport:
    """What `build_indices` did, for the job summary."""

    vector: str
    """'exact (flat scan)' or the ANN indices built, with their partitions."""
    scalar: tuple[str, ...]


def default_partitions(rows: int) -> int:
    """About sqrt(rows) partitions, at least 1: Lance's usual rule of thumb.

    >>> default_partitions(1_000_000)
    1000
    """
    return max(1, int(math.sqrt(rows)))


CODE_PARTITION_DIVISOR = 4
"""A code index (`pca-rq`) has a quarter of the float index's partitions: its search
probes a share of them (`operators.search.CODE_PROBE_SHARE`), so fewer, larger
partitions cost the same scan and fewer centroids to rank."""


def code_partitions(rows: int) -> int:
    """Partitions of a code index: `default_partitions` / `CODE_PARTITION_DIVISOR`.

    >>> code_partitions(1_000_000), code_partitions(9_631), code_partitions(10)
    (250, 24, 1)
    """
    return max(1, default_partitions(rows) // CODE_PARTITION_DIVISOR)


def default_sub_vectors(dims: int) -> int:
    """PQ sub-vectors: 8 dimensions each (dims/8), the largest divisor of dims below that.

    >>> default_sub_vectors(384), default_sub_vectors(100)
    (48, 10)
    """
    target = max(1, dims // 8)
    return next(n for n in range(target, 0, -1) if dims % n == 0)


def ann_params(index_type: str, *, rows: int, dims: int, num_partitions: int | None,
               num_sub_vectors: int | None = None, num_bits: int | None = None) -> dict:
    """Build parameters for Lance's `create_index` that scale with the table.

    Raises:
        ValueError: PQ sub-vectors that do not divide the dims, or RaBitQ (IVF_RQ) on
            dims that are not a multiple of 8; both name the setting.
    """
    params: dict = {"num_partitions": min(num_partitions or default_partitions(rows), rows)}
    if index_type.endswith("PQ"):
        params["num_sub_vectors"] = num_sub_vectors or default_sub_vectors(dims)
        if dims % params["num_sub_vectors"]:
            raise ValueError(f"index.num_sub_vectors={params['num_sub_vectors']} does not "
                             f"divide the vector's {dims} dims")
        params["num_bits"] = num_bits or 8
    if index_type == "IVF_RQ":
        if dims % 8:
            raise ValueError(f"IVF_RQ needs dims divisible by 8, got {dims}")
        params["num_bits"] = num_bits or 1
    return params


def index_bytes_per_row(params: dict, dims: int) -> int | None:
    """Bytes of code a compact index keeps per row (row ids aside), None for the others.

    >>> index_bytes_per_row({"num_sub_vectors": 24, "num_bits": 8}, 384)
    24
    >>> index_bytes_per_row({"num_bits": 1}, 384)
    48
    """
    if "num_sub_vectors" in params:
        return params["num_sub_vectors"] * params["num_bits"] // 8
    if "num_bits" in params:
        return dims * params["num_bits"] // 8
    return None


class Builder:
    """Where a table's heavy builds run: index builds and fragment compaction.

    This one runs them in this process, which for a table under
    `index.distributed_min_rows` is faster than starting workers. The job passes
    `jobs._index.ClusterBuilder` above it, which runs the same builds on Ray workers
    through lance-ray; both take the same arguments, so the policy here (which index,
    how many partitions, what to compact) is written once.
    """

    workers = 0
    """Ray workers the builds run on; 0 for this process."""

    @property
    def where(self) -> str:
        """Appended to each index description: '; built on N workers' on the cluster."""
        return f"; built on {self.workers} workers" if self.workers else ""

    def vector(self, ds: lance.LanceDataset, column: str, *, index_type: str, metric: str,
               params: dict) -> None:
        ds.create_index(column, index_type=index_type, metric=metric, replace=True, **params)

    def scalar(self, ds: lance.LanceDataset, column: str, kind: str) -> None:
        ds.create_scalar_index(column, kind, replace=True)

    def compact(self, ds: lance.LanceDataset, *, settled: Collection[int] = ()) -> int:
        """Compact the fragments not in `settled` toward Lance's target size (a million
        rows); returns the fragments rewritten. Leaving the `settled` ones (those a table
        held before this job) alone keeps the rewrite the size of the change."""
        from lance.optimize import Compaction

        plan = Compaction.plan(ds, compaction_options(ds, settled))
        if not plan.num_tasks():
            return 0
        Compaction.commit(ds, [task.execute(ds) for task in plan.tasks])
        return sum(len(task.fragments) for task in plan.tasks)


def compaction_options(ds: lance.LanceDataset, settled: Collection[int]) -> dict:
    """Lance's default compaction, minus the `settled` fragments."""
    from lance.optimize import CompactionOptions

    options = CompactionOptions()
    settled = set(settled)
    if settled:
        options["excluded_fragment_ids"] = [f.fragment_id for f in ds.get_fragments()
                                            if f.fragment_id in settled]
    return options


LOCAL = Builder()


def build_vector_index(ds: lance.LanceDataset, spec: IndexSpec, *, metric: Metric,
                       dims: int, builder: Builder = LOCAL) -> str:
    """ANN index on `vector` with size-scaled parameters; returns its description."""
    rows = ds.count_rows()
    params = ann_params(spec.ann_type, rows=rows, dims=dims, num_partitions=spec.num_partitions,
                        num_sub_vectors=spec.num_sub_vectors, num_bits=spec.num_bits)
    builder.vector(ds, VECTOR_COLUMN, index_type=spec.ann_type, metric=metric, params=params)
    code = index_bytes_per_row(params, dims)
    extra = f", {code} B per row" if code else ""
    return (f"{spec.ann_type} ({params['num_partitions']} partitions{extra}, {metric}"
            f"{builder.where})")


def build_bits_index(ds: lance.LanceDataset, spec: IndexSpec, *,
                     builder: Builder = LOCAL) -> str:
    """IVF_FLAT hamming index on the packed sign bits (the binary first stage)."""
    rows = ds.count_rows()
    partitions = min(spec.num_partitions or default_partitions(rows), rows)
    builder.vector(ds, BITS_COLUMN, index_type="IVF_FLAT", metric="hamming",
                   params={"num_partitions": partitions})
    return f"IVF_FLAT on {BITS_COLUMN} ({partitions} partitions, hamming{builder.where})"


def build_code_index(ds: lance.LanceDataset, spec: IndexSpec, code: CodeManifest, *,
                     builder: Builder = LOCAL) -> str:
    """IVF_RQ on a Lance-indexed code's projection (`pca-rq`): 1 bit per projected
    dimension, so the index keeps the code's bytes per row. Dot product: the projection
    is centred, not normalised, and `project(q) . project(x)` ranks rows as `q . x`."""
    rows = ds.count_rows()
    params = ann_params("IVF_RQ", rows=rows, dims=code.nbytes * 8,
                        num_partitions=spec.num_partitions or code_partitions(rows))
    builder.vector(ds, CODE_COLUMN, index_type="IVF_RQ", metric="dot", params=params)
    return (f"IVF_RQ on {CODE_COLUMN} ({params['num_partitions']} partitions, "
            f"{code.nbytes} B per row, {code.name}{builder.where})")


BITMAP_MAX_DISTINCT = 1000


def scalar_index_kind(ds: lance.LanceDataset, column: str, requested: str | None) -> str:
    """BITMAP for low-cardinality columns (at most 1,000 distinct values), else BTREE.

    The column is streamed a batch at a time and the count stops once it passes the
    limit, so a 300M-row table costs a few batches here, not the column in memory."""
    if requested:
        return requested
    seen: set = set()
    for batch in ds.to_batches(columns=[column], batch_size=65_536):
        seen.update(pc.unique(batch.column(0)).to_pylist())
        if len(seen) > BITMAP_MAX_DISTINCT:
            return "BTREE"
    return "BITMAP"


def build_scalar_indices(ds: lance.LanceDataset, spec: IndexSpec, *,
                         builder: Builder = LOCAL) -> list[str]:
    """BTREE on `id` and `doc_id`, the spec's filterable columns, and the full-text
    index on `text`."""
    wanted = {"id": "BTREE",
              # A reindex looks up the rows of changed documents by doc_id (`jobs._reindex`).
              "doc_id": "BTREE"}
    filterable = spec.filterable if isinstance(spec.filterable, dict) \
        else dict.fromkeys(spec.filterable)
    wanted |= {column: scalar_index_kind(ds, column, requested)
               for column, requested in filterable.items()}
    built = []
    for column, kind in wanted.items():
        builder.scalar(ds, column, kind)
        built.append(f"{column}: {kind}{builder.where}")
    if spec.fts:
        builder.scalar(ds, "text", "INVERTED")
        built.append(f"text: INVERTED (BM25{builder.where})")
    return built


def build_indices(ds: lance.LanceDataset, spec: IndexSpec, *, metric: Metric,
                  codecs: list[str] | None = None, dims: int = 384,
                  code: CodeManifest | None = None,
                  builder: Builder = LOCAL) -> IndexReport:
    """Build (or replace) the table's indices according to its size, codecs and code (a
    Lance-indexed one gets its IVF_RQ), where `builder` runs them (the job passes a
    cluster builder for big tables)."""
    codecs = codecs or ["float32"]
    rows = ds.count_rows()
    scalar = build_scalar_indices(ds, spec, builder=builder) if rows else []
    if rows < max(spec.ann_min_rows, 1):
        return IndexReport(f"exact (flat scan; {rows} rows < ann_min_rows "
                           f"{spec.ann_min_rows})", tuple(scalar))
    built = []
    if {"float32", "float16"} & set(codecs):
        built.append(build_vector_index(ds, spec, metric=metric, dims=dims, builder=builder))
    if "binary" in codecs:
        built.append(build_bits_index(ds, spec, builder=builder))
    if code is not None and lance_indexed_code(code.name):
        built.append(build_code_index(ds, spec, code, builder=builder))
    if not built:
        built.append("exact int8 scan (Lance has no int8 index)")
    return IndexReport("; ".join(built), tuple(scalar))


COMPACT_MIN_FRAGMENTS = 8
"""A job that wrote more fragments than this compacts them at its end (and `quiver table
stats` calls a table with more small fragments due for `optimize`)."""
MAX_INDEX_DELTAS = 4
"""Delta segments an index may hold; the next upkeep merges them (not the base) into one."""


@dataclass(frozen=True)
class Segments:
    """An index's segments: those of its last full build (the base, one per worker of a
    distributed build) and the deltas upkeep added since."""

    name: str
    deltas: int
    delta_rows: int
    """Rows of the fragments the deltas cover: rows placed in the base's partitions
    without retraining them."""
    unindexed_rows: int
    """Rows of fragments no segment covers yet (what this upkeep adds)."""


def index_segments(ds: lance.LanceDataset) -> list[Segments]:
    """Every index of `ds` with its base, deltas and uncovered rows, from the manifest
    alone (fragment row counts and index segment metadata; no data or index file read).

    The base is the segments that carry the oldest `dataset_version_at_last_update`: one
    build (single or distributed) commits all its segments at one version, and each
    upkeep or merge commits its delta at a later one.
    """
    rows = {f.fragment_id: f.metadata.physical_rows for f in ds.get_fragments()}
    out = []
    for desc in ds.describe_indices():
        base = min(s.dataset_version_at_last_update for s in desc.segments)
        deltas = [s for s in desc.segments if s.dataset_version_at_last_update != base]
        covered = {f for s in desc.segments for f in s.fragment_ids}
        out.append(Segments(
            name=desc.name, deltas=len(deltas),
            delta_rows=sum(rows.get(f, 0) for s in deltas for f in s.fragment_ids),
            unindexed_rows=sum(n for f, n in rows.items() if f not in covered)))
    return out


def needs_retrain(segments: list[Segments], *, rows: int, changed: int,
                  retrain_share: float) -> bool:
    """True when the rows placed without training, counting this change, pass
    `retrain_share` of the table on any index, or this change alone does.

    >>> seg = [Segments("vector_idx", deltas=3, delta_rows=150, unindexed_rows=40)]
    >>> needs_retrain(seg, rows=1000, changed=40, retrain_share=0.2)
    False
    >>> needs_retrain(seg, rows=1000, changed=40, retrain_share=0.15)
    True
    """
    limit = retrain_share * rows
    return changed > limit or any(s.delta_rows + s.unindexed_rows > limit for s in segments)


def add_to_indices(ds: lance.LanceDataset, segments: list[Segments], *,
                   max_deltas: int = MAX_INDEX_DELTAS) -> list[str]:
    """Index the uncovered rows as one new delta segment per index, so upkeep costs the
    change, not the table (Lance's default merges the new rows into the latest segment,
    which for a freshly built table is the whole base: 27 s against an 11 s build at 100k
    rows). An index that already holds `max_deltas` deltas has them merged with the new
    rows into one; the base is never rewritten here."""
    done = []
    for seg in segments:
        merge = seg.deltas if seg.deltas >= max_deltas else 0
        if not seg.unindexed_rows and not merge:
            continue
        ds.optimize.optimize_indices(index_names=[seg.name], num_indices_to_merge=merge)
        done.append(f"{seg.name}: " + (f"{merge} deltas merged with {seg.unindexed_rows} "
                                       "new rows" if merge else
                                       f"delta of {seg.unindexed_rows} rows"))
    return done


def maintain_indices(ds: lance.LanceDataset, spec: IndexSpec, *, metric: Metric,
                     codecs: list[str], dims: int, changed: int,
                     code: CodeManifest | None = None,
                     builder: Builder = LOCAL) -> IndexReport:
    """Index upkeep after an incremental reindex: the policy in docs/maintenance.md.

    1. Every index is rebuilt (retrained, where `builder` runs builds: on the cluster
       above `distributed_min_rows`) when the table just crossed `ann_min_rows`, or the
       rows placed in the base's partitions without retraining (deltas plus this change)
       pass `spec.retrain_share` of the table (`needs_retrain`).
    2. Otherwise the new rows become a delta segment of each index (`add_to_indices`).

    The job compacts the fragments the reindex added (`Builder.compact`) before this.
    """
    rows = ds.count_rows()
    has_ann = any(i.field_names in ([VECTOR_COLUMN], [BITS_COLUMN], [CODE_COLUMN])
                  for i in ds.describe_indices())
    needs_ann = rows >= max(spec.ann_min_rows, 1)
    segments = index_segments(ds)
    if not rows or has_ann != needs_ann or needs_retrain(
            segments, rows=rows, changed=changed, retrain_share=spec.retrain_share):
        report = build_indices(ds, spec, metric=metric, codecs=codecs, dims=dims,
                               code=code, builder=builder)
        return IndexReport(f"{report.vector} (rebuilt: {changed} of {rows} rows changed)",
                           report.scalar)
    if not any(i.field_names == ["doc_id"] for i in ds.describe_indices()):
        builder.scalar(ds, "doc_id", "BTREE")  # tables indexed before it existed
        segments = index_segments(ds)
    done = add_to_indices(ds, segments)
    return IndexReport(f"incremental ({changed} of {rows} rows changed; "
                       f"{'; '.join(done) or 'no new rows'})",
                       tuple(f"{','.join(i.field_names)}: {i.index_type}"
                             for i in ds.describe_indices()))


def cleanup_versions(ds: lance.LanceDataset, write: WriteSpec) -> int:
    """Drop versions older than `write.retention_days` (tagged versions are kept)."""
    if write.retention_days is None:
        return 0
    stats = ds.cleanup_old_versions(older_than=timedelta(days=write.retention_days))
    return int(getattr(stats, "old_versions", 0))
