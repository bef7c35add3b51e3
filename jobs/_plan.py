"""Plan a source on the cluster: every record is parsed, validated and deduplicated by
Ray tasks, and the driver merges only bounded summaries (`operators.sources.plan`)."""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass

import lance
import pyarrow as pa

from operators.sources import FORMATS
from operators.sources.base import Listing
from operators.sources.dedup import find_duplicates, source_documents
from operators.sources.plan import (
    ReadPlan,
    assemble_plan,
    bad_signatures,
    choose_kinds,
    first_documents,
)
from operators.sources.rejects import reject_groups, rejects_of
from operators.sources.scan import check_metadata_fields, scan_unit, units_of
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


def _dedup(bad: frozenset, excluded: pa.Table | None, *tables: pa.Table) -> pa.Table:
    return find_duplicates(list(tables), bad=bad, excluded=excluded)


def _dedup_documents(bad: frozenset, excluded: pa.Table | None, *tables: pa.Table
                     ) -> tuple[pa.Table, pa.Table]:
    rows = [pa.concat_tables(tables)] if tables else []  # concatenated once, for both
    losers = find_duplicates(rows, bad=bad, excluded=excluded)
    return losers, source_documents(rows, bad=bad, losers=losers)


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


def _rejects(dirty: list, source: SourceSpec, chosen: dict[str, str], uri: str,
             storage_options: dict[str, str]):
    rows = rejects_of(dirty, source, chosen=chosen)
    return write_fragments(rows, uri, schema=REJECTS_SCHEMA, storage_options=storage_options)


def plan_on_cluster(source: SourceSpec, *, task_cpus: float, cpus: float,
                    documents: bool = False, excluded: pa.Table | None = None,
                    listing: Listing | None = None) -> tuple[ReadPlan, SourceDocuments | None]:
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
        refs = []
        seen = 0
        for unit in units:
            refs.append(scan.remote(unit, source, buckets, documents))
            found = ray.get(refs[-1][0])
            seen += sum(s.records - sum(s.rejects.values()) for s in found.shards)
            if seen >= source.limit:
                break
        units = units[:len(refs)]
    else:
        refs = [scan.remote(u, source, buckets, documents) for u in units]
    heads = [r[0] for r in refs]
    scans_by_ref = {}
    waiting, last = list(heads), time.perf_counter()
    while waiting:
        ready, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=5.0)
        for ref in ready:
            scans_by_ref[ref] = ray.get(ref)
        if waiting and time.perf_counter() - last > 5.0:
            last = time.perf_counter()
            progress(f"validated {len(scans_by_ref)}/{len(heads)} unit(s)")
    scans = [scans_by_ref[h] for h in heads]
    check_metadata_fields(scans, source)
    chosen, metadata = choose_kinds(scans, FORMATS[listing.kind].typed)
    bad = bad_signatures(scans, chosen)
    kept = None
    gone = None if excluded is None or not excluded.num_rows else ray.put(excluded)
    if documents:
        dedup = ray.remote(_dedup_documents).options(num_cpus=task_cpus, num_returns=2)
        pairs = [dedup.remote(frozenset(bad), gone, *[r[b + 1] for r in refs])
                 for b in range(buckets)]
        losers = ray.get([p[0] for p in pairs])
        kept = [p[1] for p in pairs]
    else:
        dedup = ray.remote(_dedup).options(num_cpus=task_cpus)
        losers = ray.get([dedup.remote(frozenset(bad), gone, *[r[b + 1] for r in refs])
                          for b in range(buckets)])
    del refs  # the scans' bucket tables can go from the object store
    plan = assemble_plan(listing, scans, losers, chosen=chosen, metadata=metadata, bad=bad)
    if source.limit is not None:
        plan = first_documents(plan, source.limit, source)
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
    parts = ray.get([task.remote(group, source, plan.chosen, uri, storage_options)
                     for group in reject_groups(plan.dirty)])
    fragments = [f for part in parts for f in part]
    operation = lance.LanceOperation.Overwrite(REJECTS_SCHEMA, fragments)
    lance.LanceDataset.commit(uri, operation, read_version=latest_version(uri, storage_options),
                              storage_options=storage_options or None)
