"""Indices for a finished table: BTREE on `id`, and ANN indices when the table is big.

Below `IndexSpec.ann_min_rows` rows (100,000 by default) a flat scan is exact and takes
milliseconds, so no ANN index is built. Above it:

- `vector` (float32/float16) gets Lance's IVF_HNSW_SQ by default (IVF_PQ, IVF_SQ and
  IVF_FLAT on request) with sqrt(rows) partitions and, for PQ, dims/8 sub-vectors;
- `vector_bits` gets an IVF_FLAT index with the hamming metric and sqrt(rows) partitions;
- `vector_i8` has no Lance index (Lance has no int8 distance): it is scanned in numpy.

At search time `operators.search.default_nprobes` probes enough partitions to scan about
4,000 rows (at least 20), and no refine step (Lance's default): recall@10 0.986 on scifact
chunks (98 partitions, 41 probes) and 0.969 on 1M embedding-like vectors (20 probes, p50
~10 ms; benchmarks/ann.py, benchmarks/query.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import timedelta

import lance
import pyarrow.compute as pc

from schemas.manifest import Metric
from schemas.records import BITS_COLUMN, VECTOR_COLUMN
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


def default_sub_vectors(dims: int) -> int:
    """PQ sub-vectors: 8 dimensions each (dims/8), the largest divisor of dims below that.

    >>> default_sub_vectors(384), default_sub_vectors(100)
    (48, 10)
    """
    target = max(1, dims // 8)
    return next(n for n in range(target, 0, -1) if dims % n == 0)


def ann_params(index_type: str, *, rows: int, dims: int, num_partitions: int | None) -> dict:
    """Build parameters for Lance's `create_index` that scale with the table."""
    params: dict = {"num_partitions": min(num_partitions or default_partitions(rows), rows)}
    if index_type.endswith("PQ"):
        params["num_sub_vectors"] = default_sub_vectors(dims)
    return params


def build_vector_index(ds: lance.LanceDataset, spec: IndexSpec, *, metric: Metric,
                       dims: int) -> str:
    """ANN index on `vector` with size-scaled parameters; returns its description."""
    rows = ds.count_rows()
    params = ann_params(spec.ann_type, rows=rows, dims=dims, num_partitions=spec.num_partitions)
    ds.create_index(VECTOR_COLUMN, index_type=spec.ann_type, metric=metric, replace=True,
                    **params)
    extra = f", {params['num_sub_vectors']} sub-vectors" if "num_sub_vectors" in params else ""
    return f"{spec.ann_type} ({params['num_partitions']} partitions{extra}, {metric})"


def build_bits_index(ds: lance.LanceDataset, spec: IndexSpec) -> str:
    """IVF_FLAT hamming index on the packed sign bits (the binary first stage)."""
    rows = ds.count_rows()
    partitions = min(spec.num_partitions or default_partitions(rows), rows)
    ds.create_index(BITS_COLUMN, index_type="IVF_FLAT", metric="hamming", replace=True,
                    num_partitions=partitions)
    return f"IVF_FLAT on {BITS_COLUMN} ({partitions} partitions, hamming)"


BITMAP_MAX_DISTINCT = 1000


def scalar_index_kind(ds: lance.LanceDataset, column: str, requested: str | None) -> str:
    """BITMAP for low-cardinality columns (at most 1,000 distinct values), else BTREE."""
    if requested:
        return requested
    values = ds.to_table(columns=[column]).column(column)
    return "BITMAP" if pc.count_distinct(values).as_py() <= BITMAP_MAX_DISTINCT else "BTREE"


def build_scalar_indices(ds: lance.LanceDataset, spec: IndexSpec, *,
                         fulltext_builder: FullTextBuilder | None = None) -> list[str]:
    """BTREE on `id` and `doc_id`, the spec's filterable columns, and the full-text
    index on `text`."""
    built = []
    ds.create_scalar_index("id", "BTREE", replace=True)
    built.append("id: BTREE")
    # A reindex looks up the rows of changed documents by doc_id (`jobs._reindex`).
    ds.create_scalar_index("doc_id", "BTREE", replace=True)
    built.append("doc_id: BTREE")
    wanted = spec.filterable if isinstance(spec.filterable, dict) \
        else dict.fromkeys(spec.filterable)
    for column, requested in wanted.items():
        kind = scalar_index_kind(ds, column, requested)
        ds.create_scalar_index(column, kind, replace=True)
        built.append(f"{column}: {kind}")
    if spec.fts and fulltext_builder is not None:
        built.append(fulltext_builder(ds))
    elif spec.fts:
        ds.create_scalar_index("text", "INVERTED", replace=True)
        built.append("text: INVERTED (BM25)")
    return built


