"""The reindex's cluster side: find what changed without tokenizing what did not.

1. Scan: the plan's pass 1, which parses every record anyway, hashes every document
   (`doc_hash`, no tokenizer involved) and leaves (doc_id, doc_hash) in the object store,
   split by id into buckets (`jobs._plan.SourceDocuments`).
2. Join: tasks split the table's side (one row per document: its first chunk) into the
   same buckets, and one task per bucket joins the two on `doc_id` in Arrow. Only the
   documents that differ come back to the driver, so the driver holds the change, never
   the table, and the source is read once for the plan and the diff together.
3. Chunk diff: one Ray task per group of shards with changed documents (consecutive
   shards of a compressed file are read in one pass) chunks just those documents,
   compares their chunks with the table's rows of the same documents, and writes the rows
   of unchanged chunks again with the new metadata and the old vectors.

The chunk-diff tasks also return the changed chunks, tokenized; the embed step embeds
just those (it does not read the source again), and everything lands in one Lance
`Update` commit (`jobs._checkpoint`).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lance.fragment import FragmentMetadata

from jobs._lance_io import MIN_ROWS_PER_WRITE, label_chunks
from jobs._plan import SourceDocuments, progress
from operators.reindex import (
    IN_TABLE,
    ReindexDiff,
    by_fragment,
    chunk_changes,
    delete_in_fragments,
    doc_changes,
    group_by_shard,
)
from operators.sources.plan import ReadPlan
from operators.sources.read import bridged, read_groups, read_shards
from operators.sources.scan import bucket_of, id_key
from operators.sources.skips import Skips
from operators.write import write_fragments
from schemas.records import (
    CODE_COLUMN,
    CODEC_COLUMNS,
    CONTENT_HASH_BYTES,
    DOC_HASH_COLUMN,
    WORK_COLUMNS,
)
from schemas.source import Shard
from schemas.spec import JobSpec


def with_doc_hash(ds: lance.LanceDataset, storage_options: dict[str, str]) -> lance.LanceDataset:
    """A table written before `doc_hash` existed gets the column, all nulls, in a
    metadata-only schema change; its documents then compare as changed once, are
    matched chunk by chunk (nothing is embedded again) and get their hashes."""
    if DOC_HASH_COLUMN in ds.schema.names:
        return ds
    ds.add_columns(pa.field(DOC_HASH_COLUMN, pa.binary(CONTENT_HASH_BYTES)))
    progress(f"added the {DOC_HASH_COLUMN} column (null) to a table written before it "
             "existed; its rows get their hashes in this reindex, no vector is recomputed")
    return lance.dataset(ds.uri, storage_options=storage_options or None)


TABLE_SIDE = pa.schema([("doc_id", pa.string()),
                        ("doc_hash_old", pa.binary(CONTENT_HASH_BYTES)), (IN_TABLE, pa.bool_())])


def _table_buckets(uri: str, version: int, fragment_ids: list[int], buckets: int,
                   storage_options: dict[str, str]) -> pa.Table | tuple[pa.Table, ...]:
    """The table's side of the diff for some fragments: one row per document (its first
    chunk) with its `doc_hash`, split into the plan's id buckets (one Ray return each)."""
    ds = lance.dataset(uri, version=version, storage_options=storage_options or None)
    rows = ds.scanner(columns=["doc_id", DOC_HASH_COLUMN], filter=pc.field("chunk") == 0,
                      fragments=[ds.get_fragment(i) for i in fragment_ids]).to_table()
    rows = pa.table([rows.column("doc_id"), rows.column(DOC_HASH_COLUMN),
                     pa.array(np.ones(rows.num_rows, bool))], schema=TABLE_SIDE)
    of = np.array([bucket_of(id_key(d)[1], buckets) for d in rows.column("doc_id").to_pylist()],
                  np.int64)
    parts = tuple(rows.take(np.flatnonzero(of == b)) for b in range(buckets))
    return parts[0] if buckets == 1 else parts


def _bucket_diff(shard_ids: pa.Table, source: pa.Table, *table: pa.Table) -> pa.Table:
    """One bucket's documents that differ: the source's against the table's, joined on
    `doc_id` in Arrow (`doc_changes`)."""
    fresh = source.join(shard_ids, keys=["unit", "shard"]).select(
        ["doc_id", DOC_HASH_COLUMN, "shard_id"]).rename_columns(["doc_id", "doc_hash", "shard"])
    old = pa.concat_tables(table) if table else TABLE_SIDE.empty_table()
    return doc_changes(fresh.join(old, keys="doc_id", join_type="full outer"))


