"""Plan a source on the cluster: every record is parsed, validated and deduplicated by
Ray tasks, and the driver merges only bounded summaries (`operators.sources.plan`)."""

from __future__ import annotations

import sys
import time
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass

import lance
import pyarrow as pa
from pyarrow.fs import FileType

from operators.filesystems import resolve
from operators.sources.base import Listing
from operators.sources.dedup import find_duplicates, loser_counts, source_documents
from operators.sources.plan import ReadPlan, settle
from operators.sources.rejects import reject_groups, rejects_of
from operators.sources.scan import scan_unit, units_of
from operators.sources.skips import (
    Skips,
    gather_skips,
    part_bounds,
    read_part,
    split_by_part,
    write_part,
)
from operators.write import latest_version, write_fragments
from schemas.records import REJECTS_SCHEMA
from schemas.spec import SourceSpec

MAX_BUCKETS = 64


def progress(message: str) -> None:
    """A progress line for people, on stderr (stdout is for `--json`)."""
    print(f"[quiver] {message}", file=sys.stderr, flush=True)


def _scan(unit, source: SourceSpec, buckets: int, documents: bool):
    scan, tables = scan_unit(unit, source, buckets=buckets, documents=documents)
    return (scan, *tables)


@dataclass(frozen=True)
class ObjectStoreSkips(Skips):
    """`Skips` whose parts are Ray object refs (a plan with no folder to keep them in:
    `quiver plan`)."""

    def fetch(self, handle) -> pa.Table:
        import ray

        return ray.get(handle)


@dataclass(frozen=True)
class _Parts:
    """Where pass 2 puts its losers: cut at `bounds` (`operators.sources.skips`), and kept
    in files under `keep`, or, without one, returned to the object store."""

    bounds: list[int]
    keep: str | None
    storage_options: dict[str, str]

    def out(self, losers: pa.Table, bucket: int) -> list[pa.Table | str | None]:
        """One bucket's losers, one entry per part. With `keep`, a part is written to a
        file and only its name is returned (None for an empty one): Ray keeps a task's
        returns under 100 KiB in its caller's memory, so returning a job's many small
        parts would hold every loser on the driver until the parts are gathered."""
        parts = split_by_part(losers, self.bounds)
        if self.keep is None:
            return parts
        return [write_part(t, f"{self.keep}/bucket-{bucket:03d}-part-{p:05d}.arrow",
                           self.storage_options) if t.num_rows else None
                for p, t in enumerate(parts)]


def _dedup(bucket: int, parts: _Parts, documents: bool, bad: frozenset,
           excluded: pa.Table | None, *tables: pa.Table) -> tuple:
    """Pass 2 over one bucket: its loser counts, with `documents` the bucket's documents
    (a reindex's diff), then its losers, one entry per part (`_Parts.out`)."""
    rows = [pa.concat_tables(tables)] if tables else []  # concatenated once, for both
    losers = find_duplicates(rows, bad=bad, excluded=excluded)
    head = (loser_counts(losers),)
    if documents:
        head += (source_documents(rows, bad=bad, losers=losers),)
    return (*head, *parts.out(losers, bucket))


def _gather(units: pa.Table, uri: str | None, storage_options: dict[str, str],
            *found: pa.Table | str | None) -> pa.Table | str:
    """One part of the left-out records, from every bucket that has any (tables, or the
    files `_Parts.out` wrote, removed once gathered); kept in one file at `uri` (a resume
    reads it back) or returned to the object store."""
    files = [f for f in found if isinstance(f, str)]
    tables = [f for f in found if isinstance(f, pa.Table)]
    try:
        tables += [read_part(f, storage_options) for f in files]
    except OSError:  # a retry of a task that was gathering when its worker died
        fs, path = resolve(uri or "", storage_options)
        if uri is not None and fs.get_file_info(path).type == FileType.File:
            return uri  # written before any bucket file was removed
        raise
    table = gather_skips(units, *tables)
    if uri is None:
        return table
    write_part(table, uri, storage_options)
    for name in files:
        fs, path = resolve(name, storage_options)
        fs.delete_file(path)
    return uri


@dataclass
class SourceDocuments:
    """The source's documents after planning, split by id into buckets and left in the
    object store: `refs[b]` holds bucket b's (doc_id, doc_hash, unit, shard) rows
    (`operators.sources.dedup.source_documents`). A reindex compares them with the table
    bucket by bucket, so the source is read once for the plan and the diff together."""

    refs: list
    """One Ray object ref per bucket."""
    shard_ids: pa.Table
    """(unit, shard, shard_id): the shard id of each (unit, shard number)."""

    @property
    def buckets(self) -> int:
        return len(self.refs)


def _rejects(dirty: list, source: SourceSpec, chosen: dict[str, str], skips: Skips | None,
             uri: str, storage_options: dict[str, str]):
    rows = rejects_of(dirty, source, chosen=chosen, skips=skips)
    return write_fragments(rows, uri, schema=REJECTS_SCHEMA, storage_options=storage_options)


