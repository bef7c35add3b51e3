"""`quiver plan SPEC`: what a job would do, and about how long it would take, without
writing anything.

The plan is the job's own (`jobs._embed_job._plan`: the source listed, validated and
deduplicated in cluster tasks), so its counts are the job's. The estimate comes from a
short calibration on this machine: a sample of documents spread over the source is
chunked (seconds per document, one core) and embedded with the job's model, precision
and actor thread count (tokens per second). The embed phase is then the larger of the
actors' forward time and the CPU time all the work needs spread over the cluster's CPUs
(on a CPU-only machine, tokenizing takes cores from the forward pass), plus the fixed
costs measured on the way: Ray's start, the planning pass, and an actor's model load.
"""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.compute as pc

from jobs._embed_job import _open_existing, _plan, node_clock
from jobs._layout import actor_layout
from jobs._plan import progress
from jobs._ray import largest_node_cpus
from operators.chunk import Chunker
from operators.cost import job_cost
from operators.embed import Embedder
from operators.model import describe_model
from operators.quantize import sample_positions
from operators.sources.plan import ReadPlan
from operators.sources.read import sample_documents
from operators.sources.rejects import shard_rejects, with_duplicates
from operators.sources.scan import units_of
from schemas.errors import ManifestMismatchError
from schemas.manifest import TableManifest
from schemas.spec import JobSpec

SAMPLE_DOCUMENTS = 48
"""Documents the calibration chunks and embeds: a few seconds of work on a CPU."""
REJECT_SAMPLE = 5
INDEX_SECONDS_PER_MILLION_ROWS = 120.0
"""Rough ANN build cost (IVF_HNSW_SQ, 384-d) where the table is large enough for one;
below `index.ann_min_rows` only scalar indices are built, in about a second."""
FINISH_SECONDS = 3.0
"""Commits, tags and version cleanup at the end of a job (measured: 1-4 s locally)."""


def _sample_documents(plan: ReadPlan, spec: JobSpec) -> pa.Table | None:
    """About SAMPLE_DOCUMENTS documents from shards spread evenly over the source."""
    docs = sample_documents(plan.shards, wanted=SAMPLE_DOCUMENTS, source=spec.source,
                            metadata=plan.metadata, chosen=plan.chosen, skips=plan.skips)
    if docs is None or docs.num_rows <= SAMPLE_DOCUMENTS:
        return docs
    return docs.take(sample_positions(docs.num_rows, SAMPLE_DOCUMENTS))


def corpus_scale(spec: JobSpec, plan: ReadPlan, docs: pa.Table) -> float:
    """How many times the sample the corpus's work is. Whole-text chunking (`windows`)
    embeds every character, so its tokens follow the characters pass 1 counted exactly:
    one 2.4 MB document among short ones counts at its size, which a mean per sampled
    document misses. `truncate` embeds one chunk per document: there, documents count."""
    chars = int(pc.sum(pc.utf8_length(docs.column("text"))).as_py() or 0)
    if spec.chunking.mode == "truncate" or not chars or not plan.text_chars:
        return plan.documents / docs.num_rows
    return plan.text_chars / chars


def _reject_sample(plan: ReadPlan, spec: JobSpec) -> list[dict]:
    """The first few rejects with their file, line and reason (from the first dirty
    shards only: the whole source is never read again for this)."""
    rows: list[dict] = []
    for shard in plan.dirty:
        if len(rows) >= REJECT_SAMPLE:
            break
        (shard, duplicates), = with_duplicates([shard], plan.skips)
        found = shard_rejects(shard, spec.source, chosen=plan.chosen, duplicates=duplicates)
        rows += found.select(["source", "position", "position_kind", "record_id",
                              "reason"]).to_pylist()[:REJECT_SAMPLE - len(rows)]
    return rows


def _action(spec: JobSpec, manifest: TableManifest) -> str:
    existing = _open_existing(spec.table, spec.write.storage_options)
    if existing is None:
        return "create the table"
    if spec.write.mode == "overwrite":
        return "overwrite the table"
    try:
        TableManifest.from_schema(existing.schema, where=spec.table).check_same_embedding(
            manifest, where=spec.table)
    except ManifestMismatchError:
        return ("refuse: the table has another embedding configuration"
                if spec.write.on_config_change == "refuse"
                else "cut over to the new embedding configuration (a full build)")
    return "reindex (or resume) the existing table: only the change is embedded"