def _changed_documents(existing: lance.LanceDataset, documents: SourceDocuments,
                       spec: JobSpec, *, task_cpus: float, cpus: float) -> pa.Table:
    """Steps 1 and 2: (doc_id, shard, status) of every document that differs.

    The source's side was bucketed by the plan's pass 1; tasks here bucket the table's
    side the same way (by id), and one task per bucket joins the two. Only the
    differences come back to the driver.
    """
    import ray

    buckets = documents.buckets
    fragments = [f.fragment_id for f in existing.get_fragments()]
    tasks = max(1, min(len(fragments), 2 * int(cpus)))
    read = ray.remote(_table_buckets).options(num_cpus=task_cpus, num_returns=buckets)
    parts = [read.remote(existing.uri, existing.version, fragments[t::tasks], buckets,
                         spec.write.storage_options) for t in range(tasks)] if fragments else []
    if buckets == 1:
        parts = [[p] for p in parts]
    diff = ray.remote(_bucket_diff).options(num_cpus=task_cpus)
    shard_ids = ray.put(documents.shard_ids)
    changes = ray.get([diff.remote(shard_ids, documents.refs[b], *[p[b] for p in parts])
                       for b in range(buckets)])
    return pa.concat_tables(changes)


def _group_changes(group: tuple[Shard, ...], doc_ids: dict[str, list[str]], *,
                   skips: Skips | None, spec: JobSpec, metadata: pa.Schema,
                   chosen: dict[str, str],
                   chunk: Callable[[pa.Table], pa.Table], uri: str, version: int,
                   schema: pa.Schema) -> tuple[list[dict], pa.Table]:
    """Step 3 for consecutive shards, read in one pass (`read_shards`): chunk each one's
    changed documents, diff their chunks with the table's, and write the unchanged
    chunks' rows with new metadata and old vectors.

    Returns a summary per shard, and the chunks to embed (tokenized, labelled with their
    shard as the embed stream carries them), so the source is not read again for them.
    """
    opts = spec.write.storage_options
    ds = lance.dataset(uri, version=version, storage_options=opts or None)
    vectors = [c for c in (*dict.fromkeys(CODEC_COLUMNS.values()), CODE_COLUMN)
               if c in schema.names]
    wanted = {sid: frozenset(ids) for sid, ids in doc_ids.items()}
    seconds: Counter[str] = Counter()
    started = time.perf_counter()
    everyone = pa.array(sorted(i for ids in doc_ids.values() for i in ids), pa.string())
    old_rows = ds.to_table(columns=["id", "doc_id", "content_hash", *vectors],
                           filter=pc.field("doc_id").isin(everyone), with_row_address=True)
    seconds["table"] += time.perf_counter() - started
    out, to_embed, kept, fragments = [], [], [], []

    def flush() -> None:  # kept rows go out in sets of MIN_ROWS_PER_WRITE, not per shard
        written = time.perf_counter()
        fragments.extend(write_fragments(pa.concat_tables(kept), uri, schema=schema,
                                         max_rows_per_file=spec.write.max_rows_per_file,
                                         storage_options=opts))
        seconds["write"] += time.perf_counter() - written
        kept.clear()

    started = time.perf_counter()
    for shard, docs in read_shards(group, source=spec.source, metadata=metadata,
                                   chosen=chosen, only=wanted, skips=skips):
        if shard.shard_id not in wanted:  # read through on the way (`bridged`)
            started = time.perf_counter()
            continue
        read_s = time.perf_counter() - started
        fresh = chunk(docs)
        tokenize_s = time.perf_counter() - started - read_s
        old = old_rows.filter(pc.is_in(old_rows.column("doc_id"), value_set=docs.column(
            "doc_id"))) if docs.num_rows else old_rows.slice(0, 0)
        changes = chunk_changes(fresh, old)
        if changes.embed:
            to_embed.append(label_chunks(
                fresh.filter(pc.is_in(fresh.column("id"),
                                      value_set=pa.array(changes.embed, pa.string()))),
                shard.shard_id, read_s=read_s, tokenize_s=tokenize_s))
        carried = fresh.filter(pc.is_in(fresh.column("id"),
                                        value_set=pa.array(changes.carry, pa.string())))
        carried = carried.drop_columns([c for c in WORK_COLUMNS if c in carried.column_names])
        at = pc.index_in(carried.column("id"), value_set=old.column("id"))
        for name in vectors:
            carried = carried.append_column(name, old.column(name).take(at))
        if carried.num_rows:
            kept.append(carried)
            if sum(t.num_rows for t in kept) >= MIN_ROWS_PER_WRITE:
                flush()
        seconds.update(read=read_s, chunk=tokenize_s)
        out.append({"shard": shard.shard_id, "embed": len(changes.embed),
                    "remove": changes.remove, "fragments": [],
                    "carried": carried.num_rows, "added": changes.added,
                    "changed": changes.changed, "deleted": changes.deleted})
        started = time.perf_counter()
    if kept:
        flush()
    out[0]["fragments"] = [json.dumps(f.to_json()) for f in fragments]
    out[0]["seconds"] = dict(seconds)  # the group's, once
    embed = pa.concat_tables(to_embed) if to_embed else pa.table({})
    return out, embed


