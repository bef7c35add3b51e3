"""Living with a table: stats, compaction, deletes, export, tags and rollback, rejects.

Each chore is one Lance operation or a few, run under the table's lease
(`operators.lease`) when it writes, so it never interleaves with a job. Readers follow
the `current` tag (`jobs._cutover`): a chore that makes a new version of the data the
readers see (optimize, delete) moves the tag with it, unless a rollback holds it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs._embed_job import rejects_uri
from jobs._index import ClusterBuilder, index_workers
from jobs._ray import cluster_resources, ensure_ray
from jobs._tags import CURRENT_TAG, HELD_TAG, current_version, held_version
from operators.exclusions import exclude
from operators.index import COMPACT_MIN_FRAGMENTS, LOCAL, add_to_indices, index_segments
from operators.lease import Lease
from operators.reindex import by_fragment, delete_in_fragments
from operators.sources.plan import reason_key
from schemas.errors import QueryError, TableError
from schemas.spec import DISTRIBUTED_MIN_ROWS

Progress = Callable[[str], None]
SMALL_FRAGMENT_ROWS = 1024 * 1024 // 2
"""A fragment under half of Lance's compaction target (1,048,576 rows) is small."""
DELETED_SHARE_DUE = 0.1
"""Deleted rows above this share of a table make `optimize` due (they are still read)."""


def _options(storage_options: Mapping[str, str] | None) -> dict[str, str] | None:
    return dict(storage_options) if storage_options else None


def open_dataset(uri: str, storage_options: Mapping[str, str] | None = None, *,
                 version: int | str | None = None) -> lance.LanceDataset:
    """The table's Lance dataset (latest, or a version number or tag), or a TableError."""
    try:
        return lance.dataset(str(uri), version=version, storage_options=_options(storage_options))
    except (ValueError, OSError) as err:
        raise TableError(f"{uri}: cannot open as a Lance table: {err}") from None


def _column_bytes(ds: lance.LanceDataset) -> dict[str, int]:
    """Bytes on disk per top-level column (nested fields summed into their column)."""
    top: dict[int, str] = {}

    def walk(field, name: str) -> None:
        top[field.id()] = name
        for child in field.children():
            walk(child, name)

    for field in ds.lance_schema.fields():
        walk(field, field.name())
    sizes: Counter[str] = Counter()
    for stat in ds.stats.data_stats().fields:
        sizes[top.get(stat.id, f"field {stat.id}")] += stat.bytes_on_disk
    return dict(sizes)


def table_stats(uri: str, storage_options: Mapping[str, str] | None = None) -> dict:
    """Fragments (and how many are small), versions, rows deleted and not yet indexed,
    bytes per column, and whether `optimize` is due and why. Reads metadata only."""
    ds = open_dataset(uri, storage_options)
    fragments = ds.get_fragments()
    rows = [f.count_rows() for f in fragments]
    small = sum(r < SMALL_FRAGMENT_ROWS for r in rows)
    deleted = ds.stats.dataset_stats()["num_deleted_rows"]
    unindexed = {}
    for index in ds.list_indices():
        stats = ds.stats.index_stats(index["name"])
        unindexed[index["name"]] = int(stats.get("num_unindexed_rows", 0))
    total = sum(rows)
    due = []
    if small > COMPACT_MIN_FRAGMENTS:
        due.append(f"{small} small fragments")
    if total and deleted > DELETED_SHARE_DUE * (total + deleted):
        due.append(f"{deleted} deleted rows still stored")
    if any(unindexed.values()):
        due.append(f"{max(unindexed.values())} rows not yet indexed")
    return {
        "table": str(uri), "version": ds.version, "current": current_version(ds),
        "held": held_version(ds) is not None, "rows": total, "fragments": len(fragments),
        "small_fragments": small, "deleted_rows": deleted, "versions": len(ds.versions()),
        "unindexed_rows": unindexed, "column_bytes": _column_bytes(ds),
        "optimize_due": bool(due),
        "hint": f"optimize is due: {', '.join(due)} (quiver table optimize {uri})" if due
        else "nothing to optimize",
    }


