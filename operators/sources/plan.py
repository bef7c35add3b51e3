"""Plan a source in three passes that run anywhere (the job runs them as cluster tasks):

1. `scan_unit`, once per unit: parse and validate every record, cut the unit into
   shards, count rejects and metadata type signatures per shard, and hash every valid
   id into one of `buckets` tables (for a reindex, with the id and the document's
   `doc_hash`, so `source_documents` can compare the source with the table from them).
2. `find_duplicates`, once per bucket: every record whose id an earlier record (in file,
   position order) already has is a duplicate; records rejected for their types never
   count as the first.
3. `shard_rejects`, once per shard that has any reject: the reject rows, with file,
   position and reason.

The driver only merges bounded summaries (`assemble_plan`): per-shard counts, the type
signatures seen, and the duplicates found; `read_shard` then reads a shard's documents.
`plan_source` runs all three passes in this process, for tests and small sources.
"""

from __future__ import annotations

import hashlib
import re
from bisect import bisect_right
from collections import Counter
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators.sources import FORMATS
from operators.sources.base import (
    BYTES_READ,
    KIND_TYPES,
    Listing,
    RawRecord,
    coerce_json,
    compression_of,
    document_hash,
    id_and_text,
    list_source,
    metadata_names,
    mismatch,
    raw_preview,
    record_kinds,
)
from schemas.errors import SourceChangedError, SourceError
from schemas.records import (
    CONTENT_HASH_BYTES,
    DOC_HASH_COLUMN,
    REJECTS_SCHEMA,
    check_metadata_names,
)
from schemas.source import Shard, ShardKind, Unit
from schemas.spec import SourceSpec

Signature = tuple[tuple[str, str], ...]
BUCKET_SCHEMA = pa.schema([("hi", pa.uint64()), ("lo", pa.uint64()), ("unit", pa.int32()),
                           ("shard", pa.int32()), ("ordinal", pa.int64()),
                           ("position", pa.int64()), ("sig", pa.int32())])
DOCUMENT_FIELDS = [pa.field("doc_id", pa.string()),
                   pa.field(DOC_HASH_COLUMN, pa.binary(CONTENT_HASH_BYTES))]
"""Bucket columns a reindex's plan adds: each document's id and hash."""
SOURCE_DOCUMENTS_SCHEMA = pa.schema([*DOCUMENT_FIELDS, ("unit", pa.int32()),
                                     ("shard", pa.int32())])
LOSERS_SCHEMA = pa.schema([("unit", pa.int32()), ("ordinal", pa.int64()),
                           ("w_unit", pa.int32()), ("w_position", pa.int64())])


@dataclass
class ShardScan:
    """What pass 1 learned about one shard: where it starts and what its records are."""

    start: int
    first_position: int
    offset: int | None
    part: int
    records: int = 0
    rejects: Counter[str] = field(default_factory=Counter)
    """Records that are not valid documents, by reason."""
    signatures: dict[Signature, int] = field(default_factory=dict)
    """Valid records per metadata type signature; a signature's index in this dict is
    the `sig` of its bucket rows."""


@dataclass
class UnitScan:
    """Pass 1's bounded summary of one unit."""

    unit: Unit
    shards: list[ShardScan]
    fields: list[str]
    """Metadata fields in order of first appearance (untyped formats)."""
    file_kinds: dict[str, pa.DataType] | None = None
    """Typed formats: the file's metadata types."""
    bytes_read: int = 0
    """Bytes of line-format files read to scan the unit (`base.BYTES_READ`)."""