def dry_run(spec: JobSpec) -> dict:
    """Plan `spec` and estimate its time; writes nothing (see the module docstring)."""
    started = time.perf_counter()
    listing, _ = units_of(spec.source)
    planned = _plan(spec, started, describe_model(spec.model), save=False)
    plan, info, manifest = planned.plan, planned.info, planned.manifest
    layout = actor_layout(spec, cpus=planned.cpus, gpus=planned.gpus,
                          cores=int(largest_node_cpus()) or 1, documents=plan.documents,
                          node_cpus=largest_node_cpus(),
                          chunk_tokens=manifest.chunking.max_tokens)
    progress(f"calibrating on {SAMPLE_DOCUMENTS} sample documents ({info.name}, "
             f"{planned.precision}, {layout.threads} torch thread(s))")
    docs = _sample_documents(plan, spec)
    estimate: dict = {"documents_sampled": 0}
    if docs is not None and docs.num_rows:
        chunker = Chunker(info.path, max_tokens=manifest.chunking.max_tokens,
                          overlap=spec.chunking.overlap, mode=spec.chunking.mode,
                          document_prefix=info.document_prefix, metadata=plan.metadata,
                          config_fingerprint=manifest.embedding_fingerprint(),
                          trust_remote_code=spec.model.trust_remote_code)
        chunker(docs.slice(0, 1))  # warm the tokenizer
        tick = time.perf_counter()
        chunks = chunker(docs)
        tokenize_per_doc = (time.perf_counter() - tick) / docs.num_rows
        tick = time.perf_counter()
        embedder = Embedder(info, precision=planned.precision, device=spec.model.device,
                            batch_tokens=spec.compute.batch_tokens,
                            torch_threads=layout.threads,
                            trust_remote_code=spec.model.trust_remote_code)
        load_s = time.perf_counter() - tick
        ids = chunks.column("input_ids")
        embedder.embed_ids(ids.slice(0, min(8, len(ids))))  # warm-up
        tick = time.perf_counter()
        embedder.embed_ids(ids)
        forward_s = time.perf_counter() - tick
        tokens = int(pc.sum(pc.list_value_length(ids)).as_py() or 0)
        per_doc_tokens = tokens / docs.num_rows
        scale = corpus_scale(spec, plan, docs)
        total_tokens = tokens * scale
        tps = tokens / max(forward_s, 1e-9)  # one actor
        forward_wall = total_tokens / tps / layout.actors
        cpu_work = total_tokens / tps * layout.threads * (0 if layout.gpus else 1) \
            + tokenize_per_doc * docs.num_rows * scale
        embed_s = max(forward_wall, cpu_work / max(planned.cpus, 1.0))
        rows = chunks.num_rows * scale
        index_s = 1.0 if rows < spec.index.ann_min_rows else \
            INDEX_SECONDS_PER_MILLION_ROWS * rows / 1e6
        actor_start = load_s + 3.0  # imports in a fresh worker process, then the load
        total = planned.ray_start + planned.plan_seconds + actor_start + embed_s + index_s \
            + FINISH_SECONDS
        estimate = {
            "documents_sampled": docs.num_rows, "tokens_per_document": round(per_doc_tokens, 1),
            "chunks_per_document": round(chunks.num_rows / docs.num_rows, 2),
            "tokens": int(total_tokens), "chunks": int(rows),
            "tokenize_ms_per_document": round(1000 * tokenize_per_doc, 2),
            "actor_tokens_per_s": round(tps), "seconds": {
                "ray_start": round(planned.ray_start, 1), "plan": round(planned.plan_seconds, 1),
                "actor_start": round(actor_start, 1), "embed": round(embed_s, 1),
                "index": round(index_s, 1), "finish": FINISH_SECONDS},
            "total_seconds": round(total, 1)}
        estimate.update(_estimated_cost(spec, seconds=total, documents=plan.documents,
                                        tokens=int(total_tokens)))
    return {
        "spec": spec.table, "action": _action(spec, manifest),
        "source": spec.source.uri, "format": plan.kind,
        "files": [f.path for f in listing.files[:20]], "files_found": plan.files,
        "files_skipped": plan.skipped, "records": plan.records, "documents": plan.documents,
        "rejected": plan.rejected, "excluded": plan.excluded,
        "reject_reasons": dict(plan.reject_reasons), "reject_sample": _reject_sample(plan, spec),
        "shards": len(plan.shards),
        "metadata_schema": {f.name: str(f.type) for f in plan.metadata},
        "layout": {"actors": layout.actors, "cpus_per_actor": layout.cpus,
                   "gpus_per_actor": layout.gpus, "threads": layout.threads,
                   "rows_per_block": layout.rows_per_block,
                   "cluster": {"cpus": planned.cpus, "gpus": planned.gpus}},
        "model": {"name": info.name, "dim": info.dim, "precision": planned.precision,
                  "max_tokens": info.max_tokens},
        "estimate": estimate,
    }


def _estimated_cost(spec: JobSpec, *, seconds: float, documents: int, tokens: int) -> dict:
    """Node-hours and cost if the nodes up now stay up for the estimated `seconds` (an
    autoscaler's nodes still to start are not counted)."""
    clock = node_clock(spec, 0.0)
    clock.sample()
    hours: dict[str, float] = {}
    for kind, *_ in clock.seen.values():
        hours[kind] = round(hours.get(kind, 0.0) + seconds / 3600, 6)
    return {"node_hours": hours,
            "cost": job_cost(hours, spec.cost.prices, documents=documents, tokens=tokens,
                             currency=spec.cost.currency)}


def limited(spec: JobSpec, documents: int, table: str) -> JobSpec:
    """The spec cut to its source's first `documents` documents, into `table` (a scratch
    table, overwritten): `quiver run --limit N`."""
    source = spec.source.model_copy(update={"limit": documents})
    write = spec.write.model_copy(update={"mode": "overwrite", "retention_days": 0.0})
    return spec.model_copy(update={"source": source, "table": table, "write": write})