def follow_current(ds: lance.LanceDataset, before: int) -> bool:
    """Move `current` to the latest version if it was on `before` (the latest when the
    chore began) and no rollback holds it; True when it moved."""
    latest = ds.checkout_version(ds.latest_version)
    current = current_version(latest)
    if current is None or held_version(latest) is not None or current != before or \
            latest.version == before:
        return False
    latest.tags.update(CURRENT_TAG, latest.version)
    return True


def optimize(uri: str, *, storage_options: Mapping[str, str] | None = None,
             retention_days: float | None = 7.0, wait: bool = False,
             distributed_min_rows: int | None = None,
             progress: Progress = lambda _: None) -> dict:
    """Compact small fragments, add new rows to the indices incrementally, and drop
    versions older than `retention_days` (tagged ones stay). Readers' `current` follows
    unless held.

    A table of `distributed_min_rows` rows or more (by default the spec's
    `index.distributed_min_rows`) is compacted by Ray tasks, one per Lance compaction task
    (joining RAY_ADDRESS, else a local Ray); a smaller one in this process, one task at a
    time, so memory stays that of one task.

    Returns:
        The stats before and after, the fragments rewritten, the workers that compacted
        them (0: this process) and the versions removed.
    """
    before = table_stats(uri, storage_options)
    with Lease.acquire(uri, storage_options, wait=wait,
                       purpose="quiver table optimize") as lease:
        ds = open_dataset(uri, storage_options)
        start = ds.version
        builder = LOCAL
        if before["rows"] >= (DISTRIBUTED_MIN_ROWS if distributed_min_rows is None
                              else distributed_min_rows):
            ensure_ray()
            builder = ClusterBuilder(index_workers(cluster_resources()[0]),
                                     dict(storage_options or {}), lease=lease)
        progress(f"compacting small fragments ({builder.workers} workers)" if builder.workers
                 else "compacting small fragments")
        rewritten = builder.compact(ds)
        ds = ds.checkout_version(ds.latest_version)
        if ds.describe_indices():
            progress("adding new rows to the indices, their deltas merged into one")
            add_to_indices(ds, index_segments(ds), max_deltas=1)
        moved = follow_current(ds, start)
        removed = 0
        if retention_days is not None:
            ds = ds.checkout_version(ds.latest_version)
            stats = ds.cleanup_old_versions(older_than=timedelta(days=retention_days),
                                            error_if_tagged_old_versions=False)
            removed = int(getattr(stats, "old_versions", 0))
    after = table_stats(uri, storage_options)
    return {"table": str(uri), "before": before, "after": after,
            "fragments_rewritten": rewritten, "workers": builder.workers,
            "versions_removed": removed, "current_moved": moved}


def _matching_documents(ds: lance.LanceDataset, where: pc.Expression) -> pa.Array:
    """Distinct doc ids of the rows `where` matches, as one Arrow array: streamed batch by
    batch, the ids held as Arrow bytes (about 20 per id), never as a Python set, and not
    sorted (a sort of 500k ids costs more memory than the ids themselves)."""
    parts: list[pa.Array] = []
    for batch in ds.scanner(columns=["doc_id"], filter=where).to_batches():
        parts.append(pc.unique(batch.column(0)))
        if len(parts) >= 64:  # fold, so the pieces never outgrow the distinct ids
            parts = [pc.unique(pa.concat_arrays(parts))]
    ids = pc.unique(pa.concat_arrays(parts)) if parts else pa.array([], pa.string())
    del parts
    pa.default_memory_pool().release_unused()  # the scan's freed buffers, before Lance's next
    return ids


def _document_rows(ds: lance.LanceDataset, ids: pa.Array) -> np.ndarray:
    """Row addresses of every chunk of these documents, from a streamed scan of `doc_id`
    matched in Arrow (`pc.is_in`), so no filter carries the ids to Lance."""
    found = [np.zeros(0, np.uint64)]
    for batch in ds.scanner(columns=["doc_id"], with_row_address=True).to_batches():
        hit = pc.is_in(batch.column("doc_id"), value_set=ids)
        found.append(pc.filter(batch.column("_rowaddr"), hit).to_numpy().astype(np.uint64))
    return np.concatenate(found)