def id_key(doc_id: str) -> tuple[int, int]:
    """A 128-bit hash of an id as two words: equal ids give equal keys, and two different
    ids collide with a chance of about 1 in 10^20 at 100M ids."""
    digest = hashlib.blake2b(doc_id.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")


def validate(rec: RawRecord, source: SourceSpec, kind: ShardKind) -> tuple[str | None, str]:
    """(None, reason) for a record that is not a document, else (None-free id, text)."""
    if rec.value is None:
        return None, rec.error or "unreadable record"
    got = id_and_text(rec.value, source, kind)
    return (None, got) if isinstance(got, str) else got


def bucket_of(lo: int, buckets: int) -> int:
    """The bucket of an id, from the low word of its `id_key`."""
    return lo % buckets


def scan_unit(unit: Unit, source: SourceSpec, *, buckets: int, documents: bool = False
              ) -> tuple[UnitScan, list[pa.Table]]:
    """Pass 1 over one unit: shards, reject counts, type signatures, hashed ids.

    Returns the summary and `buckets` tables of BUCKET_SCHEMA rows, one per valid record;
    with `documents`, each row also holds the id and the `document_hash`.
    """
    fmt = FORMATS[unit.kind]
    per = source.records_per_shard
    shards: list[ShardScan] = []
    fields: dict[str, None] = {}
    schema = pa.schema([*BUCKET_SCHEMA, *(DOCUMENT_FIELDS if documents else [])])
    cols: list[list[list[Any]]] = [[[] for _ in schema] for _ in range(buckets)]
    current: ShardScan | None = None
    bytes_before = BYTES_READ[0]
    for rec in fmt.iter_records(unit, source):
        if current is None or current.records >= per or rec.part != current.part:
            current = ShardScan(rec.ordinal, rec.position, rec.offset, rec.part)
            shards.append(current)
            sig_index: dict[Signature, int] = {}
        current.records += 1
        doc_id, text = validate(rec, source, unit.kind)
        if doc_id is None:
            current.rejects[text] += 1  # the reason
            continue
        kinds = record_kinds(rec, source, unit.kind)
        if not fmt.typed:
            fields.update(dict.fromkeys(metadata_names(rec.value or {}, source, unit.kind)))
        sig = sig_index.setdefault(kinds, len(sig_index))  # its place in `signatures`
        current.signatures[kinds] = current.signatures.get(kinds, 0) + 1
        hi, lo = id_key(doc_id)
        values: tuple = (hi, lo, unit.index, len(shards) - 1, rec.ordinal, rec.position, sig)
        if documents:
            assert rec.value is not None
            values += (doc_id, document_hash(doc_id, text, rec.value, source, unit.kind))
        for column, value in zip(cols[bucket_of(lo, buckets)], values, strict=True):
            column.append(value)
    tables = [pa.table([pa.array(c, f.type) for c, f in zip(cols[b], schema, strict=True)],
                       schema=schema) for b in range(buckets)]
    file_kinds = fmt.file_kinds(unit, source) if fmt.typed and shards else None
    return UnitScan(unit, shards, list(fields), file_kinds,
                    BYTES_READ[0] - bytes_before), tables


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
    [{'unit': 1, 'ordinal': 0, 'w_unit': 0, 'w_position': 4}]
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
        out = pa.table({"unit": gone.column("unit"), "ordinal": gone.column("ordinal"),
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
        {"unit": col["unit"][losers], "ordinal": col["ordinal"][losers],
         "w_unit": col["unit"][winners], "w_position": col["position"][winners]},
        schema=LOSERS_SCHEMA)])


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


# ---------------------------------------------------------------- the plan


@dataclass
class ReadPlan:
    """Everything the driver knows about a source: bounded summaries, no records."""

    kind: ShardKind
    shards: list[Shard]
    metadata: pa.Schema
    chosen: dict[str, str]
    """Metadata field -> the kind (untyped formats) or Arrow type name (typed) it has."""
    records: int
    rejected: int
    reject_reasons: Counter[str]
    fingerprint: str
    """Changes whenever any source file's size or modification time changes."""
    files: int
    skipped: dict[str, int]
    """Files not read, by suffix."""
    dirty: list[tuple[Shard, dict[int, tuple[str, int]]]]
    """Shards with rejects, each with its duplicates: record -> (first file, position)."""
    rejects: pa.Table | None = None
    """The reject rows, when the plan was made in this process (`plan_source`)."""
    excluded: int = 0
    """Valid records left out because the table's exclusion list holds their id."""
    bytes_read: int = 0
    """Bytes of line-format source files pass 1 read (decompressed)."""

    @property
    def documents(self) -> int:
        return self.records - self.rejected - self.excluded