VectorIndexBuilder = Callable[..., str]
"""Builds the `vector` ANN index: `(ds, spec, *, metric, dims) -> description`."""
FullTextBuilder = Callable[[lance.LanceDataset], str]
"""Builds the `text` full-text index: `(ds) -> description`."""


def build_indices(ds: lance.LanceDataset, spec: IndexSpec, *, metric: Metric,
                  codecs: list[str] | None = None, dims: int = 384,
                  vector_builder: VectorIndexBuilder | None = None,
                  fulltext_builder: FullTextBuilder | None = None) -> IndexReport:
    """Build (or replace) the table's indices according to its size and codecs.

    `vector_builder` and `fulltext_builder` replace the single-process builds (the job
    passes distributed ones for big tables).
    """
    codecs = codecs or ["float32"]
    rows = ds.count_rows()
    scalar = build_scalar_indices(ds, spec, fulltext_builder=fulltext_builder) if rows else []
    if rows < max(spec.ann_min_rows, 1):
        return IndexReport(f"exact (flat scan; {rows} rows < ann_min_rows "
                           f"{spec.ann_min_rows})", tuple(scalar))
    built = []
    if {"float32", "float16"} & set(codecs):
        builder = vector_builder or build_vector_index
        built.append(builder(ds, spec, metric=metric, dims=dims))
    if "binary" in codecs:
        built.append(build_bits_index(ds, spec))
    if not built:
        built.append("exact int8 scan (Lance has no int8 index)")
    return IndexReport("; ".join(built), tuple(scalar))


COMPACT_MIN_FRAGMENTS = 8
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
                     settled: Collection[int] = (),
                     vector_builder: VectorIndexBuilder | None = None,
                     fulltext_builder: FullTextBuilder | None = None) -> IndexReport:
    """Index upkeep after an incremental reindex: the policy in docs/maintenance.md.

    1. The fragments the reindex added are compacted into few (once there are more than
       `COMPACT_MIN_FRAGMENTS` of them); the `settled` ones, which the table held before,
       are left as they are, so the rewrite costs the change, not the table.
    2. Every index is rebuilt (retrained, through the given builders, so on the cluster
       above `distributed_min_rows`) when the table just crossed `ann_min_rows`, or the
       rows placed in the base's partitions without retraining (deltas plus this change)
       pass `spec.retrain_share` of the table (`needs_retrain`).
    3. Otherwise the new rows become a delta segment of each index (`add_to_indices`).
    """
    fragments = [f.fragment_id for f in ds.get_fragments()]
    if sum(f not in settled for f in fragments) > COMPACT_MIN_FRAGMENTS:
        ds.optimize.compact_files(excluded_fragment_ids=[f for f in fragments if f in settled])
        ds = ds.checkout_version(ds.latest_version)
    rows = ds.count_rows()
    has_ann = any(i.field_names in ([VECTOR_COLUMN], [BITS_COLUMN])
                  for i in ds.describe_indices())
    needs_ann = rows >= max(spec.ann_min_rows, 1)
    segments = index_segments(ds)
    if not rows or has_ann != needs_ann or needs_retrain(
            segments, rows=rows, changed=changed, retrain_share=spec.retrain_share):
        report = build_indices(ds, spec, metric=metric, codecs=codecs, dims=dims,
                               vector_builder=vector_builder,
                               fulltext_builder=fulltext_builder)
        return IndexReport(f"{report.vector} (rebuilt: {changed} of {rows} rows changed)",
                           report.scalar)
    if not any(i.field_names == ["doc_id"] for i in ds.describe_indices()):
        ds.create_scalar_index("doc_id", "BTREE")  # tables indexed before it existed
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