def delete_documents(uri: str, *, doc_ids: Sequence[str] = (),
                     where: pc.Expression | None = None, keep_out: bool = True,
                     storage_options: Mapping[str, str] | None = None,
                     wait: bool = False) -> dict:
    """Remove whole documents (every chunk of each) in one Lance commit.

    Memory follows the documents removed (their ids as Arrow strings, their rows'
    addresses as 8-byte integers), not the table; the deletion vectors are written by
    row address, as a reindex writes them.

    Args:
        uri: The table.
        doc_ids: Documents to remove.
        where: Or a filter: every document with a chunk it matches goes.
        keep_out: Also put the ids on the table's exclusion list (before the delete), so
            a later job leaves them out even though the source still has them; without
            it the next reindex embeds them again.
        storage_options: Object-store options.
        wait: Wait for a running job's lease instead of failing.
    """
    if bool(doc_ids) == (where is not None):
        raise QueryError("give document ids or a filter (--doc-id or --where), not both")
    with Lease.acquire(uri, storage_options, wait=wait, purpose="quiver table delete"):
        ds = open_dataset(uri, storage_options)
        ids = pc.unique(pa.array(list(doc_ids), pa.string())) if doc_ids \
            else _matching_documents(ds, where)
        start = ds.version
        rows = _document_rows(ds, ids) if len(ids) else np.zeros(0, np.uint64)
        listed = exclude(uri, ids, reason="quiver table delete",
                         storage_options=storage_options) if keep_out and len(ids) else 0
        if len(rows):
            removed, updated = delete_in_fragments(ds, by_fragment(rows))
            lance.LanceDataset.commit(
                uri, lance.LanceOperation.Delete(updated, removed, "quiver table delete"),
                read_version=start,
                storage_options=dict(storage_options) if storage_options else None)
        moved = follow_current(ds, start)
    latest = open_dataset(uri, storage_options)
    return {"table": str(uri), "documents": len(ids), "chunks_deleted": len(rows),
            "version_before": start, "version": latest.version, "current_moved": moved,
            "excluded_added": listed, "kept_out": keep_out,
            "note": "the ids are on the table's exclusion list: jobs leave them out until "
                    "`quiver table include`" if keep_out else
                    "not excluded: the next reindex embeds them again if the source has them"}


def export_table(uri: str, out: Path, *, columns: Sequence[str] | None = None,
                 version: int | str | None = None,
                 storage_options: Mapping[str, str] | None = None,
                 progress: Progress = lambda _: None) -> dict:
    """Write a version of the table (default: `current`) to one Parquet file, batch by
    batch, so memory stays that of one batch whatever the table's size."""
    ds = open_dataset(uri, storage_options, version=version)
    if version is None and (pinned := current_version(ds)) is not None:
        ds = ds.checkout_version(pinned)
    names = list(columns) if columns else ds.schema.names
    unknown = [c for c in names if c not in ds.schema.names]
    if unknown:
        raise QueryError(f"unknown column(s) {unknown}; the table has {ds.schema.names}")
    schema = pa.schema([ds.schema.field(c) for c in names])
    rows = 0
    total = ds.count_rows()
    with pq.ParquetWriter(str(out), schema) as writer:
        for batch in ds.to_batches(columns=names, batch_size=8192):
            writer.write_batch(batch)
            rows += batch.num_rows
            if rows % (8192 * 16) < batch.num_rows:
                progress(f"exported {rows}/{total} rows")
    return {"table": str(uri), "version": ds.version, "out": str(out), "rows": rows,
            "columns": names, "bytes": out.stat().st_size}


def list_tags(uri: str, storage_options: Mapping[str, str] | None = None) -> dict:
    """Tags with their versions, and the versions with their times and models."""
    ds = open_dataset(uri, storage_options)
    return {"table": str(uri), "latest": ds.version, "current": current_version(ds),
            "held": held_version(ds) is not None,
            "tags": {n: int(t["version"]) for n, t in sorted(ds.tags.list().items())},
            "versions": [{"version": v["version"], "timestamp": str(v["timestamp"])}
                         for v in ds.versions()]}


