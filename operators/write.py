"""Two-phase Lance writes: workers write fragments, one process commits them.

Fragments written but never committed are invisible to readers; the commit is a single
Lance transaction, so a reader sees the version before or after it, never a half. Each
commit carries the ids of the source shards it covers in its transaction properties, which
is what lets a killed job resume without redoing or duplicating work.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Literal

import lance
import pyarrow as pa
from lance.dataset import Transaction
from lance.fragment import FragmentMetadata

from operators import shard_labels
from schemas.errors import ConcurrentWriteError

JOB_KEY = "quiver.job"
SHARDS_KEY = "quiver.shards"
"""Transaction property naming the shards a commit adds, as `operators.shard_labels` runs
(older tables hold a plain JSON list under the same key; `decode` reads both)."""


def write_fragments(table: pa.Table, uri: str | Path, *, schema: pa.Schema,
                    max_rows_per_file: int = 200_000,
                    storage_options: Mapping[str, str] | None = None,
                    replace: bool = False) -> list[FragmentMetadata]:
    """Write rows as uncommitted Lance fragments and return their metadata.

    The table is cast to `schema` first so every fragment matches the dataset exactly.
    `replace` is for fragments an Overwrite will commit (a new table, `write.mode:
    overwrite`, a cut-over): they take `schema`'s own field ids rather than being checked
    against the table that is there now, whose schema may differ (an older layout, other
    codecs).
    """
    if table.num_rows == 0:
        return []
    table = table.select(schema.names).cast(schema)
    return lance.fragment.write_fragments(
        table, str(uri), schema=schema, max_rows_per_file=max_rows_per_file,
        storage_options=dict(storage_options) if storage_options else None,
        mode="overwrite" if replace else "append",
    )


def commit(uri: str | Path, fragments: Iterable[FragmentMetadata], *,
           mode: Literal["create", "append", "update"], schema: pa.Schema,
           read_version: int | None = None, job: str, shards: Iterable[str],
           storage_options: Mapping[str, str] | None = None,
           removed_fragment_ids: Iterable[int] = (),
           updated_fragments: Iterable[FragmentMetadata] = (),
           expect_latest: int | None = None, lease=None) -> lance.LanceDataset:
    """Commit fragments in one transaction that records the job and shards it covers.

    Args:
        uri: The dataset.
        fragments: Written by `write_fragments`, possibly on other machines.
        mode: 'create' makes (or replaces) the dataset with `schema`; 'append' adds;
            'update' adds and, in the same version, drops the rows that
            `removed_fragment_ids` / `updated_fragments` (deletion vectors) say
            (an incremental reindex).
        schema: The table schema, manifest included.
        read_version: The version the append was planned against (conflict detection).
        job: Fingerprint of the job (source plan and embedding configuration).
        shards: The shards this commit adds (`committed_shards` takes the union).
        storage_options: Object-store options.
        expect_latest: The latest version this job has seen (0: no table yet). If the
            table has moved on, another writer is at work: nothing is committed and
            `ConcurrentWriteError` says so. (Lance would happily merge two appends, which
            for two runs of one job would mean every row twice.)
        lease: The run's `operators.lease.Lease`: checked first, so a run whose lease
            was taken over commits nothing (`LeaseLostError`).
    """
    fragments = list(fragments)
    # No lock is held around the check and the commit: a run that stalls between them
    # and is taken over is refused by Lance itself, through the takeover's fence
    # (`operators.lease.fence`), so a stalled holder blocks nobody. Except a commit in
    # 'create' mode, which only a job replacing a table makes (`write.mode: overwrite`,
    # a cut-over; a new table is made by `create_empty`): Lance's `Overwrite` never
    # conflicts (checked on pylance 14: committed over a `Restore` fence), so there only
    # the `expect_latest` read just before it stands (docs/reliability.md).
    if lease is not None:
        lease.check()
    if expect_latest is not None:
        latest = latest_version(uri, storage_options)
        if latest != expect_latest:
            raise ConcurrentWriteError(
                f"{uri}: another writer committed version {latest} while this job ran "
                f"(it last saw {expect_latest or 'no table'}); this checkpoint was not "
                "committed. Run the job again when the other writer is done: it "
                "resumes.")
    return _commit(uri, fragments, mode=mode, schema=schema, read_version=read_version,
                   job=job, shards=shards, storage_options=storage_options,
                   removed_fragment_ids=removed_fragment_ids,
                   updated_fragments=updated_fragments)


def _commit(uri: str | Path, fragments: list[FragmentMetadata], *,
            mode: Literal["create", "append", "update"], schema: pa.Schema,
            read_version: int | None, job: str, shards: Iterable[str],
            storage_options: Mapping[str, str] | None,
            removed_fragment_ids: Iterable[int],
            updated_fragments: Iterable[FragmentMetadata]) -> lance.LanceDataset:
    """The Lance transaction itself; `commit` documents the arguments."""
    if mode == "create":
        operation = lance.LanceOperation.Overwrite(schema, fragments)
        read_version = 0
    else:
        if read_version is None:
            raise ValueError(f"{mode} needs the read_version it was planned against")
        if mode == "update":
            operation = lance.LanceOperation.Update(
                removed_fragment_ids=list(removed_fragment_ids),
                updated_fragments=list(updated_fragments), new_fragments=fragments)
        else:
            operation = lance.LanceOperation.Append(fragments)
    properties = {JOB_KEY: job, SHARDS_KEY: shard_labels.encode(shards)}
    transaction = Transaction(read_version, operation, transaction_properties=properties)
    return lance.LanceDataset.commit(
        str(uri), transaction,
        storage_options=dict(storage_options) if storage_options else None,
    )


def create_empty(uri: str | Path, schema: pa.Schema, *, job: str,
                 storage_options: Mapping[str, str] | None = None,
                 lease=None) -> lance.LanceDataset:
    """Create the table with `schema` and no rows, refusing one that already exists: the
    first commit of a job that makes a new table.

    Why not commit the first checkpoint as an `Overwrite`: Lance never refuses an
    `Overwrite` (pylance 14: one landed over a takeover's `Restore` fence and over a
    table another run had created), so a run stalled at its first commit could land
    after being taken over. `mode="create"` is refused when anything is there, whoever
    made it, and every checkpoint after it is an `Append` read from this version, which
    a takeover's fence (`operators.lease.fence`) makes Lance refuse. The creation names
    the job (with no shards), so a rerun after a failure before the first checkpoint
    resumes on this table (`job_started`).

    Raises:
        ConcurrentWriteError: the table appeared since this run looked (another run).
    """
    if lease is not None:
        lease.check()
    try:
        return lance.write_dataset(
            schema.empty_table(), str(uri), schema=schema, mode="create",
            storage_options=dict(storage_options) if storage_options else None,
            transaction_properties={JOB_KEY: job, SHARDS_KEY: shard_labels.encode([])})
    except OSError as err:
        if "already exists" not in str(err):
            raise
        raise ConcurrentWriteError(
            f"{uri}: another run created this table while this one was planning; nothing "
            "was written. Run the job again when the other run is done.") from None


def latest_version(uri: str | Path, storage_options: Mapping[str, str] | None = None) -> int:
    """The table's latest version, 0 when there is no table yet."""
    try:
        return lance.dataset(str(uri), storage_options=dict(storage_options)
                             if storage_options else None).version
    except ValueError:
        return 0


