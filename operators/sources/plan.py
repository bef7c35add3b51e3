"""Plan a source in three passes that run anywhere (the job runs them as cluster tasks),
each in its own module:

1. `scan.scan_unit`, once per unit: parse and validate every record, cut the unit into
   shards, count rejects and metadata type signatures per shard, and hash every valid
   id into one of `buckets` tables (for a reindex, with the id and the document's
   `doc_hash`, so `dedup.source_documents` can compare the source with the table from
   them).
2. `dedup.find_duplicates`, once per bucket: every record whose id an earlier record (in
   file, position order) already has is a duplicate; records rejected for their types
   never count as the first. The driver gets each shard's count of them; the records
   themselves stay off the driver, cut by unit range (`skips`).
3. `rejects.rejects_of`, once per group of shards that have any reject: the reject rows,
   with file, position and reason.

This module is the driver's part: it merges only bounded summaries (`assemble_plan`):
per-shard counts, the type signatures seen, and the duplicates counted, into a `ReadPlan`;
`read.read_shard` then reads a shard's documents. There is one planner: `settle` is
the driver's part, whether the passes ran in this process (`plan_source`, for tests and
small sources) or as Ray tasks (`jobs._plan.plan_on_cluster`, every job).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import pyarrow as pa

from operators.sources import FORMATS
from operators.sources.base import KIND_TYPES, Listing, mismatch
from operators.sources.dedup import (
    COUNTS_SCHEMA,
    excluded_keys,
    find_duplicates,
    loser_counts,
)
from operators.sources.rejects import reject_groups, rejects_of, shard_rejects, with_duplicates
from operators.sources.scan import (
    UnitScan,
    check_metadata_fields,
    scan_unit,
    units_of,
)
from operators.sources.skips import (
    UNITS_SCHEMA,
    Skips,
    gather_skips,
    part_bounds,
    split_by_part,
)
from schemas.errors import SourceError
from schemas.records import REJECTS_SCHEMA, check_metadata_names
from schemas.source import Shard, ShardKind, Unit
from schemas.spec import SourceSpec


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
    dirty: list[Shard]
    """Shards with rejects (pass 3 reads them again for the reject rows)."""
    rejects: pa.Table | None = None
    """The reject rows, when the plan was made in this process (`plan_source`)."""
    excluded: int = 0
    """Valid records left out because the table's exclusion list holds their id."""
    bytes_read: int = 0
    """Bytes of line-format source files pass 1 read (decompressed)."""
    text_chars: int = 0
    """Characters of the valid records' texts (duplicates and excluded ids included)."""
    skips: Skips | None = None
    """Where the records left out by id are (None: there are none); tasks attach them to
    the shards they read (`Skips.attach`)."""

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
    >>> reason_key("truncated compressed file: nothing after line 9 can be read (...)")
    'truncated compressed file'
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


def line_bases(scans: list[UnitScan]) -> dict[int, int]:
    """For each byte-range unit of a JSON Lines file, the lines of the file before it:
    pass 1 numbers a range's lines from 1, and adding this makes them the file's.

    >>> from schemas.source import SourceFile, Unit
    >>> f = SourceFile("a.jsonl", 30, None)
    >>> scans = [UnitScan(Unit(i, "jsonl", f, start=10 * i, stop=10 * i + 10), [], [],
    ...                   lines=n) for i, n in enumerate([3, 0, 4])]
    >>> line_bases(scans)
    {0: 0, 1: 3, 2: 3}
    """
    bases: dict[int, int] = {}
    seen: dict[str, int] = {}
    for scan in sorted(scans, key=lambda s: s.unit.index):
        unit = scan.unit
        if unit.kind == "jsonl" and unit.stop is not None:
            bases[unit.index] = seen.get(unit.file.path, 0)
            seen[unit.file.path] = bases[unit.index] + (scan.lines or 0)
    return bases


def units_table(scans: list[UnitScan]) -> pa.Table:
    """UNITS_SCHEMA: each unit's file and the lines before it there, which name a
    duplicate's first record (`skips.gather_skips`). One row per unit, never per record."""
    lines = line_bases(scans)
    return pa.table({"w_unit": pa.array([s.unit.index for s in scans], pa.int32()),
                     "first_path": [s.unit.file.path for s in scans],
                     "base": pa.array([lines.get(s.unit.index, 0) for s in scans], pa.int64())},
                    schema=UNITS_SCHEMA)


