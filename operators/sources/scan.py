"""Pass 1 of planning a source (`operators.sources.plan`): once per unit, parse and
validate every record, cut the unit into shards, count rejects and metadata type
signatures per shard, and hash every valid id into one of `buckets` tables.

It exists so that the one pass that reads every record stands alone, with what it needs
and nothing the driver does: a scan holds one unit's bucket rows in memory (a row of
`BUCKET_SCHEMA` per valid record, with the id and `doc_hash` for a reindex) and returns
them with a bounded summary (`UnitScan`: per-shard counts and signatures, no record).
Listing a source into units (`units_of`) and the typed-source field check live here too,
as does `validate`, which every later read of a record shares.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from operators.sources import FORMATS
from operators.sources.base import (
    BYTES_READ,
    Listing,
    RawRecord,
    document_hash,
    id_and_text,
    list_source,
    metadata_names,
    record_kinds,
)
from operators.sources.partitions import file_kinds, records
from schemas.errors import SourceError
from schemas.records import CONTENT_HASH_BYTES, DOC_HASH_COLUMN
from schemas.source import ShardKind, Unit
from schemas.spec import SourceSpec

Signature = tuple[tuple[str, str], ...]
BUCKET_SCHEMA = pa.schema([("hi", pa.uint64()), ("lo", pa.uint64()), ("unit", pa.int32()),
                           ("shard", pa.int32()), ("ordinal", pa.int64()),
                           ("position", pa.int64()), ("sig", pa.int32())])
DOCUMENT_FIELDS = [pa.field("doc_id", pa.string()),
                   pa.field(DOC_HASH_COLUMN, pa.binary(CONTENT_HASH_BYTES))]
"""Bucket columns a reindex's plan adds: each document's id and hash."""


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
    text_chars: int = 0
    """Characters of the valid records' texts: what `quiver plan` scales its sampled
    tokens per character by, so one huge document counts at its size."""


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
    lines: int | None = None
    """Lines the unit spans (JSON Lines), so the plan can number a byte range's lines."""


def _returned(records: Generator[RawRecord, None, Any], out: list) -> Iterator[RawRecord]:
    """The records of `records`, keeping the generator's return value in `out`."""
    out.append((yield from records))


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
    returned: list = []
    for rec in _returned(records(fmt, unit, source), returned):
        if current is None or current.records >= per or rec.part != current.part:
            current = ShardScan(rec.ordinal, rec.position, rec.offset, rec.part)
            shards.append(current)
            sig_index: dict[Signature, int] = {}
        current.records += 1
        doc_id, text = validate(rec, source, unit.kind)
        if doc_id is None:
            current.rejects[text] += 1  # the reason
            continue
        current.text_chars += len(text)
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
    types = file_kinds(fmt, unit, source) if fmt.typed and shards else None
    return UnitScan(unit, shards, list(fields), types, BYTES_READ[0] - bytes_before,
                    returned[0] if isinstance(returned[0], int) else None), tables


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