DONE_KEY = "quiver.job_done"
"""Table config key naming the job that last ran to completion on this table."""


def committed_shards(ds: lance.LanceDataset, *, job: str) -> set[str]:
    """Shards this job has committed so far, read back from the transaction log.

    Each commit records only the shards it adds, so a commit's metadata stays the same
    size however long the job runs; the job's set is the union over its commits.
    """
    return {shard for shards in _job_commits(ds, job) for shard in shards}


def has_committed(ds: lance.LanceDataset, *, job: str) -> bool:
    """Whether this job committed any shard: the log read back only to the job's latest
    commit, not through every commit as `committed_shards` does."""
    return any(shards for shards in _job_commits(ds, job))


def job_started(ds: lance.LanceDataset, *, job: str) -> bool:
    """Whether this job made any commit since the table's last overwrite, its creation
    (`create_empty`) included, even one with no shards."""
    return next(_job_commits(ds, job), None) is not None


def _job_commits(ds: lance.LanceDataset, job: str) -> Iterator[list[str]]:
    """The shards of each of this job's commits, newest first. Walking back from the
    latest version skips commits without a job (index builds, compaction), follows a
    restore to the version it restored, and stops at another job's commit or at an
    overwrite (this job's first commit is one)."""
    versions = sorted((x["version"] for x in ds.versions()), reverse=True)
    ceiling = versions[0] if versions else 0
    for v in versions:
        if v > ceiling:
            continue
        txn = ds.read_transaction(v)
        if txn is None:
            return
        props = txn.transaction_properties or {}
        if JOB_KEY in props:
            if props[JOB_KEY] != job:
                return
            yield shard_labels.decode(props[SHARDS_KEY])
        if isinstance(txn.operation, lance.LanceOperation.Restore):
            ceiling = txn.operation.version
        elif isinstance(txn.operation, (lance.LanceOperation.Overwrite,
                                        lance.LanceOperation.Delete)):
            return  # a delete (`quiver table delete`) ends the run before it


