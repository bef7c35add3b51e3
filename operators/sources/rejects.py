"""Pass 3 of planning a source (`operators.sources.plan`): once per group of shards that
have any reject, read those shards again and build their reject rows (`REJECTS_SCHEMA`:
file, position, record id, reason, a preview of the raw record).

It exists because the reasons of rejected records are not kept by passes 1 and 2, which
return only counts: a task streams its shards' records (a compressed file once for all
its dirty shards) and holds only the reject rows it returns. `plan.first_documents`
recounts a cut plan's rejects with it, and the dry run samples them.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import replace

import pyarrow as pa

from operators.sources import FORMATS
from operators.sources.base import RawRecord, mismatch, raw_preview, record_kinds
from operators.sources.read import compressed, shard_records
from operators.sources.scan import validate
from operators.sources.skips import Skips
from schemas.records import REJECTS_SCHEMA
from schemas.source import Shard
from schemas.spec import SourceSpec


def shard_rejects(shard: Shard, source: SourceSpec, *, chosen: dict[str, str],
                  duplicates: dict[int, tuple[str, int]]) -> pa.Table:
    """Pass 3: the shard's reject rows (REJECTS_SCHEMA), in record order."""
    rows = [row for rec in shard_records(shard, source)
            if (row := _reject_row(rec, shard, source, chosen, duplicates)) is not None]
    return pa.Table.from_pylist(rows, schema=REJECTS_SCHEMA)


def _reject_row(rec: RawRecord, shard: Shard, source: SourceSpec, chosen: dict[str, str],
                duplicates: dict[int, tuple[str, int]]) -> dict | None:
    """The record's reject row, or None when it is a document the job keeps."""
    fmt = FORMATS[shard.kind]
    doc_id, reason = validate(rec, source, shard.kind)
    record_id = None
    if doc_id is not None:
        record_id = doc_id
        wrong = mismatch(record_kinds(rec, source, shard.kind), chosen)
        if wrong is not None:
            reason = wrong
        elif rec.ordinal in duplicates:
            path, position = duplicates[rec.ordinal]
            reason = (f"duplicate id {doc_id!r} (first at {fmt.position_kind} "
                      f"{position} of {path})")
        else:
            return None
    elif rec.value is not None:
        raw_id = rec.value.get(source.id_field or "path")
        record_id = None if raw_id is None else str(raw_id)
    return {"source": shard.path, "position": rec.position,
            "position_kind": fmt.position_kind, "record_id": record_id,
            "reason": reason, "raw": raw_preview(rec)}


def with_duplicates(shards: Sequence[Shard], skips: Skips | None
                    ) -> list[tuple[Shard, dict[int, tuple[str, int]]]]:
    """Each shard with its skip set attached and its duplicates (record -> the first
    record's file and position), from the plan's `skips`."""
    if skips is None:
        return [(shard, {}) for shard in shards]
    return skips.attach(shards)


def rejects_of(dirty: Sequence[Shard], source: SourceSpec, *, chosen: dict[str, str],
               skips: Skips | None) -> pa.Table:
    """Pass 3 over several dirty shards of one unit, in record order: a compressed file
    is read once from the first of them to the last, instead of once from its top for
    each shard; a seekable file seeks to each shard. A duplicate's first record comes
    from the plan's `skips`.
    """
    if not dirty:
        return REJECTS_SCHEMA.empty_table()
    pairs = with_duplicates(dirty, skips)
    if not compressed(dirty[0]) or len(pairs) == 1:
        tables = [shard_rejects(shard, source, chosen=chosen, duplicates=dups)
                  for shard, dups in pairs]
        return pa.concat_tables(tables)
    pairs = sorted(pairs, key=lambda item: item[0].start)
    first, last = pairs[0][0], pairs[-1][0]
    span = replace(first, records=last.start + last.records - first.start)
    starts = [shard.start for shard, _ in pairs]
    rows = []
    for rec in shard_records(span, source):
        at = bisect_right(starts, rec.ordinal) - 1
        shard, dups = pairs[at]
        if rec.ordinal >= shard.start + shard.records:
            continue  # a clean shard between two dirty ones
        row = _reject_row(rec, shard, source, chosen, dups)
        if row is not None:
            rows.append(row)
    return pa.Table.from_pylist(rows, schema=REJECTS_SCHEMA)


def reject_groups(dirty: Sequence[Shard], *, per_task: int = 64) -> list[list[Shard]]:
    """Dirty shards grouped into pass-3 tasks: a compressed file's all in one (it is
    read once), a seekable file's `per_task` at a time."""
    groups: list[list[Shard]] = []
    for shard in dirty:
        if groups and groups[-1][0].unit == shard.unit and (
                compressed(shard) or len(groups[-1]) < per_task):
            groups[-1].append(shard)
        else:
            groups.append([shard])
    return groups
