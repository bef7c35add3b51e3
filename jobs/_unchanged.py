"""An unchanged rerun costs a listing, not a parse.

When a job ends, a small record beside the table (`x.listing.json`) names the table
version it left and a key over everything that decides its rows: the source listing
(every file's path, size and modification time), the source and embedding settings,
the model and the table's exclusion list, with the plan's counts. A rerun whose key
matches, on a table still at that version, is answered from the listing and the record
alone: no source byte is read, no Ray is started, nothing is committed. Anything else (a
file added, touched or removed, a setting changed, any commit since: a delete, an
optimize) takes the full path: plan, then resume or reindex; which records the new key
when it ends, so a touched but identical file costs one full check, not one per rerun.

A resume costs a listing too. Every run that plans saves its plan beside the table
(`x.plan.json.gz`: the shards, counts and schema; no record; the records it leaves out
by id, duplicates and excluded ids, in files under `x.plan.skips/`, written by the
planning tasks, never by the driver) under the same key and the
job's fingerprint. A run killed half-way and started again finds the key unchanged and
its job's commits in the table, and reads the plan back instead of parsing the source
again; only the shards not yet committed are then read. A reindex still runs pass 1 (its
diff needs every document's hash).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import time
import uuid
from collections import Counter

import pyarrow as pa
from pyarrow.fs import FileSelector, FileType

from operators.exclusions import excluded_ids
from operators.filesystems import beside, resolve
from operators.sources import FORMATS
from operators.sources.base import Listing, list_source
from operators.sources.plan import ReadPlan, listing_fingerprint
from operators.sources.skips import Skips
from schemas.source import shard_from_json, shard_to_json
from schemas.spec import JobSpec


def record_uri(table_uri: str) -> str:
    """Where a table's record of its last job's inputs lives."""
    return beside(table_uri, ".listing.json")


def listing_key(fingerprint: str, spec: JobSpec, shaping: str, excluded: list[str]) -> str:
    """The key of a job's inputs, from the listing's fingerprint
    (`listing_fingerprint`), the embedding fingerprint the spec and model give
    (`shaping`) and the exclusion list."""
    source = spec.source.model_dump(mode="json", exclude={"storage_options"})
    parts = [fingerprint, shaping, json.dumps(source, sort_keys=True),
             hashlib.sha256("\n".join(sorted(excluded)).encode()).hexdigest()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def record_inputs(spec: JobSpec, *, version: int, rows: int, key: str,
                  plan: ReadPlan) -> None:
    """Write the record: the version (and rows) the job left, its inputs' key, the
    plan's counts."""
    counts = {"documents": plan.documents, "rejected": plan.rejected,
              "reasons": dict(plan.reject_reasons), "excluded": plan.excluded,
              "shards": len(plan.shards), "files": plan.files, "skipped": plan.skipped}
    fs, path = resolve(record_uri(spec.table), spec.write.storage_options)
    with fs.open_output_stream(path) as out:
        out.write(json.dumps({"version": version, "rows": rows, "key": key,
                              "counts": counts}).encode())


def _read_record(spec: JobSpec) -> dict | None:
    fs, path = resolve(record_uri(spec.table), spec.write.storage_options)
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError, ValueError):
        return None  # no record (or a torn one): the full path decides


def unchanged_counts(spec: JobSpec, existing, shaping: str
                     ) -> tuple[dict | None, Listing | None]:
    """The last job's counts when a rerun of `spec` has nothing to do (else None), and
    the listing when one was made (planning reuses it).

    Reads the record, the source's listing (file metadata) and the table's exclusion
    list; never a source file.
    """
    if spec.write.mode == "overwrite" or spec.source.limit is not None or existing is None:
        return None, None
    record = _read_record(spec)
    if record is None or record.get("version") != existing.version \
            or record.get("rows") != existing.count_rows():  # a table made again elsewhere
        return None, None
    started = time.perf_counter()
    listing = list_source(spec.source, FORMATS)
    excluded = excluded_ids(spec.table, spec.write.storage_options).column(
        "doc_id").to_pylist()
    if listing_key(listing_fingerprint(listing), spec, shaping, excluded) != record["key"]:
        return None, listing
    return {**record["counts"], "check_seconds": time.perf_counter() - started}, listing


def plan_uri(table_uri: str) -> str:
    """Where a table's saved plan lives."""
    return beside(table_uri, ".plan.json.gz")


PLAN_FORMAT = 2
"""The saved plan's layout; a plan saved in another is planned again. 2: shards count
their left-out records, which are kept in files (`skips_folder`), not in the plan."""