FAN_IN = 64
"""Most object refs one task takes per bucket: pass 1's bucket tables are merged in
groups of this many (and merged again while more remain), so neither the driver's refs
nor a dedup task's arguments grow with the number of units."""


def _merge(groups: int, *tables: pa.Table) -> tuple[pa.Table, ...]:
    """`groups` units' (or merges') bucket tables, laid out bucket-major per source,
    concatenated into one table per bucket."""
    buckets = len(tables) // groups
    out = tuple(pa.concat_tables(tables[i::buckets]) for i in range(buckets))
    return out if buckets > 1 else out[0]


class FanIn:
    """Pass 1's per-record results, fanned in with bounded arity.

    Scan tasks are submitted at most `window` at a time. As they finish, the driver keeps
    each unit's bounded summary (`scan_unit`'s first return) and hands its bucket tables,
    `FAN_IN` units at a time, to a merge task that returns one table per bucket; once
    more than `FAN_IN` merged tables wait for a bucket, they are merged again. So the
    driver holds at most about (`window` + 2 × `FAN_IN`) × buckets refs, however many
    units the source has, and a dedup task takes at most `FAN_IN` tables. The rows stay
    in the object store (Ray can rebuild a lost one from its task's lineage).
    """

    def __init__(self, buckets: int, task_cpus: float) -> None:
        import ray

        self.buckets = buckets
        self.merge = ray.remote(_merge).options(num_cpus=task_cpus, num_returns=buckets)
        self.waiting: list[list] = []  # finished units' bucket refs, not yet merged
        self.merged: list[list] = []  # merged bucket refs, one list per merge
        self.merges = 0

    def scan_all(self, units: list, submit, *, window: int) -> list:
        """Run `submit(unit)` for every unit (its refs: summary, then one per bucket);
        returns the summaries in unit order."""
        import ray

        heads, pending, summaries = {}, {}, {}
        todo = iter(enumerate(units))
        last = time.perf_counter()
        while True:
            for index, unit in todo:
                refs = submit(unit)
                heads[refs[0]] = index
                pending[refs[0]] = list(refs[1:])
                if len(pending) >= window:
                    break
            if not pending:
                break
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=5.0)
            if ready:  # and every other one done by now
                ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
            for ref in ready:
                summaries[heads.pop(ref)] = ray.get(ref)
                self._add(pending.pop(ref))
            if time.perf_counter() - last > 5.0:
                last = time.perf_counter()
                progress(f"validated {len(summaries)}/{len(units)} unit(s)")
        return [summaries[i] for i in range(len(units))]

    def _add(self, bucket_refs: list) -> None:
        self.waiting.append(bucket_refs)
        if len(self.waiting) >= FAN_IN:
            self.merged.append(self._merged(self.waiting))
            self.waiting = []
        if len(self.merged) > FAN_IN:
            self.merged = [self._merged(self.merged)]

    def _merged(self, sources: list[list]) -> list:
        self.merges += 1
        refs = self.merge.remote(len(sources), *[r for refs in sources for r in refs])
        return [refs] if self.buckets == 1 else list(refs)

    def per_bucket(self) -> list[list]:
        """Each bucket's tables (fewer than 2 × `FAN_IN` refs: at most `FAN_IN` merged,
        fewer than `FAN_IN` not), for its dedup task."""
        sources = self.merged + self.waiting
        return [[refs[b] for refs in sources] for b in range(self.buckets)]


def _units_for_limit(units: list, source: SourceSpec, buckets: int, documents: bool,
                     scan) -> list:
    """The first units, in order, that hold `source.limit` valid records (scanned once
    here to count them; `FanIn` scans them again for the plan, a few units at most)."""
    import ray

    seen = 0
    for n, unit in enumerate(units, 1):
        found = ray.get(scan.remote(unit, source, buckets, documents)[0])
        seen += sum(s.records - sum(s.rejects.values()) for s in found.shards)
        if seen >= source.limit:
            return units[:n]
    return units


