"""An unchanged rerun costs a listing, not a parse.

When a job finishes, the table's config records a key over everything that decides its
rows: the source listing (every file's path, size and modification time), the source
and embedding settings, the model's weights and the table's exclusion list, with the
plan's counts. A rerun whose key matches, on a table that still has the rows it had
then, is answered from the listing and the config alone: no source byte is read, no
Ray is started. Anything else (a file added, touched or removed, a setting changed, rows
deleted since) takes the full path: plan, then resume or reindex.
"""

from __future__ import annotations

import hashlib
import json
import time

from operators.exclusions import excluded_ids
from operators.model import ModelInfo
from operators.sources import FORMATS
from operators.sources.base import Listing, list_source
from operators.sources.plan import ReadPlan, listing_fingerprint
from operators.write import DONE_KEY, finished_rows_match
from schemas.spec import JobSpec

LISTING_KEY = "quiver.job_done_listing"
"""Table config key: the finished job's `listing_key`."""
COUNTS_KEY = "quiver.job_done_counts"
"""Table config key: the finished job's plan counts (JSON), for the rerun's summary."""


def listing_key(fingerprint: str, spec: JobSpec, shaping: str, excluded: list[str]) -> str:
    """The key of a job's inputs, from the listing's fingerprint
    (`listing_fingerprint`), the embedding fingerprint the spec and model give
    (`shaping`) and the exclusion list."""
    source = spec.source.model_dump(mode="json", exclude={"storage_options"})
    parts = [fingerprint, shaping, json.dumps(source, sort_keys=True),
             hashlib.sha256("\n".join(sorted(excluded)).encode()).hexdigest()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def finished_config(key: str, plan: ReadPlan) -> dict[str, str]:
    """What `mark_finished` records besides the job: the key and the plan's counts."""
    counts = {"documents": plan.documents, "rejected": plan.rejected,
              "reasons": dict(plan.reject_reasons), "excluded": plan.excluded,
              "shards": len(plan.shards), "files": plan.files, "skipped": plan.skipped}
    return {LISTING_KEY: key, COUNTS_KEY: json.dumps(counts)}


def unchanged_counts(spec: JobSpec, existing, info: ModelInfo, shaping: str
                     ) -> tuple[dict | None, Listing | None]:
    """The finished job's counts when a rerun of `spec` has nothing to do (else None),
    and the listing when one was made (planning reuses it).

    Reads the source's listing (file metadata), the table's config and its exclusion
    list; never a source file.
    """
    if spec.write.mode == "overwrite" or spec.source.limit is not None or existing is None:
        return None, None
    config = existing.config()
    if LISTING_KEY not in config or DONE_KEY not in config:
        return None, None
    started = time.perf_counter()
    listing = list_source(spec.source, FORMATS)
    excluded = excluded_ids(spec.table, spec.write.storage_options).column(
        "doc_id").to_pylist()
    key = listing_key(listing_fingerprint(listing), spec, shaping, excluded)
    if key != config[LISTING_KEY] or not finished_rows_match(existing):
        return None, listing
    counts = json.loads(config[COUNTS_KEY])
    counts["check_seconds"] = time.perf_counter() - started
    return counts, listing