def assemble_plan(listing: Listing, scans: list[UnitScan], counts: list[pa.Table], *,
                  chosen: dict[str, str], metadata: pa.Schema,
                  bad: dict[tuple[int, int, int], tuple[str, int]],
                  skips: Skips | None) -> ReadPlan:
    """Merge the passes' summaries into shards that know how many records to leave out
    (`counts`: pass 2's COUNTS_SCHEMA rows; the records themselves stay in `skips`)."""
    try:
        check_metadata_names(metadata)
    except ValueError as err:
        raise SourceError(str(err)) from None
    lost: dict[tuple[int, int], tuple[int, int]] = {}  # (unit, shard) -> (dups, excluded)
    for table in counts:
        for unit, number, dups, gone in zip(*(table.column(n).to_pylist()
                                              for n in COUNTS_SCHEMA.names), strict=True):
            before = lost.get((unit, number), (0, 0))
            lost[(unit, number)] = (before[0] + dups, before[1] + gone)
    lines = line_bases(scans)
    bad_here: dict[tuple[int, int], list[tuple[str, int]]] = {}
    for (u, i, _), found in bad.items():
        bad_here.setdefault((u, i), []).append(found)
    reasons: Counter[str] = Counter()
    shards: list[Shard] = []
    dirty: list[Shard] = []
    records = rejected = excluded = 0
    for scan in scans:
        for s, info in enumerate(scan.shards):
            dups, gone = lost.get((scan.unit.index, s), (0, 0))
            typed = bad_here.get((scan.unit.index, s), [])
            typed_out = sum(n for _, n in typed)
            out = sum(info.rejects.values()) + typed_out + dups
            shard = Shard(shard_id_for(scan.unit, info.start), scan.unit.kind, scan.unit,
                          info.start, info.records,
                          info.first_position + lines.get(scan.unit.index, 0), info.offset,
                          info.part, documents=info.records - out - gone,
                          left_out=dups + gone)
            excluded += gone
            for reason, n in typed:
                reasons[reason_key(reason)] += n
            for reason, n in info.rejects.items():
                reasons[reason_key(reason)] += n
            if dups:
                reasons["duplicate id"] += dups
            records += info.records
            rejected += out
            shards.append(shard)
            if out:
                dirty.append(shard)
    return ReadPlan(listing.kind, shards, metadata, chosen, records, rejected, reasons,
                    listing_fingerprint(listing), len(listing.files), listing.skipped, dirty,
                    excluded=excluded, bytes_read=sum(s.bytes_read for s in scans),
                    text_chars=sum(i.text_chars for s in scans for i in s.shards),
                    skips=skips if any(s.left_out for s in shards) else None)


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
    if kept == plan.shards:  # nothing dropped and no shard cut
        return plan
    ids = {s.shard_id for s in kept}
    dirty = [s for s in plan.dirty if s.shard_id in ids]
    reasons: Counter[str] = Counter()
    for shard, duplicates in with_duplicates(dirty, plan.skips):
        rows = shard_rejects(shard, source, chosen=plan.chosen, duplicates=duplicates)
        reasons.update(reason_key(r) for r in rows.column("reason").to_pylist())
    records = sum(s.records for s in kept)
    rejected = sum(reasons.values())
    return ReadPlan(plan.kind, kept, plan.metadata, plan.chosen, records, rejected, reasons,
                    plan.fingerprint, plan.files, plan.skipped, dirty,
                    excluded=records - rejected - documents, bytes_read=plan.bytes_read,
                    text_chars=plan.text_chars * documents // max(1, plan.documents),
                    skips=plan.skips)


def settle(listing: Listing, scans: list[UnitScan], source: SourceSpec,
           dedup: Callable[[frozenset, pa.Table], tuple[list[pa.Table], Skips]]) -> ReadPlan:
    """The driver's part of planning, once pass 1 has scanned every unit: check the
    metadata fields, choose each field's kind, find the records of the wrong kind, run
    pass 2 (`dedup(bad, units)`: each bucket's loser counts, and where the losers are
    kept, wherever it runs), merge the summaries into the plan, and cut it to
    `source.limit`. Both planners, this process's (`plan_source`) and the cluster's
    (`jobs._plan.plan_on_cluster`), end here."""
    check_metadata_fields(scans, source)
    chosen, metadata = choose_kinds(scans, FORMATS[listing.kind].typed)
    bad = bad_signatures(scans, chosen)
    counts, skips = dedup(frozenset(bad), units_table(scans))
    plan = assemble_plan(listing, scans, counts, chosen=chosen, metadata=metadata, bad=bad,
                         skips=skips)
    return plan if source.limit is None else first_documents(plan, source.limit, source)


def plan_source(source: SourceSpec, *, buckets: int = 4,
                excluded: Sequence[str] = ()) -> ReadPlan:
    """Plan a source with all three passes in this process (tests, small sources), less
    the `excluded` document ids.

    Raises:
        SourceError: when the source is missing or unreadable as a whole.
    """
    listing, units = units_of(source)
    results = [scan_unit(u, source, buckets=buckets) for u in units]
    keys = excluded_keys(excluded) if excluded else None
    bounds = part_bounds(len(units))

    def dedup(bad: frozenset, units: pa.Table) -> tuple[list[pa.Table], Skips]:
        losers = [find_duplicates([r[1][b] for r in results], bad=bad, excluded=keys)
                  for b in range(buckets)]
        parts = zip(*(split_by_part(t, bounds) for t in losers), strict=True)
        return ([loser_counts(t) for t in losers],
                Skips(tuple(bounds), tuple(gather_skips(units, *p) for p in parts)))

    plan = settle(listing, [r[0] for r in results], source, dedup)
    tables = [rejects_of(group, source, chosen=plan.chosen, skips=plan.skips)
              for group in reject_groups(plan.dirty)]
    plan.rejects = pa.concat_tables(tables) if tables else REJECTS_SCHEMA.empty_table()
    return plan