def plan_on_cluster(source: SourceSpec, *, task_cpus: float, cpus: float,
                    documents: bool = False, excluded: pa.Table | None = None,
                    listing: Listing | None = None, keep: str | None = None,
                    storage_options: dict[str, str] | None = None
                    ) -> tuple[ReadPlan, SourceDocuments | None]:
    """List the source here (file metadata only); validate and dedup it in Ray tasks.

    Args:
        source: The spec's source section.
        task_cpus: CPUs each task asks for.
        cpus: The cluster's CPUs, which size the number of dedup buckets.
        documents: Also keep every document's id and `doc_hash`, bucketed, in the object
            store (a reindex's diff); otherwise the second value is None.
        excluded: The table's excluded ids (`excluded_keys`), left out like duplicates;
            put in the object store once and read by every dedup task.
        listing: The source's listing, when the caller already made it.
        keep: A folder to keep the records left out by id in (`operators.sources.skips`),
            one file per part, for a resume; None keeps them in the object store.
        storage_options: For `keep`.
    """
    import ray

    started = time.perf_counter()
    listing, units = units_of(source, listing)
    skipped = ", ".join(f"{n} {s}" for s, n in sorted(listing.skipped.items()))
    progress(f"source {source.uri}: {len(listing.files)} {listing.kind} file(s)"
              + (f"; not read: {skipped}" if skipped else "") + f"; {len(units)} unit(s)")
    buckets = max(1, min(MAX_BUCKETS, len(units), int(cpus) * 2))
    scan = ray.remote(_scan).options(num_returns=buckets + 1, num_cpus=task_cpus)
    if source.limit is not None:  # only the units the first documents need, in order
        units = _units_for_limit(units, source, buckets, documents, scan)
    fan_in = FanIn(buckets, task_cpus)
    scans = fan_in.scan_all(units, lambda u: scan.remote(u, source, buckets, documents),
                            window=max(FAN_IN, 4 * int(cpus)))
    gone = None if excluded is None or not excluded.num_rows else ray.put(excluded)
    parts = fan_in.per_bucket()
    kept: list | None = None
    bounds = part_bounds(len(units))
    where = _Parts(bounds, keep, storage_options or {})

    def dedup(bad: frozenset, unit_rows: pa.Table) -> tuple[list[pa.Table], Skips | None]:
        nonlocal kept  # pass 2, one task per bucket, then one gathering task per part
        head = 2 if documents else 1
        task = ray.remote(_dedup).options(num_cpus=task_cpus, num_returns=head + len(bounds))
        out = [task.remote(b, where, documents, bad, gone, *parts[b]) for b in range(buckets)]
        if documents:
            kept = [refs[1] for refs in out]
        counts = ray.get([refs[0] for refs in out])
        lost = {int(u) for t in counts for u in t.column("unit").to_numpy()}
        if not lost:
            return counts, None
        needed = sorted({bisect_right(bounds, u) - 1 for u in lost})
        gather = ray.remote(_gather).options(num_cpus=task_cpus)
        units_ref = ray.put(unit_rows)
        found = {p: gather.remote(units_ref, None if keep is None else
                                  f"{keep}/part-{p:05d}.arrow", storage_options or {},
                                  *[refs[head + p] for refs in out]) for p in needed}
        del out  # the gathering tasks hold the parts now
        if keep is not None:
            found = dict(zip(found, ray.get(list(found.values())), strict=True))
        kind = Skips if keep is not None else ObjectStoreSkips
        return counts, kind(tuple(bounds), tuple(found.get(p) for p in range(len(bounds))),
                            storage_options or {})

    plan = settle(listing, scans, source, dedup)
    parts.clear()  # with fan_in, the last refs to the bucket tables: they can go
    del fan_in
    progress(f"validated {plan.records} records in {time.perf_counter() - started:.1f}s: "
              f"{plan.documents} documents, {plan.rejected} rejected, "
              + (f"{plan.excluded} excluded (the table's exclusion list), "
                 if plan.excluded else "") + f"{len(plan.shards)} shards")
    return plan, None if kept is None else SourceDocuments(kept, shard_numbers(plan))


def shard_numbers(plan: ReadPlan) -> pa.Table:
    """(unit, shard, shard_id) for every shard: its number within its unit, as pass 1
    counted them (the plan lists a unit's shards in order)."""
    units, numbers, seen = [], [], Counter()
    for shard in plan.shards:
        units.append(shard.unit.index)
        numbers.append(seen[shard.unit.index])
        seen[shard.unit.index] += 1
    return pa.table({"unit": pa.array(units, pa.int32()), "shard": pa.array(numbers, pa.int32()),
                     "shard_id": [s.shard_id for s in plan.shards]})


def write_rejects(plan: ReadPlan, source: SourceSpec, *, uri: str,
                  storage_options: dict[str, str], task_cpus: float,
                  replace_existing: bool) -> None:
    """Write the reject rows in tasks (only shards that have any, a compressed file's in
    one pass: `reject_groups`) and commit them once."""
    import ray

    if not plan.dirty and not replace_existing:
        return
    task = ray.remote(_rejects).options(num_cpus=task_cpus)
    parts = ray.get([task.remote(group, source, plan.chosen,
                                 None if plan.skips is None else plan.skips.only(group),
                                 uri, storage_options)
                     for group in reject_groups(plan.dirty)])
    fragments = [f for part in parts for f in part]
    operation = lance.LanceOperation.Overwrite(REJECTS_SCHEMA, fragments)
    lance.LanceDataset.commit(uri, operation, read_version=latest_version(uri, storage_options),
                              storage_options=storage_options or None)
