"""Quiver's Python API: run jobs, open tables, search them, evaluate them.

Usage (see the README for a runnable walk-through)::

    from jobs import api
    summary = api.run("spec.yaml")
    table = api.open_table("warehouse/scifact.lance")
    hits = table.search("aspirin and heart attacks", k=5)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import lance

from jobs._embed_job import JobSummary, rejects_uri, run_embed
from jobs._maintenance import (
    delete_documents,
    export_table,
    list_tags,
    optimize,
    promote,
    rejects_summary,
    restore,
    set_tag,
    table_stats,
)
from jobs._qbnorm import build_bank as qbnorm_bank
from jobs._quality import quality_report
from jobs._refit import refit
from jobs.table import (  # noqa: F401  (re-exported: the public API)
    MAX_BATCH,
    MAX_K,
    SEARCH_MODES,
    Hit,
    Table,
    Where,
    open_table,
    shared_encoder,
)
from operators.evaluate import load_beir, score_runs
from schemas.errors import QueryError, TableError
from schemas.manifest import TableManifest
from schemas.spec import JobSpec, load_spec

__all__ = ["Hit", "JobSummary", "Table", "delete_documents", "evaluate", "export_table",
           "include", "info", "list_tags", "load_spec", "open_table", "optimize", "plan",
           "promote", "qbnorm_bank", "quality", "refit",
           "rejects_summary", "restore", "run", "set_tag", "table_stats"]


def plan(spec: JobSpec | str | Path) -> dict:
    """A dry run of a job spec (`quiver plan`): files, records, rejects with a sample,
    metadata schema, actor layout, and an estimated time. Writes nothing."""
    from jobs._dryrun import dry_run

    return dry_run(spec if isinstance(spec, JobSpec) else load_spec(spec))


def run(spec: JobSpec | str | Path, *, wait: bool = False) -> JobSummary:
    """Run a job spec (a `JobSpec` or a YAML path) locally on Ray and return its summary;
    with `wait`, wait for another run that holds the table's lease instead of failing."""
    if not isinstance(spec, JobSpec):
        spec = load_spec(spec)
    return run_embed(spec, wait=wait)


def evaluate(uri: str | Path, beir: str | Path, *, model: str | None = None,
             mode: str = "dense", using: str = "auto", rescore: int | None = None,
             storage_options: dict[str, str] | None = None) -> dict:
    """nDCG@10, recall@10, recall@100 and MRR@10 of a table on a BEIR folder's test queries.

    Queries are embedded with the table's own model; chunk hits are folded to documents.
    """
    table = open_table(uri, model=model, storage_options=storage_options)
    queries = load_beir(beir)
    started = time.perf_counter()
    vectors = table.embed_queries(queries.texts) if mode != "fts" \
        else [None] * len(queries.texts)
    embedded = time.perf_counter()
    ranked = table.search_documents(vectors, k=100, mode=mode, texts=queries.texts,
                                    using=using, rescore=rescore, exact=False, where=None)
    searched = time.perf_counter()
    runs = {q: [d for d, _ in docs] for q, docs in zip(queries.ids, ranked, strict=True)}
    metrics = score_runs(runs, queries.qrels)
    return {
        **{k: round(v, 4) for k, v in metrics.items()},
        "queries": len(queries.ids),
        "table": str(uri),
        "mode": mode,
        "embed_seconds": round(embedded - started, 2),
        "search_ms_per_query": round(1000 * (searched - embedded) / max(1, len(queries.ids)), 2),
    }


def quality(uri: str | Path, beir: str | Path, *, model: str | None = None,
            chunks_per_query: int = 300,
            storage_options: dict[str, str] | None = None) -> dict:
    """The quality report of a table: every way it can be searched, on a BEIR folder.

    See `jobs._quality` for the ways, and `quiver eval --report` for the command.
    """
    table = open_table(uri, model=model, storage_options=storage_options)
    queries = load_beir(beir)
    vectors = table.embed_queries(queries.texts)
    try:
        table.query_bank()
        rerank = table.qbnorm_candidates
    except QueryError:  # no bank: nothing to measure
        rerank = None
    report = quality_report(table.searcher, vectors, queries, chunks_per_query=chunks_per_query,
                            qbnorm=rerank)
    return {"table": str(uri), "beir": str(beir), **report}


def info(uri: str | Path, *, storage_options: dict[str, str] | None = None) -> dict:
    """Manifest, row count, versions and indices of a table."""
    opts = storage_options or None
    try:
        ds = lance.dataset(str(uri), storage_options=opts)
    except (ValueError, OSError) as err:
        raise TableError(f"{uri}: cannot open as a Lance table: {err}") from None
    manifest = TableManifest.from_schema(ds.schema, where=str(uri))
    rejects = rejects_uri(str(uri))
    try:
        n_rejects = lance.dataset(rejects, storage_options=opts).count_rows()
    except (ValueError, OSError):
        n_rejects = 0
    return {
        "table": str(uri),
        "rows": ds.count_rows(),
        "version": ds.version,
        "versions": [
            {"version": v["version"], "timestamp": str(v["timestamp"])} for v in ds.versions()
        ],
        "tags": {name: t["version"] for name, t in ds.tags.list().items()},
        "indices": [
            {"name": i["name"], "type": i["type"], "fields": list(i["fields"])}
            for i in ds.list_indices()
        ],
        "columns": [f"{f.name}: {f.type}" for f in ds.schema],
        "fragments": len(ds.get_fragments()),
        "rejects": n_rejects,
        "manifest": manifest.model_dump(),
    }


def include(uri: str | Path, doc_ids: Sequence[str], *,
            storage_options: dict[str, str] | None = None, wait: bool = False) -> dict:
    """Take documents off the table's exclusion list: the next job embeds them again if
    the source has them. Returns how many were on it, and what stays excluded.

    Under the table's lease: a running job reads the list when it plans, and a change in
    the middle of its run would leave it embedding what the list no longer says."""
    from operators.exclusions import excluded_ids
    from operators.exclusions import include as take_off
    from operators.lease import Lease

    with Lease.acquire(str(uri), storage_options, wait=wait, purpose="quiver table include"):
        removed = take_off(str(uri), doc_ids, storage_options=storage_options)
    left = excluded_ids(str(uri), storage_options).num_rows
    return {"table": str(uri), "removed": removed, "still_excluded": left}