def plan_reindex(existing: lance.LanceDataset, plan: ReadPlan, documents: SourceDocuments,
                 spec: JobSpec, *, chunk: Callable[[pa.Table], pa.Table], schema: pa.Schema,
                 task_cpus: float, cpus: float) -> tuple[ReindexDiff, dict]:
    """What a reindex must do, and the seconds each step took: `doc_diff` and
    `chunk_diff` (wall), and `chunk_diff_tasks_*` (read, chunk, table, write: summed over
    the chunk-diff tasks)."""
    import ray

    started = time.perf_counter()
    changes = _changed_documents(existing, documents, spec, task_cpus=task_cpus, cpus=cpus)
    docs, deleted, counts = group_by_shard(changes)
    seconds = {"doc_diff": time.perf_counter() - started}
    diff = ReindexDiff(docs=docs, docs_added=counts.get("added", 0),
                       docs_changed=counts.get("changed", 0), docs_deleted=len(deleted))
    progress(f"reindex scan: {diff.docs_added} documents added, {diff.docs_changed} changed, "
             f"{diff.docs_deleted} deleted, the rest unchanged "
             f"({seconds['doc_diff']:.1f}s, nothing tokenized)")
    started = time.perf_counter()
    remove = []
    if deleted:
        gone = existing.to_table(columns=["id"], with_row_address=True,
                                 filter=pc.field("doc_id").isin(pa.array(deleted, pa.string())))
        diff.deleted += gone.num_rows
        remove.append(gone.column("_rowaddr").to_numpy().astype(np.uint64))
    task = ray.remote(_group_changes).options(num_cpus=task_cpus, num_returns=2)
    shared = {k: ray.put(v) for k, v in (("spec", spec), ("metadata", plan.metadata),
                                         ("chosen", plan.chosen), ("chunk", chunk),
                                         ("schema", schema))}
    groups = read_groups(bridged(plan.shards, wanted=docs.keys()),
                         tasks=2 * max(1, int(cpus)))
    refs = [task.remote(group, {s.shard_id: sorted(docs[s.shard_id]) for s in group
                                if s.shard_id in docs},
                        skips=None if plan.skips is None else plan.skips.only(group),
                        uri=existing.uri, version=existing.version, **shared)
            for group in groups]
    summaries = ray.get([r[0] for r in refs])
    diff.chunks = [r[1] for r, parts in zip(refs, summaries, strict=True)
                   if any(part["embed"] for part in parts)]
    tasks: Counter[str] = Counter()
    for part in (p for parts in summaries for p in parts):
        tasks.update(part.get("seconds", {}))
        if part["embed"]:
            diff.todo[part["shard"]] = part["embed"]
        remove.append(part["remove"])
        diff.carried.extend(FragmentMetadata.from_json(f) for f in part["fragments"])
        diff.carried_rows += part["carried"]
        diff.added += part["added"]
        diff.changed += part["changed"]
        diff.deleted += part["deleted"]
    diff.remove = np.sort(np.concatenate(remove)) if remove else np.zeros(0, np.uint64)
    seconds["chunk_diff"] = time.perf_counter() - started
    for step, spent in sorted(tasks.items()):  # summed over the tasks, not wall time
        seconds[f"chunk_diff_tasks_{step}"] = spent
    return diff, seconds


