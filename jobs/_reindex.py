"""The reindex's cluster side: find what changed without tokenizing what did not.

1. Scan: read tasks hash every document (`doc_hash`), no tokenizer involved.
2. Join: a Ray Data full outer join on `doc_id` of those hashes with the table's (one row
   per document: its first chunk), on the cluster. Only the documents that differ come
   back to the driver, so the driver holds the change, never the table.
3. Chunk diff: one Ray task per shard with changed documents chunks just those documents,
   compares their chunks with the table's rows of the same documents, and writes the rows
   of unchanged chunks again with the new metadata and the old vectors.

The embed step then tokenizes and embeds only the changed chunks, and everything lands
in one Lance `Update` commit (`jobs._checkpoint`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lance.fragment import FragmentMetadata

from jobs._lance_io import ShardDatasource
from jobs._plan import progress
from operators.reindex import (
    IN_TABLE,
    ReindexDiff,
    chunk_changes,
    doc_changes,
    group_by_shard,
)
from operators.sources.plan import ReadPlan, read_shard
from operators.write import write_fragments
from schemas.records import CODEC_COLUMNS, CONTENT_HASH_BYTES, DOC_HASH_COLUMN, WORK_COLUMNS
from schemas.source import Shard
from schemas.spec import JobSpec

DOC_SIDE = pa.schema([("doc_id", pa.string()), (DOC_HASH_COLUMN, pa.binary(CONTENT_HASH_BYTES)),
                      ("shard", pa.string())])


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


def _table_side(batch: pa.Table) -> pa.Table:
    return batch.append_column(IN_TABLE, pa.array(np.ones(batch.num_rows, bool)))


def _changed_documents(existing: lance.LanceDataset, plan: ReadPlan, spec: JobSpec,
                       *, chunk: Callable[[pa.Table], pa.Table], fingerprint: str,
                       task_cpus: float, cpus: float) -> pa.Table:
    """Steps 1 and 2: (doc_id, shard, status) of every document that differs."""
    import ray.data

    if plan.shards:
        fresh = ray.data.read_datasource(
            ShardDatasource(plan.shards, source=spec.source, metadata=plan.metadata,
                            chosen=plan.chosen, chunker=chunk, doc_hashes=fingerprint,
                            tasks=2 * max(1, int(cpus))),
            num_cpus=task_cpus)
    else:
        fresh = ray.data.from_arrow(DOC_SIDE.empty_table())
    if existing.count_rows():
        old = ray.data.read_lance(
            existing.uri, version=existing.version, columns=["doc_id", DOC_HASH_COLUMN],
            filter="chunk = 0",  # a constant: one row per document, its first chunk
            storage_options=spec.write.storage_options or None, num_cpus=task_cpus)
    else:
        old = ray.data.from_arrow(DOC_SIDE.select(["doc_id", DOC_HASH_COLUMN]).empty_table())
    joined = fresh.join(old.map_batches(_table_side, batch_format="pyarrow"), "full_outer",
                        num_partitions=max(1, min(64, int(cpus))), on=("doc_id",),
                        right_suffix="_old")
    changes = joined.map_batches(doc_changes, batch_format="pyarrow")
    parts = list(changes.iter_batches(batch_size=None, batch_format="pyarrow"))
    return pa.concat_tables(parts) if parts else pa.table(
        {"doc_id": pa.array([], pa.string()), "shard": pa.array([], pa.string()),
         "status": pa.array([], pa.string())})


def _shard_changes(shard: Shard, doc_ids: list[str], *, spec: JobSpec, metadata: pa.Schema,
                   chosen: dict[str, str], chunk: Callable[[pa.Table], pa.Table], uri: str,
                   version: int, schema: pa.Schema) -> dict:
    """Step 3 for one shard: chunk its changed documents, diff their chunks with the
    table's, and write the unchanged chunks' rows with new metadata and old vectors."""
    opts = spec.write.storage_options
    wanted = pa.array(sorted(doc_ids), pa.string())
    docs = read_shard(shard, source=spec.source, metadata=metadata, chosen=chosen)
    fresh = chunk(docs.filter(pc.is_in(docs.column("doc_id"), value_set=wanted)))
    vectors = [c for c in dict.fromkeys(CODEC_COLUMNS.values()) if c in schema.names]
    ds = lance.dataset(uri, version=version, storage_options=opts or None)
    old = ds.to_table(columns=["id", "content_hash", *vectors],
                      filter=pc.field("doc_id").isin(wanted), with_row_address=True)
    changes = chunk_changes(fresh, old)
    carried = fresh.filter(pc.is_in(fresh.column("id"),
                                    value_set=pa.array(changes.carry, pa.string())))
    carried = carried.drop_columns([c for c in WORK_COLUMNS if c in carried.column_names])
    at = pc.index_in(carried.column("id"), value_set=old.column("id"))
    for name in vectors:
        carried = carried.append_column(name, old.column(name).take(at))
    fragments = write_fragments(carried, uri, schema=schema,
                                max_rows_per_file=spec.write.max_rows_per_file,
                                storage_options=opts)
    return {"shard": shard.shard_id, "embed": changes.embed, "remove": changes.remove,
            "fragments": [json.dumps(f.to_json()) for f in fragments],
            "carried": carried.num_rows, "added": changes.added,
            "changed": changes.changed, "deleted": changes.deleted}


def plan_reindex(existing: lance.LanceDataset, plan: ReadPlan, spec: JobSpec, *,
                 chunk: Callable[[pa.Table], pa.Table], fingerprint: str,
                 schema: pa.Schema, task_cpus: float, cpus: float) -> tuple[ReindexDiff, dict]:
    """What a reindex must do, and the seconds each step took (`scan_join`, `chunk_diff`)."""
    import ray

    started = time.perf_counter()
    changes = _changed_documents(existing, plan, spec, chunk=chunk, fingerprint=fingerprint,
                                 task_cpus=task_cpus, cpus=cpus)
    docs, deleted, counts = group_by_shard(changes)
    seconds = {"scan_join": time.perf_counter() - started}
    diff = ReindexDiff(docs=docs, docs_added=counts.get("added", 0),
                       docs_changed=counts.get("changed", 0), docs_deleted=len(deleted))
    progress(f"reindex scan: {diff.docs_added} documents added, {diff.docs_changed} changed, "
             f"{diff.docs_deleted} deleted, the rest unchanged "
             f"({seconds['scan_join']:.1f}s, nothing tokenized)")
    started = time.perf_counter()
    remove = []
    if deleted:
        gone = existing.to_table(columns=["id"], with_row_address=True,
                                 filter=pc.field("doc_id").isin(pa.array(deleted, pa.string())))
        diff.deleted += gone.num_rows
        remove.append(gone.column("_rowaddr").to_numpy().astype(np.uint64))
    by_id = {s.shard_id: s for s in plan.shards}
    task = ray.remote(_shard_changes).options(num_cpus=task_cpus)
    shared = {k: ray.put(v) for k, v in (("spec", spec), ("metadata", plan.metadata),
                                         ("chosen", plan.chosen), ("chunk", chunk),
                                         ("schema", schema))}
    refs = [task.remote(by_id[sid], sorted(ids), uri=existing.uri, version=existing.version,
                        **shared)
            for sid, ids in docs.items()]
    for part in ray.get(refs):
        if part["embed"]:
            diff.todo[part["shard"]] = set(part["embed"])
        remove.append(part["remove"])
        diff.carried.extend(FragmentMetadata.from_json(f) for f in part["fragments"])
        diff.carried_rows += part["carried"]
        diff.added += part["added"]
        diff.changed += part["changed"]
        diff.deleted += part["deleted"]
    diff.remove = np.sort(np.concatenate(remove)) if remove else np.zeros(0, np.uint64)
    seconds["chunk_diff"] = time.perf_counter() - started
    return diff, seconds


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