def save_plan(spec: JobSpec, *, key: str, job: str, plan: ReadPlan) -> None:
    """Keep the plan for a resume: its shards (with their byte offsets), counts and
    metadata schema, gzipped JSON (a few hundred bytes per shard before compression)."""
    body = {
        "format": PLAN_FORMAT, "key": key, "job": job, "kind": plan.kind, "records": plan.records,
        "rejected": plan.rejected, "reasons": dict(plan.reject_reasons),
        "fingerprint": plan.fingerprint, "files": plan.files, "skipped": plan.skipped,
        "excluded": plan.excluded, "chosen": plan.chosen,
        "metadata": base64.b64encode(plan.metadata.serialize().to_pybytes()).decode(),
        "shards": [shard_to_json(s) for s in plan.shards],
        "dirty": [s.shard_id for s in plan.dirty],
        "skips": None if plan.skips is None else plan.skips.to_json()}
    fs, path = resolve(plan_uri(spec.table), spec.write.storage_options)
    with fs.open_output_stream(path) as out:
        out.write(gzip.compress(json.dumps(body).encode(), compresslevel=3))


def saved_plan(spec: JobSpec, *, key: str) -> tuple[ReadPlan, str] | None:
    """The saved plan and its job's fingerprint when it was made from these very inputs
    (same key), else None. Reads no source file."""
    fs, path = resolve(plan_uri(spec.table), spec.write.storage_options)
    try:
        with fs.open_input_stream(path) as f:
            body = json.loads(gzip.decompress(f.read()))
    except (FileNotFoundError, OSError, ValueError):
        return None  # none, or a torn one: plan again
    if body.get("key") != key or body.get("format") != PLAN_FORMAT:
        return None
    opts = spec.write.storage_options
    skips = None if body.get("skips") is None else Skips.from_json(body["skips"], opts)
    if skips is not None and not _all_kept(skips):
        return None  # its left-out records are gone (a finished job removes them): plan again
    metadata = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(body["metadata"])))
    shards = [shard_from_json(s) for s in body["shards"]]
    dirty = set(body["dirty"])
    plan = ReadPlan(
        kind=body["kind"], shards=shards,
        metadata=metadata, chosen=body["chosen"], records=body["records"],
        rejected=body["rejected"], reject_reasons=Counter(body["reasons"]),
        fingerprint=body["fingerprint"], files=body["files"], skipped=body["skipped"],
        dirty=[s for s in shards if s.shard_id in dirty],
        excluded=body["excluded"], bytes_read=0, skips=skips)
    return plan, body["job"]


def skips_folder(table_uri: str) -> str:
    """A new folder for one planning's left-out records (`operators.sources.skips`),
    beside the table: a resume reads them back; the job removes them when it finishes."""
    return f"{beside(table_uri, '.plan.skips')}/{uuid.uuid4().hex}"


def _all_kept(skips: Skips) -> bool:
    """Whether every file of a saved plan's left-out records is still there."""
    kept = [p for p in skips.parts if p is not None]
    if not kept:
        return True
    fs, _ = resolve(kept[0], skips.storage_options)
    paths = [resolve(p, skips.storage_options)[1] for p in kept]
    return all(i.type == FileType.File for i in fs.get_file_info(paths))


STALE_SKIPS_S = 3600.0
"""Age after which a finishing job removes another planning's left-out records (a job
that stopped and was not resumed, or whose plan a later planning replaced). A younger
planning may belong to a run about to take the lease."""


def drop_skips(table_uri: str, storage_options: dict[str, str], *, own: Skips | None) -> int:
    """Remove the left-out records no saved plan needs: every other planning's older than
    `STALE_SKIPS_S` (a resume of one finds them gone and plans again). The job's own
    (`own`) stay, as its saved plan does: a table restored to a version before the job
    finished resumes from them. So a table keeps about one planning's. Run while holding
    the table's lease. Returns the folders removed."""
    fs, root = resolve(beside(table_uri, ".plan.skips"), storage_options)
    mine = {resolve(p, storage_options)[1].rsplit("/", 1)[0]
            for p in (own.parts if own is not None else ()) if isinstance(p, str)}
    files = fs.get_file_info(FileSelector(root, recursive=True, allow_not_found=True))
    newest: dict[str, float] = {}
    for info in files:
        if info.type == FileType.File:
            folder = info.path.rsplit("/", 1)[0]
            stamp = info.mtime.timestamp() if info.mtime is not None else time.time()
            newest[folder] = max(newest.get(folder, 0.0), stamp)
    removed = 0
    for folder, stamp in newest.items():
        if time.time() - stamp > STALE_SKIPS_S and folder not in mine:
            fs.delete_dir(folder)
            removed += 1
    return removed