DELETE_FRAGMENTS_PER_TASK = 64
"""At most this many fragments get their deletion vectors in one task."""


def _delete_task(uri: str, version: int, storage_options: dict[str, str],
                 work: list[tuple[int, np.ndarray]]) -> tuple[list[int], list[str]]:
    ds = lance.dataset(uri, version=version, storage_options=storage_options or None)
    removed, updated = delete_in_fragments(ds, work)
    return removed, [json.dumps(meta.to_json()) for meta in updated]


def delete_on_cluster(ds: lance.LanceDataset, addresses: np.ndarray, *, storage_options:
                      dict[str, str], task_cpus: float, slots: int
                      ) -> tuple[list[int], list[FragmentMetadata], dict]:
    """The reindex's deletion vectors, written by Ray tasks (one per group of up to
    `DELETE_FRAGMENTS_PER_TASK` fragments, enough groups to fill `slots`), never by a
    loop on the driver; the reindex's one `Update` commit takes them all.

    Returns the fragments emptied, the fragments with new deletion vectors, and a report
    (tasks, fragments, rows, driver seconds).
    """
    import ray

    started = time.perf_counter()
    work = by_fragment(addresses)
    per_task = max(1, min(DELETE_FRAGMENTS_PER_TASK, -(-len(work) // max(1, slots))))
    groups = [work[i:i + per_task] for i in range(0, len(work), per_task)]
    task = ray.remote(_delete_task).options(num_cpus=task_cpus)
    results = ray.get([task.remote(ds.uri, ds.version, storage_options, g) for g in groups])
    removed = [f for r, _ in results for f in r]
    updated = [FragmentMetadata.from_json(m) for _, ms in results for m in ms]
    return removed, updated, {"tasks": len(groups), "fragments": len(work),
                              "rows": int(len(addresses)),
                              "seconds": round(time.perf_counter() - started, 3)}


def reconcile_schema(existing: lance.LanceDataset, plan: ReadPlan, spec: JobSpec
                     ) -> tuple[lance.LanceDataset, ReadPlan, dict | None]:
    """Compare the source's metadata fields with the table's columns before any work.

    Returns the table (with new columns when evolved), the plan whose metadata schema
    the rows are written with, and what changed (None: nothing).

    Raises:
        SchemaChangeError: a field whose type changed; a new or gone field unless
            `write.on_schema_change` is 'evolve'.
    """
    from dataclasses import replace

    from schemas.errors import SchemaChangeError
    from schemas.records import RESERVED_COLUMNS

    table_fields = [f for f in existing.schema if f.name not in RESERVED_COLUMNS]
    old = {f.name: f.type for f in table_fields}
    new = {f.name: f.type for f in plan.metadata}
    retyped = [f"{n!r} is {old[n]} in the table and {t} in the source"
               for n, t in new.items() if n in old and old[n] != t]
    if retyped:
        raise SchemaChangeError(
            f"{existing.uri}: source field " + "; ".join(retyped) + ". A retyped field is "
            "refused even with write.on_schema_change: evolve (it changes what filters "
            "mean); rebuild with write.mode: overwrite, or rename the field")
    added = {n: str(t) for n, t in new.items() if n not in old}
    gone = {n: str(t) for n, t in old.items() if n not in new}
    if not added and not gone:
        return existing, plan, None
    said = ", ".join([*(f"new field {n!r} ({t})" for n, t in added.items()),
                      *(f"field {n!r} ({t}) no longer in the source" for n, t in gone.items())])
    if spec.write.on_schema_change == "refuse":
        raise SchemaChangeError(
            f"{existing.uri}: the source's fields changed since the table was built: {said}. "
            "Set write.on_schema_change: evolve to add new fields as nullable columns and "
            "keep gone ones (null for new and changed rows), or rebuild with write.mode: "
            "overwrite")
    if added:
        existing.add_columns(pa.schema([pa.field(n, new[n]) for n in added]))
        existing = lance.dataset(existing.uri, storage_options=spec.write.storage_options
                                 or None)
    progress(f"schema evolved: {said}")
    metadata = pa.schema([*table_fields, *(f for f in plan.metadata if f.name in added)])
    return existing, replace(plan, metadata=metadata), {"added": added, "kept": gone}