DONE_ROWS_KEY = "quiver.job_done_rows"
"""The table's row count when the job was marked done: a delete since then undoes it."""


def job_finished(ds: lance.LanceDataset, *, job: str) -> bool:
    """Whether this job already ran to completion on the table (see `mark_finished`) and
    no rows were deleted since (compaction and index upkeep keep it finished)."""
    config = ds.config()
    rows = config.get(DONE_ROWS_KEY)
    return config.get(DONE_KEY) == job and (rows is None or int(rows) == ds.count_rows())


def mark_finished(ds: lance.LanceDataset, *, job: str, epoch: int = 0,
                  storage_options: Mapping[str, str] | None = None) -> lance.LanceDataset:
    """Record in the table's config that `job` is complete, so a rerun is a no-op even
    after its checkpoint versions (and the shard lists they carry) are cleaned up.

    One `UpdateConfig` read from `ds`'s version that also names the writer's lease
    `epoch` (`operators.lease.EPOCH_KEY`): after a takeover's fence, Lance refuses it
    from a holder that lost the lease."""
    from operators.lease import EPOCH_KEY

    update = lance.LanceOperation.UpdateConfig(config_updates=lance.LanceOperation.UpdateMap(
        {DONE_KEY: job, DONE_ROWS_KEY: str(ds.count_rows()), EPOCH_KEY: str(epoch)}))
    return lance.LanceDataset.commit(ds.uri, update, read_version=ds.version,
                                     storage_options=dict(storage_options or {}) or None)


def cleanup_checkpoints(ds: lance.LanceDataset, versions: Iterable[int]) -> int:
    """Remove the job's intermediate checkpoint versions, keeping the latest and tagged
    ones, so a 100M-document job does not leave thousands of manifests behind."""
    tagged = {t["version"] for t in ds.tags.list().values()}
    doomed = sorted(v for v in set(versions) if v != ds.version and v not in tagged)
    if not doomed:
        return 0
    ds.cleanup_old_versions(versions=doomed, error_if_tagged_old_versions=False)
    return len(doomed)


def orphan_data_files(ds: lance.LanceDataset,
                      storage_options: Mapping[str, str] | None = None) -> list[str]:
    """Data files under `data/` that no version of the table references.

    They are what a writer leaves when it dies between writing fragments and committing
    them: invisible to readers, but they take space. Lance's own cleanup removes them only
    after 7 days, because it cannot tell them from a live writer's files.
    """
    from operators.filesystems import resolve

    referenced: set[str] = set()
    for v in ds.versions():
        for fragment in ds.checkout_version(v["version"]).get_fragments():
            referenced.update(f.path for f in fragment.data_files())
    from pyarrow.fs import FileSelector, FileType

    fs, root = resolve(ds.uri, storage_options)
    infos = fs.get_file_info(FileSelector(f"{root}/data", allow_not_found=True))
    return [i.path for i in infos
            if i.type == FileType.File and i.base_name not in referenced]


def remove_orphans(ds: lance.LanceDataset,
                   storage_options: Mapping[str, str] | None = None, *,
                   older_than: float | None = None) -> int:
    """Delete `orphan_data_files` last modified before `older_than` (Unix seconds; None:
    all). Call it only under the table's lease (`operators.lease`), with the time its
    `orphans_before` gives, so no other run's uncommitted files can be among them.
    Returns how many were removed."""
    from operators.filesystems import resolve

    fs, _ = resolve(ds.uri, storage_options)
    orphans = orphan_data_files(ds, storage_options)
    if older_than is not None and orphans:
        orphans = [i.path for i in fs.get_file_info(orphans)
                   if i.mtime is not None and i.mtime.timestamp() < older_than]
    for path in orphans:
        fs.delete_file(path)
    return len(orphans)
