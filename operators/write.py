"""Two-phase Lance writes: workers write fragments, one process commits them.

Fragments written but never committed are invisible to readers; the commit is a single
Lance transaction, so a reader sees the version before or after it, never a half. Each
commit carries the ids of the source shards it covers in its transaction properties, which
is what lets a killed job resume without redoing or duplicating work.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

import lance
import pyarrow as pa
from lance.dataset import Transaction
from lance.fragment import FragmentMetadata

JOB_KEY = "quiver.job"
SHARDS_KEY = "quiver.shards"


def write_fragments(table: pa.Table, uri: str | Path, *, schema: pa.Schema,
                    max_rows_per_file: int = 200_000,
                    storage_options: Mapping[str, str] | None = None) -> list[FragmentMetadata]:
    """Write rows as uncommitted Lance fragments and return their metadata.

    The table is cast to `schema` first so every fragment matches the dataset exactly.
    """
    if table.num_rows == 0:
        return []
    table = table.select(schema.names).cast(schema)
    return lance.fragment.write_fragments(
        table, str(uri), schema=schema, max_rows_per_file=max_rows_per_file,
        storage_options=dict(storage_options) if storage_options else None,
    )


def commit(uri: str | Path, fragments: Iterable[FragmentMetadata], *,
           mode: Literal["create", "append"], schema: pa.Schema,
           read_version: int | None = None, job: str, shards: Iterable[str],
           storage_options: Mapping[str, str] | None = None) -> lance.LanceDataset:
    """Commit fragments in one transaction that records the job and shards it covers.

    Args:
        uri: The dataset.
        fragments: Written by `write_fragments`, possibly on other machines.
        mode: 'create' makes (or replaces) the dataset with `schema`; 'append' adds.
        schema: The table schema, manifest included.
        read_version: The version the append was planned against (conflict detection).
        job: Fingerprint of the job (source plan and embedding configuration).
        shards: Ids of the source shards whose rows are all in `fragments`.
        storage_options: Object-store options.
    """
    fragments = list(fragments)
    if mode == "create":
        operation = lance.LanceOperation.Overwrite(schema, fragments)
        read_version = 0
    else:
        if read_version is None:
            raise ValueError("append needs the read_version it was planned against")
        operation = lance.LanceOperation.Append(fragments)
    properties = {JOB_KEY: job, SHARDS_KEY: json.dumps(sorted(shards))}
    transaction = Transaction(read_version, operation, transaction_properties=properties)
    return lance.LanceDataset.commit(
        str(uri), transaction,
        storage_options=dict(storage_options) if storage_options else None,
    )


def committed_shards(ds: lance.LanceDataset, *, job: str) -> set[str]:
    """Shards already committed by this job, read back from the transaction log.

    Walks back from the latest version, skipping commits that carry no job (index builds,
    compaction), and stops at another job's commit or at the create that began this job.
    """
    done: set[str] = set()
    for v in sorted((x["version"] for x in ds.versions()), reverse=True):
        txn = ds.read_transaction(v)
        props = (txn.transaction_properties or {}) if txn else {}
        is_overwrite = txn is not None and isinstance(txn.operation, lance.LanceOperation.Overwrite)
        if JOB_KEY not in props:
            if is_overwrite:
                break
            continue
        if props[JOB_KEY] != job:
            break
        done.update(json.loads(props.get(SHARDS_KEY, "[]")))
        if is_overwrite:
            break
    return done