def _version_of(ds: lance.LanceDataset, version: int | str) -> int:
    if isinstance(version, str) and not version.isdigit():
        tag = ds.tags.list().get(version)
        if tag is None:
            raise QueryError(f"no tag {version!r}; tags: {sorted(ds.tags.list())}")
        return int(tag["version"])
    number = int(version)
    if number not in {v["version"] for v in ds.versions()}:
        raise QueryError(f"version {number} is not in {ds.uri} (it may have been cleaned "
                         "up); see `quiver table tags`")
    return number


def set_tag(uri: str, name: str, version: int | str, *,
            storage_options: Mapping[str, str] | None = None, wait: bool = False) -> dict:
    """Create or move a tag of the user's (not `current`, which restore and promote own),
    under the table's lease like every other write: a job's cleanup at its end drops
    versions no tag holds, so a tag must not land in the middle of it."""
    if name in (CURRENT_TAG, HELD_TAG):
        raise QueryError(f"{name!r} is Quiver's own tag; use `quiver table restore` or "
                         "`quiver table promote` to move it")
    with Lease.acquire(uri, storage_options, wait=wait, purpose="quiver table tag"):
        ds = open_dataset(uri, storage_options)
        number = _version_of(ds, version)
        if name in ds.tags.list():
            ds.tags.update(name, number)
        else:
            ds.tags.create(name, number)
    return {"table": str(uri), "tag": name, "version": number}


def restore(uri: str, version: int | str, *,
            storage_options: Mapping[str, str] | None = None, wait: bool = False) -> dict:
    """Point `current` (what readers see) at an older version, a model cut-over's
    predecessor included, and hold it there: later jobs keep writing new versions but
    leave `current` alone until `promote`."""
    with Lease.acquire(uri, storage_options, wait=wait, purpose="quiver table restore"):
        ds = open_dataset(uri, storage_options)
        number = _version_of(ds, version)
        before = current_version(ds)
        tags = ds.tags.list()
        for tag in (CURRENT_TAG, HELD_TAG):
            if tag in tags:
                ds.tags.update(tag, number)
            else:
                ds.tags.create(tag, number)
    return {"table": str(uri), "current": number, "was": before, "held": True,
            "hint": "jobs will not move 'current' until `quiver table promote`"}


def promote(uri: str, version: int | str | None = None, *,
            storage_options: Mapping[str, str] | None = None, wait: bool = False) -> dict:
    """Point `current` at `version` (default: the latest) and release the hold, so jobs
    move it again as they finish."""
    with Lease.acquire(uri, storage_options, wait=wait, purpose="quiver table promote"):
        ds = open_dataset(uri, storage_options)
        number = ds.latest_version if version is None else _version_of(ds, version)
        before = current_version(ds)
        if CURRENT_TAG in ds.tags.list():
            ds.tags.update(CURRENT_TAG, number)
        else:
            ds.tags.create(CURRENT_TAG, number)
        if HELD_TAG in ds.tags.list():
            ds.tags.delete(HELD_TAG)
    return {"table": str(uri), "current": number, "was": before, "held": False}


def rejects_summary(uri: str, *, limit: int = 10,
                    storage_options: Mapping[str, str] | None = None) -> dict:
    """The table's rejects: a count per kind of reason, and the first rows with their
    file and line (or row); streamed, so a large rejects table is never loaded whole."""
    try:
        ds = lance.dataset(rejects_uri(str(uri)), storage_options=_options(storage_options))
    except (ValueError, OSError):
        open_dataset(uri, storage_options)  # a missing table is an error, no rejects is not
        return {"table": str(uri), "rejects": 0, "by_reason": {}, "first": []}
    counts: Counter[str] = Counter()
    first: list[dict] = []
    for batch in ds.to_batches():
        for pair in pc.value_counts(batch.column("reason")).to_pylist():
            counts[reason_key(pair["values"])] += pair["counts"]
        if len(first) < limit:
            first += batch.slice(0, limit - len(first)).to_pylist()
    return {"table": str(uri), "rejects_table": rejects_uri(str(uri)),
            "rejects": sum(counts.values()), "by_reason": dict(counts.most_common()),
            "first": first}