def reason_key(reason: str) -> str:
    """The kind of a reject reason, without the ids, files and bytes it names.

    >>> reason_key("duplicate id 'a' (first at line 1 of x.jsonl)")
    'duplicate id'
    >>> reason_key("invalid JSON: Expecting value"), reason_key("a.txt: not valid UTF-8")
    ('invalid JSON', 'not valid UTF-8')
    >>> reason_key("wrong type for field 'n': expected int64, got str")
    "wrong type for field 'n'"
    """
    reason = re.sub(r" \(.*$", "", reason)
    if reason.startswith("duplicate id"):
        return "duplicate id"
    if ": not valid UTF-8" in reason:
        return "not valid UTF-8"
    return reason.split(": ")[0]


def shard_id_for(unit: Unit, start: int) -> str:
    """Stable across runs and across files being added: a hash of the file, the record."""
    where = unit.file.path + (f"/{unit.files[0].path}" if unit.files else "")
    digest = hashlib.sha1(f"{where}@{unit.start}".encode()).hexdigest()[:12]
    return f"{digest}:{start}"


def choose_kinds(scans: list[UnitScan], typed: bool) -> tuple[dict[str, str], pa.Schema]:
    """Metadata types from every record: for untyped formats ints widen to floats and
    otherwise the majority wins; typed formats take the first file's types."""
    if typed:
        first = next((s.file_kinds for s in scans if s.file_kinds is not None), {})
        return ({n: str(t) for n, t in first.items()},
                pa.schema([pa.field(n, t) for n, t in first.items()]))
    counts: dict[str, Counter[str]] = {}
    for scan in scans:
        for name in scan.fields:
            counts.setdefault(name, Counter())
        for shard in scan.shards:
            for sig, n in shard.signatures.items():
                for name, kind in sig:
                    counts.setdefault(name, Counter())[kind] += n
    chosen = {name: _majority(c) for name, c in counts.items()}
    return chosen, pa.schema([pa.field(n, KIND_TYPES[k]) for n, k in chosen.items()])


def _majority(counts: Counter[str]) -> str:
    if not counts:
        return "str"
    if set(counts) <= {"int", "float"}:
        return "float" if "float" in counts else "int"
    return counts.most_common(1)[0][0]


def bad_signatures(scans: list[UnitScan], chosen: dict[str, str]
                   ) -> dict[tuple[int, int, int], tuple[str, int]]:
    """(unit, shard, sig) -> (reason, records) for signatures that disagree with `chosen`."""
    bad = {}
    for scan in scans:
        for s, shard in enumerate(scan.shards):
            for g, (sig, n) in enumerate(shard.signatures.items()):
                reason = mismatch(sig, chosen)
                if reason is not None:
                    bad[(scan.unit.index, s, g)] = (reason, n)
    return bad


