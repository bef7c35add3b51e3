"""Pass 2 of planning a source (`operators.sources.plan`): once per bucket, every record
whose id an earlier record (in file, position order) already has is a duplicate, and so
is every record whose id the table's exclusion list holds; records rejected for their
types never count as the first.

It exists so that deduplication needs only the hashed ids pass 1 (`scan`) wrote, never
the records: a task holds one bucket's rows from every unit (about 1/`buckets` of the
source's valid records, as `BUCKET_SCHEMA` rows) and returns only the losers
(`LOSERS_SCHEMA`), which the driver merges. For a reindex it also returns the bucket's
documents (`source_documents`: id, `doc_hash`, unit, shard).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators.sources.scan import BUCKET_SCHEMA, DOCUMENT_FIELDS, id_key

SOURCE_DOCUMENTS_SCHEMA = pa.schema([*DOCUMENT_FIELDS, ("unit", pa.int32()),
                                     ("shard", pa.int32())])
LOSERS_SCHEMA = pa.schema([("unit", pa.int32()), ("shard", pa.int32()),
                           ("ordinal", pa.int64()), ("w_unit", pa.int32()),
                           ("w_position", pa.int64())])
COUNTS_SCHEMA = pa.schema([("unit", pa.int32()), ("shard", pa.int32()),
                           ("duplicates", pa.int64()), ("excluded", pa.int64())])
"""Per shard (unit, its shard number), how many of its records lost: all the driver
learns of pass 2 (`loser_counts`); the losers themselves stay where the tasks put them
(`operators.sources.skips`)."""



def _ill_typed(rows: pa.Table, bad: frozenset[tuple[int, int, int]]) -> np.ndarray:
    """Which bucket rows have a (unit, shard, sig) signature rejected for its types."""
    keys = (rows.column("unit").to_numpy().astype(np.int64) << 40) \
        | (rows.column("shard").to_numpy().astype(np.int64) << 16) \
        | rows.column("sig").to_numpy().astype(np.int64)
    return np.isin(keys, np.array([(u << 40) | (s << 16) | g for u, s, g in bad], np.int64))


EXCLUDED_UNIT = -1
"""`w_unit` of a loser that lost to the table's exclusion list, not to another record."""
EXCLUDED_SCHEMA = pa.schema([("hi", pa.uint64()), ("lo", pa.uint64())])
"""Excluded document ids, as their `id_key` words."""


def excluded_keys(doc_ids: Sequence[str]) -> pa.Table:
    """Document ids as EXCLUDED_SCHEMA rows, for `find_duplicates`.

    >>> excluded_keys(["a"]).num_rows
    1
    """
    keys = [id_key(d) for d in doc_ids]
    return pa.table([pa.array([k[0] for k in keys], pa.uint64()),
                     pa.array([k[1] for k in keys], pa.uint64())], schema=EXCLUDED_SCHEMA)


def find_duplicates(tables: list[pa.Table], *, bad: frozenset[tuple[int, int, int]],
                    excluded: pa.Table | None = None) -> pa.Table:
    """Pass 2 over one bucket: every record whose id an earlier valid record already has,
    and every record whose id the table's exclusion list holds.

    Args:
        tables: This bucket's rows from every unit.
        bad: (unit, shard, sig) signatures rejected for their metadata types; those
            records are not documents, so they never win an id.
        excluded: EXCLUDED_SCHEMA rows (`excluded_keys`): ids deleted from the table
            that must stay out. Their records lose with `w_unit` EXCLUDED_UNIT.

    Returns:
        LOSERS_SCHEMA rows: the duplicate's unit and record, and the first record's unit
        and position (EXCLUDED_UNIT and -1 for an excluded id).

    >>> t = pa.table({"hi": pa.array([1, 1, 2], pa.uint64()), "lo": pa.array([5, 5, 6],
    ...   pa.uint64()), "unit": pa.array([1, 0, 0], pa.int32()), "shard": pa.array([0, 0,
    ...   0], pa.int32()), "ordinal": pa.array([0, 3, 4], pa.int64()), "position":
    ...   pa.array([1, 4, 5], pa.int64()), "sig": pa.array([0, 0, 0], pa.int32())})
    >>> find_duplicates([t], bad=frozenset()).to_pylist()
    [{'unit': 1, 'shard': 0, 'ordinal': 0, 'w_unit': 0, 'w_position': 4}]
    """
    rows = pa.concat_tables(tables) if tables else BUCKET_SCHEMA.empty_table()
    if rows.num_rows == 0:
        return LOSERS_SCHEMA.empty_table()
    if bad:
        rows = rows.filter(pa.array(~_ill_typed(rows, bad)))
    out = LOSERS_SCHEMA.empty_table()
    if excluded is not None and excluded.num_rows and rows.num_rows:
        key = pc.add(pc.multiply(pc.cast(rows.column("unit"), pa.int64()), 1 << 40),
                     rows.column("ordinal"))
        rows = rows.append_column("_key", key)
        gone = rows.join(excluded, keys=["hi", "lo"], join_type="left semi")
        out = pa.table({"unit": gone.column("unit"), "shard": gone.column("shard"),
                        "ordinal": gone.column("ordinal"),
                        "w_unit": pa.array(np.full(gone.num_rows, EXCLUDED_UNIT), pa.int32()),
                        "w_position": pa.array(np.full(gone.num_rows, -1), pa.int64())},
                       schema=LOSERS_SCHEMA)
        rows = rows.filter(pc.invert(pc.is_in(rows.column("_key"), gone.column("_key"))))
    col = {name: rows.column(name).to_numpy() for name in BUCKET_SCHEMA.names}
    order = np.lexsort((col["ordinal"], col["unit"], col["lo"], col["hi"]))
    hi, lo = col["hi"][order], col["lo"][order]
    same = np.zeros(len(order), bool)
    same[1:] = (hi[1:] == hi[:-1]) & (lo[1:] == lo[:-1])
    if not same.any():
        return out
    first = np.maximum.accumulate(np.where(same, 0, np.arange(len(order))))
    losers, winners = order[same], order[first[same]]
    return pa.concat_tables([out, pa.table(
        {"unit": col["unit"][losers], "shard": col["shard"][losers],
         "ordinal": col["ordinal"][losers],
         "w_unit": col["unit"][winners], "w_position": col["position"][winners]},
        schema=LOSERS_SCHEMA)])


