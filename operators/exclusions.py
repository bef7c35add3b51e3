"""A table's exclusion list: documents deleted from the table that must stay out.

`quiver table delete` removes a document's chunks; if the source still has the document,
the next reindex would embed it again. So the delete also records the id here, and every
job that writes the table leaves those ids out at planning time, as it leaves out
duplicates (`operators.sources.dedup.find_duplicates`): the plan counts them as excluded,
a reindex deletes them from the table if they are there. `quiver table include` takes
ids off the list, and the next run embeds them again.

The list is a small Lance dataset next to its table (`x.lance` → `x.excluded.lance`), so
it lives wherever the table does, object stores included, and changes atomically.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import lance
import pyarrow as pa
import pyarrow.compute as pc

from operators.filesystems import beside

EXCLUDED_SCHEMA = pa.schema([
    pa.field("doc_id", pa.string(), nullable=False),
    pa.field("excluded_at", pa.timestamp("s", tz="UTC"), nullable=False),
    pa.field("reason", pa.string()),
])
EXCLUDE_SLICE = 65_536
"""Rows of the exclusion list made and written at a time."""


def exclusions_uri(table_uri: str) -> str:
    """Where a table's exclusion list lives.

    >>> exclusions_uri("s3://b/docs.lance")
    's3://b/docs.excluded.lance'
    """
    return beside(table_uri, ".excluded.lance")


def _open(table_uri: str, storage_options: Mapping[str, str] | None
          ) -> lance.LanceDataset | None:
    try:
        return lance.dataset(exclusions_uri(table_uri),
                             storage_options=dict(storage_options) if storage_options else None)
    except (ValueError, OSError):
        return None


def excluded_ids(table_uri: str, storage_options: Mapping[str, str] | None = None
                 ) -> pa.Table:
    """The excluded ids with when and why (EXCLUDED_SCHEMA); empty for a table without a
    list. It grows with the deletes, never with the corpus."""
    ds = _open(table_uri, storage_options)
    return EXCLUDED_SCHEMA.empty_table() if ds is None else ds.to_table()


def exclude(table_uri: str, doc_ids: Sequence[str] | pa.Array, *, reason: str,
            storage_options: Mapping[str, str] | None = None) -> int:
    """Add ids to the list (ids already there keep their first entry); returns how many
    were new. The comparison runs in Arrow, so a delete of 500k documents holds their ids
    as Arrow strings, not Python objects."""
    have = excluded_ids(table_uri, storage_options).column("doc_id")
    ids = pc.unique(pa.array(doc_ids, pa.string()) if not isinstance(doc_ids, pa.Array)
                    else doc_ids.cast(pa.string()))
    fresh = pc.filter(ids, pc.invert(pc.is_in(ids, value_set=have.combine_chunks()))) \
        if len(have) else ids
    if not len(fresh):
        return 0
    stamp = pa.scalar(int(time.time()), pa.int64()).cast(EXCLUDED_SCHEMA.field("excluded_at").type)

    def slices():  # the repeated columns made a slice at a time: memory stays the ids'
        for start in range(0, len(fresh), EXCLUDE_SLICE):
            ids = fresh.slice(start, EXCLUDE_SLICE)
            yield pa.record_batch([ids, pa.repeat(stamp, len(ids)),
                                   pa.repeat(pa.scalar(reason), len(ids))],
                                  schema=EXCLUDED_SCHEMA)

    pa.default_memory_pool().release_unused()  # Lance's writer allocates outside Arrow's pool
    lance.write_dataset(pa.RecordBatchReader.from_batches(EXCLUDED_SCHEMA, slices()),
                        exclusions_uri(table_uri), schema=EXCLUDED_SCHEMA,
                        mode="append" if _open(table_uri, storage_options) else "create",
                        storage_options=dict(storage_options) if storage_options else None)
    return len(fresh)


def include(table_uri: str, doc_ids: Sequence[str], *,
            storage_options: Mapping[str, str] | None = None) -> int:
    """Take ids off the list, in one commit; returns how many were on it."""
    ds = _open(table_uri, storage_options)
    if ds is None or not doc_ids:
        return 0
    where = pc.is_in(pc.field("doc_id"), pa.array(sorted(set(doc_ids)), pa.string()))
    found = ds.count_rows(filter=where)
    if found:
        ds.delete(where)
    return found