def assemble_plan(listing: Listing, scans: list[UnitScan], losers: list[pa.Table], *,
                  chosen: dict[str, str], metadata: pa.Schema,
                  bad: dict[tuple[int, int, int], tuple[str, int]]) -> ReadPlan:
    """Merge the passes' summaries into shards that know which records to skip."""
    try:
        check_metadata_names(metadata)
    except ValueError as err:
        raise SourceError(str(err)) from None
    by_unit: dict[int, list[tuple[int, int, int]]] = {}
    excluded_by_unit: dict[int, list[int]] = {}
    for table in losers:
        for unit, ordinal, w_unit, w_pos in zip(*(table.column(n).to_pylist()
                                                  for n in LOSERS_SCHEMA.names), strict=True):
            if w_unit == EXCLUDED_UNIT:
                excluded_by_unit.setdefault(unit, []).append(ordinal)
            else:
                by_unit.setdefault(unit, []).append((ordinal, w_unit, w_pos))
    paths = {s.unit.index: s.unit.file.path for s in scans}
    bad_here: dict[tuple[int, int], list[tuple[str, int]]] = {}
    for (u, i, _), found in bad.items():
        bad_here.setdefault((u, i), []).append(found)
    reasons: Counter[str] = Counter()
    shards: list[Shard] = []
    dirty: list[tuple[Shard, dict[int, tuple[str, int]]]] = []
    records = rejected = excluded = 0
    for scan in scans:
        starts = [s.start for s in scan.shards]
        dups: list[dict[int, tuple[str, int]]] = [{} for _ in scan.shards]
        for ordinal, w_unit, w_pos in by_unit.get(scan.unit.index, []):
            dups[bisect_right(starts, ordinal) - 1][ordinal] = (paths[w_unit], w_pos)
        gone: list[set[int]] = [set() for _ in scan.shards]
        for ordinal in excluded_by_unit.get(scan.unit.index, []):
            gone[bisect_right(starts, ordinal) - 1].add(ordinal)
        for s, info in enumerate(scan.shards):
            typed = bad_here.get((scan.unit.index, s), [])
            typed_out = sum(n for _, n in typed)
            out = sum(info.rejects.values()) + typed_out + len(dups[s])
            shard = Shard(shard_id_for(scan.unit, info.start), scan.unit.kind, scan.unit,
                          info.start, info.records, info.first_position, info.offset,
                          info.part, frozenset(dups[s]) | frozenset(gone[s]),
                          info.records - out - len(gone[s]))
            excluded += len(gone[s])
            for reason, n in typed:
                reasons[reason_key(reason)] += n
            for reason, n in info.rejects.items():
                reasons[reason_key(reason)] += n
            if dups[s]:
                reasons["duplicate id"] += len(dups[s])
            records += info.records
            rejected += out
            shards.append(shard)
            if out:
                dirty.append((shard, dups[s]))
    return ReadPlan(listing.kind, shards, metadata, chosen, records, rejected, reasons,
                    listing_fingerprint(listing), len(listing.files), listing.skipped, dirty,
                    excluded=excluded, bytes_read=sum(s.bytes_read for s in scans))


def listing_fingerprint(listing: Listing) -> str:
    """Changes whenever any source file is added, removed, or changes size or
    modification time: the listing alone, no byte of the files read."""
    return hashlib.sha256("|".join(
        f"{f.path}:{f.size}:{f.mtime_ns}" for f in listing.files).encode()).hexdigest()[:16]


def first_documents(plan: ReadPlan, n: int, source: SourceSpec) -> ReadPlan:
    """The plan cut to its first shards holding `n` documents (`source.limit`): the
    shards after them are dropped, the last one is cut to the records needed (when all
    its records are documents; else it is kept whole, a few documents over), and the
    kept shards' rejects are counted again (they are few: the cut is for trying a spec
    on a few documents)."""
    kept: list[Shard] = []
    documents = 0
    for shard in plan.shards:
        if documents >= n:
            break
        need = n - documents
        if (shard.documents or 0) > need and shard.documents == shard.records:
            # every record of the shard is a document: its first `need` records are them
            shard = replace(shard, records=need, documents=need)
        kept.append(shard)
        documents += shard.documents or 0
    if len(kept) == len(plan.shards):
        return plan
    ids = {s.shard_id for s in kept}
    dirty = [(s, d) for s, d in plan.dirty if s.shard_id in ids]
    reasons: Counter[str] = Counter()
    for shard, duplicates in dirty:
        rows = shard_rejects(shard, source, chosen=plan.chosen, duplicates=duplicates)
        reasons.update(reason_key(r) for r in rows.column("reason").to_pylist())
    records = sum(s.records for s in kept)
    rejected = sum(reasons.values())
    return ReadPlan(plan.kind, kept, plan.metadata, plan.chosen, records, rejected, reasons,
                    plan.fingerprint, plan.files, plan.skipped, dirty,
                    excluded=records - rejected - documents, bytes_read=plan.bytes_read)


def units_of(source: SourceSpec, listing: Listing | None = None
             ) -> tuple[Listing, list[Unit]]:
    """List the source (file metadata only; unless `listing` is given) and cut it into
    validation units."""
    listing = listing or list_source(source, FORMATS)
    units = FORMATS[listing.kind].units(listing.files, source, root=listing.root)
    return listing, units


def check_metadata_fields(scans: list[UnitScan], source: SourceSpec) -> None:
    """Typed sources must have the metadata fields the spec names."""
    if source.metadata_fields is None:
        return
    first = next((s.file_kinds for s in scans if s.file_kinds is not None), None)
    if first is None:
        return
    missing = [n for n in source.metadata_fields if n not in first]
    if missing:
        raise SourceError(f"source.metadata_fields: {missing!r} not in {source.uri}")