def loser_counts(losers: pa.Table) -> pa.Table:
    """COUNTS_SCHEMA rows: each shard's duplicates and excluded records, one row per shard
    that has any (bounded by the shards, whatever the number of losers).

    >>> t = pa.table({"unit": pa.array([0, 0, 2], pa.int32()), "shard": pa.array([1, 1, 0],
    ...   pa.int32()), "w_unit": pa.array([3, EXCLUDED_UNIT, 0], pa.int32())})
    >>> sorted(loser_counts(t).to_pylist(), key=lambda r: r["unit"])[0]
    {'unit': 0, 'shard': 1, 'duplicates': 1, 'excluded': 1}
    """
    if not losers.num_rows:
        return COUNTS_SCHEMA.empty_table()
    gone = pc.cast(pc.equal(losers.column("w_unit"), EXCLUDED_UNIT), pa.int64())
    rows = pa.table({"unit": losers.column("unit"), "shard": losers.column("shard"),
                     "gone": gone})
    counts = rows.group_by(["unit", "shard"]).aggregate([("gone", "sum"), ("gone", "count")])
    excluded = counts.column("gone_sum")
    return pa.table({"unit": counts.column("unit"), "shard": counts.column("shard"),
                     "duplicates": pc.subtract(counts.column("gone_count"), excluded),
                     "excluded": excluded}, schema=COUNTS_SCHEMA)


def source_documents(tables: list[pa.Table], *, bad: frozenset[tuple[int, int, int]],
                     losers: pa.Table) -> pa.Table:
    """One bucket's documents, as the job will read them: its rows (scanned with
    `documents`) less the ill-typed records and the duplicates `find_duplicates` found.

    Returns SOURCE_DOCUMENTS_SCHEMA rows: id, `doc_hash`, unit and shard (its number
    in the unit).

    >>> t = pa.table({"unit": pa.array([0, 0, 1], pa.int32()), "shard": pa.array([0, 1,
    ...   0], pa.int32()), "ordinal": pa.array([0, 9, 0], pa.int64()), "sig": pa.array([0,
    ...   0, 1], pa.int32()), "doc_id": ["a", "b", "a"], "doc_hash": pa.array([b"1" * 16,
    ...   b"2" * 16, b"3" * 16], pa.binary(16))})
    >>> out = source_documents([t], bad=frozenset({(1, 0, 1)}), losers=pa.table({"unit":
    ...   pa.array([0], pa.int32()), "ordinal": pa.array([9], pa.int64())}))
    >>> out.column("doc_id").to_pylist(), out.schema == SOURCE_DOCUMENTS_SCHEMA
    (['a'], True)
    """
    if not tables:
        return SOURCE_DOCUMENTS_SCHEMA.empty_table()
    rows = pa.concat_tables(tables)
    drop = _ill_typed(rows, bad) if bad else np.zeros(rows.num_rows, bool)
    if losers.num_rows:
        unit = rows.column("unit").to_numpy().astype(np.int64)
        keys = (unit << 40) | rows.column("ordinal").to_numpy()
        drop |= np.isin(keys, (losers.column("unit").to_numpy().astype(np.int64) << 40)
                        | losers.column("ordinal").to_numpy())
    return rows.filter(pa.array(~drop)).select(SOURCE_DOCUMENTS_SCHEMA.names).cast(
        SOURCE_DOCUMENTS_SCHEMA)