# ---------------------------------------------------------------- reading a shard


def _shard_records(shard: Shard, source: SourceSpec) -> Iterator[RawRecord]:
    end = shard.start + shard.records
    for rec in FORMATS[shard.kind].iter_records(
            shard.unit, source, start=shard.start, offset=shard.offset,
            position=shard.first_position, part=shard.part):
        if rec.ordinal >= end:
            return
        yield rec


def shard_rejects(shard: Shard, source: SourceSpec, *, chosen: dict[str, str],
                  duplicates: dict[int, tuple[str, int]]) -> pa.Table:
    """Pass 3: the shard's reject rows (REJECTS_SCHEMA), in record order."""
    rows = [row for rec in _shard_records(shard, source)
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


def rejects_of(dirty: Sequence[tuple[Shard, dict[int, tuple[str, int]]]],
               source: SourceSpec, *, chosen: dict[str, str]) -> pa.Table:
    """Pass 3 over several dirty shards (each with its duplicates) of one unit, in record
    order: a compressed file is read once from the first of them to the last, instead
    of once from its top for each shard; a seekable file seeks to each shard.
    """
    if not dirty:
        return REJECTS_SCHEMA.empty_table()
    if not _compressed(dirty[0][0]) or len(dirty) == 1:
        tables = [shard_rejects(shard, source, chosen=chosen, duplicates=dups)
                  for shard, dups in dirty]
        return pa.concat_tables(tables)
    dirty = sorted(dirty, key=lambda item: item[0].start)
    first, last = dirty[0][0], dirty[-1][0]
    span = replace(first, records=last.start + last.records - first.start)
    starts = [shard.start for shard, _ in dirty]
    rows = []
    for rec in _shard_records(span, source):
        at = bisect_right(starts, rec.ordinal) - 1
        shard, dups = dirty[at]
        if rec.ordinal >= shard.start + shard.records:
            continue  # a clean shard between two dirty ones
        row = _reject_row(rec, shard, source, chosen, dups)
        if row is not None:
            rows.append(row)
    return pa.Table.from_pylist(rows, schema=REJECTS_SCHEMA)


def reject_groups(dirty: Sequence[tuple[Shard, dict[int, tuple[str, int]]]], *,
                  per_task: int = 64) -> list[list[tuple[Shard, dict[int, tuple[str, int]]]]]:
    """Dirty shards grouped into pass-3 tasks: a compressed file's all in one (it is
    read once), a seekable file's `per_task` at a time."""
    groups: list[list] = []
    for item in dirty:
        shard = item[0]
        if groups and groups[-1][0][0].unit == shard.unit and (
                _compressed(shard) or len(groups[-1]) < per_task):
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


class _ShardDocuments:
    """The columns of one shard's valid documents, filled record by record."""

    def __init__(self, shard: Shard, metadata: pa.Schema, chosen: dict[str, str],
                 only: Collection[str] | None = None) -> None:
        self.shard, self._metadata, self._chosen, self._only = shard, metadata, chosen, only
        self._found = 0
        self._as_json = {n for n, k in chosen.items() if k == "json"}
        self._as_float = {n for n, k in chosen.items() if k == "float"}
        self._columns: dict[str, list[Any]] = {"doc_id": [], "text": [], DOC_HASH_COLUMN: [],
                                               **{n: [] for n in metadata.names}}

    def add(self, rec: RawRecord, source: SourceSpec) -> None:
        """Keep the record if the plan did: valid, well typed and not a duplicate."""
        shard = self.shard
        doc_id, text = validate(rec, source, shard.kind)
        if doc_id is None or rec.ordinal in shard.skip \
                or mismatch(record_kinds(rec, source, shard.kind), self._chosen) is not None:
            return
        self._found += 1
        if self._only is not None and doc_id not in self._only:
            return  # counted (the plan's count still checks the file), not kept
        assert rec.value is not None
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

    def table(self) -> pa.Table:
        """The documents, after checking their number against the plan's."""
        shard, found = self.shard, self._found
        if shard.documents is not None and found != shard.documents:
            raise SourceChangedError(f"{shard.path}: {found} valid records in shard "
                                     f"{shard.shard_id}, but {shard.documents} when the job "
                                     "was planned; the source changed. Run the job again.")
        schema = pa.schema([pa.field("doc_id", pa.string()),
                            pa.field("text", pa.large_string()),
                            pa.field(DOC_HASH_COLUMN, pa.binary(CONTENT_HASH_BYTES)),
                            *self._metadata])
        return pa.table(self._columns, schema=schema)


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
                _compressed(shard) or records + shard.records <= GROUP_RECORDS):
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


def _splittable(group: list[Shard]) -> int:
    """A group's length where splitting it is free (a seekable file), else 0."""
    return 0 if _compressed(group[0]) else len(group)


def _compressed(shard: Shard) -> bool:
    return shard.kind in ("jsonl", "csv") and compression_of(shard.path) is not None


def read_shards(shards: Sequence[Shard], *, source: SourceSpec, metadata: pa.Schema,
                chosen: dict[str, str], only: Mapping[str, Collection[str]] | None = None
                ) -> Iterator[tuple[Shard, pa.Table]]:
    """Each shard with its documents (`doc_id`, `text`, `doc_hash`, typed metadata), in
    one pass; with `only`, just the documents it names for each shard id (a reindex's
    changed ones), the others validated and counted but not built.

    The shards follow each other in one unit (`follows`), so the file is opened once at
    the first shard and read straight through: a compressed file is decompressed once,
    not once per shard up to that shard's offset. Each shard is yielded as soon as its
    last record is read. Rejected records (invalid, ill-typed, and the duplicates in
    `shard.skip`) are dropped; pass 3 has written them to the rejects.
    """
    if not shards:
        return
    for before, shard in zip(shards, shards[1:], strict=False):
        if not follows(before, shard):
            raise ValueError(f"shard {shard.shard_id} does not follow {before.shard_id}")
    first, last = shards[0], shards[-1]
    end = last.start + last.records
    todo = iter(shards)

    def documents(shard: Shard) -> _ShardDocuments:
        return _ShardDocuments(shard, metadata, chosen,
                               None if only is None else only.get(shard.shard_id, ()))

    current = documents(next(todo))
    for rec in FORMATS[first.kind].iter_records(
            first.unit, source, start=first.start, offset=first.offset,
            position=first.first_position, part=first.part):
        if rec.ordinal >= end:
            break
        while rec.ordinal >= current.shard.start + current.shard.records:
            yield current.shard, current.table()
            current = documents(next(todo))
        current.add(rec, source)
    yield current.shard, current.table()
    for shard in todo:  # records the file no longer has: the count check names it
        yield shard, documents(shard).table()


def read_shard(shard: Shard, *, source: SourceSpec, metadata: pa.Schema,
               chosen: dict[str, str]) -> pa.Table:
    """One shard's documents (see `read_shards`)."""
    return next(read_shards([shard], source=source, metadata=metadata, chosen=chosen))[1]


# ---------------------------------------------------------------- in this process


def plan_source(source: SourceSpec, *, buckets: int = 4,
                excluded: Sequence[str] = ()) -> ReadPlan:
    """Plan a source with all three passes in this process (tests, small sources), less
    the `excluded` document ids.

    Raises:
        SourceError: when the source is missing or unreadable as a whole.
    """
    listing, units = units_of(source)
    results = [scan_unit(u, source, buckets=buckets) for u in units]
    scans = [r[0] for r in results]
    check_metadata_fields(scans, source)
    chosen, metadata = choose_kinds(scans, FORMATS[listing.kind].typed)
    bad = bad_signatures(scans, chosen)
    keys = excluded_keys(excluded) if excluded else None
    losers = [find_duplicates([r[1][b] for r in results], bad=frozenset(bad), excluded=keys)
              for b in range(buckets)]
    plan = assemble_plan(listing, scans, losers, chosen=chosen, metadata=metadata, bad=bad)
    tables = [rejects_of(group, source, chosen=chosen) for group in reject_groups(plan.dirty)]
    plan.rejects = pa.concat_tables(tables) if tables else REJECTS_SCHEMA.empty_table()
    return plan
