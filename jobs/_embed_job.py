"""The embed job: plan → decide → execute, as one streaming Ray Data execution.

    plan     list the source (file metadata only); validate, type and dedup every record
             in cluster tasks (`jobs._plan`); the driver keeps bounded summaries
    decide   create, resume, reindex or cut over, from the table and its commits
    execute  read + chunk + tokenize (tasks) → embed (one actor pool for the whole job)
             → write fragments per shard (tasks) → commit complete shards (driver, while
             the actors keep going) → index → clean up checkpoint versions

A rerun of the same job (same source files, same embedding configuration) reads the
shards already committed from the table's transaction log and does only the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Literal

import lance
import pyarrow as pa

from jobs._calibrate import calibrated
from jobs._checkpoint import Checkpointer
from jobs._cutover import cut_over, pin_current
from jobs._embed_service import (
    KEPT_MAX_CHUNKS,
    KEPT_TASK_CPUS,
    EarlyEmbedder,
    codebook_key,
    early_wanted,
    embed_on_kept,
    kept_embedder,
    kept_threads,
)
from jobs._embed_service import wanted as kept_wanted
from jobs._index import ClusterBuilder, index_workers
from jobs._job_metrics import DriverMeter, MeteredEmbedder, table_tag
from jobs._lance_io import (
    MIN_ROWS_PER_WRITE,
    ChunkBlocks,
    ShardDatasource,
    write_shard_fragments,
)
from jobs._layout import ActorLayout, actor_layout, uses_gpus
from jobs._plan import SourceDocuments, plan_on_cluster, progress, write_rejects
from jobs._progress import JobProgress, route_ray_logs
from jobs._ray import (
    autoscaler_gpus,
    cluster_nodes,
    cluster_resources,
    ensure_ray,
    largest_node_cpus,
)
from jobs._reindex import delete_on_cluster, plan_reindex, reconcile_schema, with_doc_hash
from jobs._tags import CURRENT_TAG
from jobs._unchanged import (
    drop_skips,
    listing_key,
    record_inputs,
    save_plan,
    saved_plan,
    skips_folder,
    unchanged_counts,
)
from operators.chunk import Chunker
from operators.codebooks import load_codebook
from operators.cost import NodeClock, job_cost, launcher_node_types
from operators.embed import load_times, resolve_precision
from operators.exclusions import excluded_ids
from operators.filesystems import beside
from operators.index import (
    COMPACT_MIN_FRAGMENTS,
    LOCAL,
    Builder,
    IndexReport,
    ann_params,
    build_indices,
    cleanup_versions,
    maintain_indices,
)
from operators.lease import Lease
from operators.model import ModelInfo, describe_model
from operators.quantize import Codebook
from operators.reindex import ReindexDiff
from operators.sources import FORMATS
from operators.sources.base import Listing, list_source
from operators.sources.dedup import excluded_keys
from operators.sources.plan import ReadPlan, listing_fingerprint
from operators.write import (
    cleanup_checkpoints,
    committed_shards,
    has_committed,
    job_finished,
    job_started,
    mark_finished,
    remove_orphans,
)
from schemas.errors import (
    ClusterError,
    ManifestMismatchError,
    QuiverError,
    SourceError,
    SpecError,
    TableError,
)
from schemas.manifest import (
    ChunkingManifest,
    ModelManifest,
    SourceManifest,
    TableManifest,
    VectorsManifest,
)
from schemas.records import table_schema
from schemas.source import Shard
from schemas.spec import JobSpec, Precision, with_absolute_paths

log = logging.getLogger("quiver")


@dataclass
class JobSummary:
    """What a job did, for people (printed) and programs (`--json`)."""

    table: str
    version: int
    documents: int
    chunks: int
    rejects: int
    reject_reasons: dict[str, int]
    shards: int
    shards_skipped: int
    tokens: int
    truncated_tokens: int
    tokens_per_s: float
    documents_per_s: float
    embed_seconds: float
    index: str
    index_seconds: float
    table_bytes: int
    seconds: float
    rejects_table: str | None
    reindex: dict | None = None
    """Chunks added, changed, deleted, unchanged and embedded, when the run was a reindex."""
    versions_cleaned: int = 0
    compaction: dict | None = None
    """The end-of-job compaction of the fragments this run wrote: fragments written,
    rewritten and in the table after, seconds, and the cluster workers (0: the driver)."""
    cutover: dict | None = None
    """When the embedding configuration changed: old and new versions, top-10 overlap."""
    files: int = 0
    """Source files read."""
    files_skipped: dict[str, int] = field(default_factory=dict)
    """Files in the source folder or glob that were not read, by suffix."""
    commits: int = 0
    """Checkpoint commits this run made."""
    first_commit_s: float | None = None
    """Seconds from the job's start to its first committed checkpoint."""
    model_loads: int = 0
    """Model copies loaded by embed actors (one per actor; more means actors restarted)."""
    profile: dict | None = None
    """Where the time went (see `stage_profile`)."""
    excluded: int = 0
    """Valid source documents left out because the table's exclusion list holds them."""
    commit_seconds: list[float] = field(default_factory=list)
    """Each checkpoint commit's seconds, in order."""
    source_bytes_read: int = 0
    """Bytes of line-format source files (JSON Lines, CSV, text; decompressed) that
    planning read: 0 for an unchanged rerun, which reads only the listing."""
    node_hours: dict[str, float] = field(default_factory=dict)
    """Hours each node type was up while the job ran (`operators.cost.NodeClock`)."""
    cost: dict | None = None
    """The node-hours at `cost.prices`: total, by type, per million documents embedded
    and per million tokens (`operators.cost.job_cost`); None without prices."""

    def to_dict(self) -> dict:
        return asdict(self)



def rejects_uri(table_uri: str) -> str:
    """The rejects dataset sits next to its table: `x.lance` → `x.rejects.lance`."""
    return beside(table_uri, ".rejects.lance")


def build_manifest(spec: JobSpec, info: ModelInfo, *, precision: Precision) -> TableManifest:
    """The manifest a table written by this spec carries (with the resolved precision)."""
    chunk_tokens = min(spec.chunking.max_tokens or info.max_tokens, info.max_tokens)
    dims = spec.vectors.dims or info.dim
    if dims > info.dim:
        raise SpecError(f"vectors.dims ({dims}) exceeds the model's dimension ({info.dim})")
    try:  # the index is built after the embedding: refuse its settings before that
        ann_params(spec.index.ann_type, rows=1, dims=dims, num_partitions=None,
                   num_sub_vectors=spec.index.num_sub_vectors, num_bits=spec.index.num_bits)
    except ValueError as err:
        raise SpecError(f"index: {err}") from None
    return TableManifest(
        quiver_version=version("quiver"),
        lance_version=lance.__version__,
        model=ModelManifest(
            name=spec.model.name, weights_sha256=info.weights_sha256, pooling=info.pooling,
            normalize=info.normalize, max_tokens=info.max_tokens, dim=info.dim,
            query_prefix=info.query_prefix, document_prefix=info.document_prefix,
            precision=precision,
        ),
        chunking=ChunkingManifest(max_tokens=chunk_tokens, overlap=spec.chunking.overlap,
                                  mode=spec.chunking.mode),
        source=SourceManifest(uri=spec.source.uri, id_field=spec.source.id_field,
                              text_fields=spec.source.text_fields),
        vectors=VectorsManifest(codecs=spec.vectors.codecs, dims=dims, truncated=dims < info.dim),
        metric="dot" if info.normalize else "cosine",
    )


def _job_fingerprint(plan: ReadPlan, manifest: TableManifest, spec: JobSpec, *,
                     excluded: list[str]) -> str:
    """Names the job: the same source files, configuration and exclusion list give the
    same job, whose rerun is a no-op once it finished (`job_finished`)."""
    parts = [plan.fingerprint, manifest.embedding_fingerprint(),
             str(spec.source.records_per_shard), str(len(plan.shards))]
    if excluded:  # taking an id off the list (or adding one) makes it another job
        parts.append(hashlib.sha256("\n".join(sorted(excluded)).encode()).hexdigest())
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def _open_existing(uri: str, storage_options: dict[str, str]) -> lance.LanceDataset | None:
    try:
        return lance.dataset(uri, storage_options=storage_options or None)
    except (ValueError, OSError, FileNotFoundError):
        return None


def _table_bytes(uri: str) -> int:
    from operators.filesystems import resolve

    fs, path = resolve(uri)
    from pyarrow.fs import FileSelector, FileType

    infos = fs.get_file_info(FileSelector(path, recursive=True, allow_not_found=True))
    return sum(i.size or 0 for i in infos if i.type == FileType.File)


ACTOR_WORKING_MEMORY = 2**30
"""Bytes an embed actor asks for beyond twice its weights: activations, blocks in flight."""


def _model_bytes(info: ModelInfo) -> int:
    """Bytes of the model's weight files: what each actor holds in memory, at least."""
    names = [n for n in os.listdir(info.path) if n.endswith((".safetensors", ".bin"))]
    return sum(os.path.getsize(os.path.join(info.path, n)) for n in names)


def stage_profile(seconds: dict[str, float], *, ray_start: float, first_block: float | None,
                  actors: int, embed_seconds: float,
                  first_load: tuple[float, float] | None = None,
                  started_at: float = 0.0, early: bool = False) -> dict:
    """The job's time by stage, in seconds.

    `plan` is the wall time of planning the source (listing, validation, duplicates).
    `read`/`tokenize` and `write` are summed over Ray tasks, `forward`/`pool`/`quantize`
    over embed actors (so with two actors they can add up to twice the wall time);
    `commit` is the driver's. `ray_start` and `first_block` are wall time from the job's
    start: Ray up, and the first embedded block out of an actor; `actor_ready` when the
    first actor had its model loaded and `actor_load` the seconds its load took (the
    imports of torch and transformers in a fresh worker, and the weights), from
    `first_load` (`operators.embed.load_times`); `actor_kept` when that load was an
    earlier run's (`jobs._embed_service`: ready at 0); `actor_early` when the run
    embedded on the one actor it started while planning. `actor_idle` is the
    actors' share of the embed phase not spent on a batch: model loading, waiting for
    blocks, the tail, and whatever Ray's own processes took from them.

    >>> stage_profile({"forward": 50.0, "pool": 1.0, "quantize": 1.0}, ray_start=3.0,
    ...               first_block=12.0, actors=2, embed_seconds=30.0)["actor_idle"]
    8.0
    """
    busy = sum(seconds.get(s, 0.0) for s in ("forward", "pool", "quantize"))
    profile = {stage: round(seconds.get(stage, 0.0), 4)
               for stage in ("plan", "read", "tokenize", "forward", "pool", "quantize",
                             "write", "commit")}
    ready, load = first_load if first_load is not None else (None, None)
    kept = ready is not None and ready < started_at  # loaded by an earlier run
    return {**profile, "ray_start": round(ray_start, 2),
            "actor_ready": None if ready is None else round(max(0.0, ready - started_at), 2),
            "actor_kept": kept, "actor_early": early,
            "actor_load": None if load is None else round(load, 2),
            "first_block": None if first_block is None else round(first_block, 2),
            "actors": actors, "actor_idle": round(max(0.0, actors * embed_seconds - busy), 2)}


def _check_reject_rate(spec: JobSpec, plan: ReadPlan) -> None:
    """Fail before anything is written when more records are bad than the spec tolerates."""
    limit = spec.source.max_reject_rate
    if limit is None or not plan.records:
        return
    rate = plan.rejected / plan.records
    if rate > limit:
        top = ", ".join(f"{n} x {reason}" for reason, n in plan.reject_reasons.most_common(3))
        raise SourceError(f"{spec.source.uri}: {plan.rejected} of {plan.records} "
                          f"records rejected ({rate:.1%} > source.max_reject_rate "
                          f"{limit:.1%}); nothing was written. Most common: {top}")


def _same_source(a: str, b: str) -> bool:
    """Two source URIs name the same data (local paths compared once resolved)."""
    if "://" in a or "://" in b:
        return a == b
    return os.path.realpath(a) == os.path.realpath(b)


def _check_filterable(spec: JobSpec, plan: ReadPlan) -> None:
    """Refuse, before any work, an index.filterable column the table will not have."""
    columns = {"id", "doc_id", "chunk", *plan.metadata.names}
    for name in spec.index.filterable:
        if name not in columns:
            raise SpecError(f"index.filterable: {name!r} is not a column of this table "
                            f"(columns: {', '.join(sorted(columns))})")


def _warn_untrained_truncation(info: ModelInfo, vectors: VectorsManifest) -> None:
    if vectors.truncated and vectors.dims not in info.matryoshka_dims:
        declared = list(info.matryoshka_dims) or "none"
        message = (f"warning: vectors.dims {vectors.dims} truncates {info.name}, which "
                   f"declares no such Matryoshka size (declared: {declared}); quality may "
                   "drop more than for a Matryoshka-trained model. Check it with quiver eval.")
        log.warning(message)
        progress(message)


def _embed_stage(ds, *, info: ModelInfo, spec: JobSpec, layout: ActorLayout,
                 precision: Precision, codebook: Codebook, size: int,
                 early: EarlyEmbedder | None = None):
    """The embed actor pool over chunk rows (token ids in, codec columns out); for a
    small run, the model actor it started while planning (`early`), or on the warm
    scheduler its kept actor (`jobs._embed_service`). An early actor the run turns out
    too large for is killed here, before the pool starts."""
    import ray
    from ray.data import ActorPoolStrategy

    settings = dict(precision=precision, device=spec.model.device,
                    batch_tokens=spec.compute.batch_tokens, torch_threads=layout.threads,
                    trust_remote_code=spec.model.trust_remote_code)
    actor = None
    if early is not None and early.actor is not None:
        if size <= KEPT_MAX_CHUNKS and not layout.gpus:
            progress("embedding on the model actor started while planning")
            actor, early.used = early.actor, True
        else:
            early.kill()
    if actor is None and kept_wanted(chunks=size, gpus=layout.gpus):
        progress("embedding on the scheduler's kept model actor")
        actor = kept_embedder(info, {
            **settings, "torch_threads": kept_threads(layout, spec.compute.torch_threads)})
    if actor is not None:
        return ds.map_batches(
            embed_on_kept, fn_kwargs=dict(actor=actor, key=codebook_key(codebook),
                                          codebook=ray.put(codebook),
                                          table=table_tag(spec.table)),
            num_cpus=KEPT_TASK_CPUS, batch_size=layout.rows_per_block,
            batch_format="pyarrow")
    return ds.map_batches(
        MeteredEmbedder,
        fn_constructor_args=(info,),
        fn_constructor_kwargs=dict(table_uri=spec.table, codebook=codebook, **settings),
        compute=ActorPoolStrategy(size=layout.actors),
        num_cpus=layout.cpus,
        num_gpus=layout.gpus,
        memory=2 * _model_bytes(info) + ACTOR_WORKING_MEMORY,
        batch_size=layout.rows_per_block,
        batch_format="pyarrow",
    )


@dataclass
class _Planned:
    """What the plan step learned: the model, the source's summaries, the manifest."""

    info: ModelInfo
    plan: ReadPlan
    manifest: TableManifest
    precision: Precision
    job: str
    cpus: float
    gpus: float
    """GPUs up now or, under `model.device: auto`, the ones the autoscaler can start."""
    ray_start: float
    plan_seconds: float = 0.0
    """Wall seconds of listing, validating and deduplicating the source (cluster tasks)."""
    documents: SourceDocuments | None = None
    """Every document's id and hash, bucketed in the object store, when a table exists."""
    lease: Lease | None = None
    """This run's hold on the table (set before anything is decided or written)."""
    meter: DriverMeter | None = None
    """The job's exact counts in Ray's metrics (`jobs._job_metrics`)."""
    clock: NodeClock | None = None
    """The cluster's nodes while the job runs, for its node-hours (`operators.cost`)."""
    listing_key: str = ""
    """The key of the job's inputs (`jobs._unchanged.listing_key`)."""
    early: EarlyEmbedder | None = None
    """The run's model actor, started while it planned (`jobs._embed_service`)."""


@dataclass
class _Decision:
    """What to do with the table: create it, resume or finish this job, reindex it, or
    cut over to a new embedding configuration."""

    action: Literal["create", "overwrite", "resume", "finished", "reindex", "cutover"]
    existing: lance.LanceDataset | None
    manifest: TableManifest
    done: set[str] = field(default_factory=set)


def _job_resources(spec: JobSpec) -> tuple[float, float, bool]:
    """(CPUs, GPUs) a job plans with, and whether those GPUs are the autoscaler's: with
    none up under `model.device: auto`, the GPUs its node types can start."""
    cpus, gpus = cluster_resources()
    if gpus < 1 and spec.model.device == "auto" and (startable := autoscaler_gpus()) >= 1:
        return cpus, startable, True
    return cpus, gpus, False


def _start_early(spec: JobSpec, info: ModelInfo, existing: lance.LanceDataset | None,
                 listing: Listing | None, early: EarlyEmbedder) -> Listing:
    """Start Ray, and the run's model actor on it when the run is likely small
    (`jobs._embed_service.early_wanted`), so that its imports and model load overlap
    planning; returns the source's listing (made here when the caller had none)."""
    ensure_ray()
    if listing is None:
        listing = list_source(spec.source, FORMATS)
    _, gpus, _ = _job_resources(spec)
    nodes = sum(1 for n in cluster_nodes() if n["Alive"])
    if early_wanted(nodes=nodes, gpus=gpus, device=spec.model.device,
                    reindex=existing is not None and spec.write.mode != "overwrite",
                    source_bytes=sum(f.size for f in listing.files),
                    limit=spec.source.limit):
        early.start(info, dict(
            precision=resolve_precision(spec.model.precision, on_gpu=False),
            device=spec.model.device, batch_tokens=spec.compute.batch_tokens,
            torch_threads=spec.compute.torch_threads or int(largest_node_cpus()) or 1,
            trust_remote_code=spec.model.trust_remote_code))
    return listing


def _plan(spec: JobSpec, started: float, info: ModelInfo,
          listing: Listing | None = None, *, save: bool = True) -> _Planned:
    """Model and source, validated before any embedding: the source in cluster tasks
    (listed here unless `listing` is given); with `save`, the plan is saved beside the
    table for a resume (a dry run does not)."""
    ensure_ray()
    ray_start = time.perf_counter() - started
    cpus, gpus, startable = _job_resources(spec)
    if startable:
        progress(f"no GPU is up yet; the autoscaler's node types offer {gpus:g}, "
                 "so the embed actors will ask for them (model.device: cpu opts out)")
    plan_started = time.perf_counter()
    existing = _open_existing(spec.table, spec.write.storage_options) \
        if spec.write.mode != "overwrite" else None
    excluded = excluded_ids(spec.table, spec.write.storage_options).column("doc_id").to_pylist()
    if listing is None:
        listing = list_source(spec.source, FORMATS)
    key = listing_key(listing_fingerprint(listing), spec, _shaping(spec, info), excluded)
    precision = resolve_precision(spec.model.precision, on_gpu=uses_gpus(spec, gpus))
    manifest = build_manifest(spec, info, precision=precision)
    save = save and spec.source.limit is None
    saved = _resumable_plan(spec, existing, key) if save else None
    if saved is not None:
        plan, documents = saved, None
        progress(f"resuming from the saved plan ({len(plan.shards)} shards; the source's "
                 "listing is unchanged, so it is not parsed again)")
    else:  # with a table to compare with, pass 1 keeps each document's hash (a reindex)
        plan, documents = plan_on_cluster(
            spec.source, task_cpus=min(1.0, cpus), cpus=cpus, documents=existing is not None,
            excluded=excluded_keys(excluded) if excluded else None, listing=listing,
            keep=skips_folder(spec.table) if save else None,
            storage_options=spec.write.storage_options)
    plan_seconds = time.perf_counter() - plan_started
    _check_filterable(spec, plan)
    _check_reject_rate(spec, plan)
    progress(f"model {spec.model.name}: dim {info.dim}, {info.pooling} pooling, "
              f"normalize={info.normalize}, max {info.max_tokens} tokens, {precision}")
    _warn_untrained_truncation(info, manifest.vectors)
    job = _job_fingerprint(plan, manifest, spec, excluded=excluded)
    if saved is None and save:
        save_plan(spec, key=key, job=job, plan=plan)
    return _Planned(info, plan, manifest, precision, job,
                    cpus, gpus, ray_start, plan_seconds, documents, listing_key=key)


def _resumable_plan(spec: JobSpec, existing: lance.LanceDataset | None,
                    key: str) -> ReadPlan | None:
    """The saved plan of these inputs when the table holds an unfinished run of its job
    (a resume), else None: then the source is planned again."""
    if existing is None:
        return None
    found = saved_plan(spec, key=key)
    if found is None:
        return None
    plan, job = found
    if job_finished(existing, job=job) or not has_committed(existing, job=job):
        return None
    return plan


def _shaping(spec: JobSpec, info: ModelInfo) -> str:
    """The embedding fingerprint the spec and model give, whatever the table holds."""
    return build_manifest(spec, info, precision="fp32").embedding_fingerprint()


def _decide(spec: JobSpec, planned: _Planned) -> _Decision:
    """Create, resume, reindex or cut over, from the table and its commit log."""
    uri, manifest = spec.table, planned.manifest
    existing = _open_existing(uri, spec.write.storage_options)
    if existing is None or spec.write.mode == "overwrite":
        return _Decision("create" if existing is None else "overwrite", existing, manifest)
    started = job_started(existing, job=planned.job)
    if not started and existing.count_rows() == 0 and not existing.get_fragments():
        # made empty by a run of another configuration that failed before its first
        # checkpoint (`create_empty`): nothing to keep, cut over or reindex
        return _Decision("overwrite", existing, manifest)
    old = TableManifest.from_schema(existing.schema, where=uri)
    try:
        old.check_same_embedding(manifest, where=uri)
    except ManifestMismatchError as err:
        if spec.write.on_config_change == "refuse":
            raise
        pinned = pin_current(existing)  # readers stay on the old model meanwhile
        progress(f"{err}\n[quiver] cut-over: the new configuration is written as new "
                  f"versions; tag '{CURRENT_TAG}' stays on version {pinned} until the new "
                  "table is complete and indexed")
        return _Decision("cutover", existing, manifest)
    # The table's own int8 ranges, and its manifest version and precision, so chunks
    # hash in the form the table's rows were written in (`embedding_fingerprint`).
    manifest = manifest.model_copy(update={
        "vectors": old.vectors, "schema_version": old.schema_version,
        "model": manifest.model.model_copy(update={"precision": old.model.precision})})
    _check_code(spec, old, uri)
    if job_finished(existing, job=planned.job):
        return _Decision("finished", existing, manifest,
                         {s.shard_id for s in planned.plan.shards})
    done = committed_shards(existing, job=planned.job)
    if done or started:  # started: the table was made by this job (`create_empty`)
        orphans = remove_orphans(  # only what no live run can still commit
            existing, spec.write.storage_options,
            older_than=planned.lease.orphans_before() if planned.lease else None)
        progress(f"resuming: {len(done)} of {len(planned.plan.shards)} shards already "
                  "committed" + (f"; removed {orphans} data files an interrupted run left "
                                 "uncommitted" if orphans else ""))
        return _Decision("resume", existing, manifest, done)
    if _same_source(old.source.uri, spec.source.uri) or spec.kind == "reindex":
        return _Decision("reindex", existing, manifest)
    raise TableError(
        f"{uri} already exists and holds {old.source.uri}, not {spec.source.uri}; use "
        "kind: reindex to make it follow the new source, write.mode: overwrite to "
        "replace it, or pick another table")


def _check_code(spec: JobSpec, old: TableManifest, uri: str) -> None:
    """Refuse a spec that asks for another first-stage code than the table holds: the
    code is fitted when the table is made (a spec that names none keeps the table's)."""
    wanted, have = spec.vectors.code, old.vectors.code
    if wanted is None or (have is not None
                          and (have.name, have.nbytes) == (wanted.name, wanted.bytes)):
        return
    held = f"the first-stage code {have.name} at {have.nbytes} bytes" if have \
        else "no first-stage code"
    raise TableError(
        f"{uri} holds {held}; the spec asks for {wanted.name} at {wanted.bytes} bytes. A "
        "table's code is fitted when the table is made; `quiver table refit --code` adds one "
        "to a table that has none (from its stored vectors), and replacing one is not "
        "built yet: write a new table, or use write.mode: overwrite.")


def _quiver_cause(err: BaseException) -> QuiverError | None:
    """The Quiver error a Ray task raised, out of the wrappers Ray Data puts around it
    (a file that changed mid-job then reads as one line naming the file)."""
    seen: set[int] = set()
    stack = [err]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, QuiverError) and type(e).__module__ == "schemas.errors":
            return e  # not Ray's wrapper class of the same name: the error as raised
        stack.extend(x for x in (e.__cause__, e.__context__, getattr(e, "cause", None))
                     if isinstance(x, BaseException))
    return None


def _write_rows(spec: JobSpec, block_rows: int) -> int:
    """Rows a write task gathers: `MIN_ROWS_PER_WRITE` (at most a data file's rows), so
    the number of fragments follows the rows, not the shards (one per shard made 100k
    fragments at 100M documents). When the spec asks for commits of at most
    `write.shards_per_commit` shards, writes hold about that many shards' rows (at least
    an actor's block), so that commits of that size can be made.

    >>> from schemas.spec import parse_spec
    >>> s = {"kind": "embed", "table": "t.lance", "source": {"uri": "c.jsonl",
    ...      "id_field": "_id", "records_per_shard": 5}}
    >>> _write_rows(parse_spec(s), 256)
    10000
    >>> _write_rows(parse_spec({**s, "write": {"shards_per_commit": 2}}), 16)
    16
    """
    cap = min(spec.write.max_rows_per_file, MIN_ROWS_PER_WRITE)
    if spec.write.shards_per_commit is None:
        return cap
    return min(cap, max(block_rows, spec.write.shards_per_commit
                        * spec.source.records_per_shard))


BLOCK_BYTES_PER_ROW = 8192
"""Ray Data block size, in bytes per row of an actor's block (`_block_bytes`): 2 MiB
at the CPU actors' 256 rows, about 700 documents of scifact-sized text."""


def _block_bytes(layout: ActorLayout) -> int:
    """The job's Ray Data block size: a few embed actor blocks of documents.

    A read task's output is merged until it passes this size (Ray Data's default is
    128 MiB, which held a whole compressed file's shards back until the file was read),
    and cut when it is half as big again: blocks reach the actors and the commits soon,
    and the embed stage needs no repartition to keep every actor busy to the end. Any
    cut is safe: shards are counted by their documents (`jobs._checkpoint`).

    Every block is a chunk task and a hop through the object store, so blocks that are
    too small cost more in Ray than the work they carry. Measured on 100k documents (8
    `.jsonl.gz` files, tiny model, 2 cores, `benchmarks/scale.py`), wall seconds and
    first commit by block size: 256 KiB 182.9 s / 42.3 s (Ray's driver, daemons and
    idle workers then used 94 CPU-s, against 53 at 2 MiB), 2 MiB 132.8 / 39.9,
    4 MiB 137.6 / 41.7, 16 MiB 146.2 / 69.0.

    >>> _block_bytes(ActorLayout(2, 0.5, 0.0, 1, rows_per_block=256))
    2097152
    """
    return max(16 * 1024, layout.rows_per_block * BLOCK_BYTES_PER_ROW)


@contextlib.contextmanager
def _data_block_bytes(size: int) -> Iterator[None]:
    """Ray Data's block size for the datasets made and run inside (`_block_bytes`),
    restored after, so other executions in the process keep their own."""
    import ray.data

    context = ray.data.DataContext.get_current()
    saved = context.target_max_block_size
    context.target_max_block_size = size
    try:
        yield
    finally:
        context.target_max_block_size = saved


def _wait_for_gpus(spec: JobSpec, layout: ActorLayout) -> None:
    """Ask the autoscaler for the actors' GPUs and wait for them, or fail clearly."""
    import ray

    need = layout.gpus * layout.actors
    if not layout.gpus or cluster_resources()[1] >= need:
        return
    from ray.autoscaler.sdk import request_resources

    try:  # best effort: a cluster without an autoscaler just has to offer them in time
        request_resources(bundles=[{"GPU": layout.gpus}] * layout.actors)
    except (AttributeError, RuntimeError, ConnectionError) as err:
        log.warning("could not ask the autoscaler for GPUs: %s", err)
    progress(f"waiting up to {spec.compute.gpu_wait_s:.0f}s for {need:g} GPU(s)")
    deadline = time.perf_counter() + spec.compute.gpu_wait_s
    while time.perf_counter() < deadline:
        if float(ray.cluster_resources().get("GPU", 0.0)) >= need:
            return
        time.sleep(2.0)
    raise ClusterError(f"the job asked for {need:g} GPU(s) (model.device, "
                     "compute.gpus_per_actor, or node types that offer GPUs under "
                     "model.device: auto) and the cluster offered "
                     f"{cluster_resources()[1]:g} within compute.gpu_wait_s "
                     f"({spec.compute.gpu_wait_s:.0f}s); nothing was embedded")


def _execute(spec: JobSpec, planned: _Planned, decision: _Decision) -> tuple[
        Checkpointer, ActorLayout, ReindexDiff | None, int, float]:
    """Write rejects, then embed every pending shard in one streaming execution.

    Returns the checkpointer, the layout, the reindex diff, the documents embedded and
    the embed phase's wall seconds.
    """
    import ray.data  # noqa: F401  (before route_ray_logs: Ray Data sets up its loggers)

    route_ray_logs()  # Ray Data sets up its loggers on import
    plan, info, uri = planned.plan, planned.info, spec.table
    opts = spec.write.storage_options
    manifest = decision.manifest
    task_cpus = min(1.0, planned.cpus)
    existing, schema_change = decision.existing, None
    if decision.action == "reindex":  # refused (or evolved) before anything is written
        existing, plan, schema_change = reconcile_schema(existing, plan, spec)
        existing = with_doc_hash(existing, opts)
    rejects_path = rejects_uri(uri)
    write_rejects(plan, spec.source, uri=rejects_path, storage_options=opts,
                  task_cpus=task_cpus,
                  replace_existing=_open_existing(rejects_path, opts) is not None)
    chunker_kwargs = dict(
        max_tokens=manifest.chunking.max_tokens, overlap=spec.chunking.overlap,
        mode=spec.chunking.mode, document_prefix=info.document_prefix, metadata=plan.metadata,
        config_fingerprint=manifest.embedding_fingerprint(),
        trust_remote_code=spec.model.trust_remote_code)
    model_path = info.path

    def chunk(docs: pa.Table) -> pa.Table:
        return Chunker(model_path, **chunker_kwargs)(docs)

    needs_int8 = "int8" in manifest.vectors.codecs and manifest.vectors.int8_low is None
    needs_code = spec.vectors.code is not None and manifest.vectors.code is None
    code = None
    if needs_int8 or needs_code:
        manifest, code = calibrated(manifest, spec, plan, chunk, info, int8=needs_int8,
                                    code=needs_code, precision=planned.precision,
                                    on_gpu=uses_gpus(spec, planned.gpus),
                                    actor=planned.early.actor if planned.early else None)
    if code is None and manifest.vectors.code is not None:  # the table's own codebook
        code = load_codebook(uri, manifest.vectors.code.sha256, opts)
    schema = table_schema(
        plan.metadata, dim=manifest.vectors.dims, codecs=manifest.vectors.codecs,
        code=(code.name, code.nbytes) if code is not None else None,
    ).with_metadata(manifest.to_metadata())
    codebook = Codebook.from_manifest(manifest.vectors, normalize=info.normalize, code=code)
    if decision.action == "reindex":
        work = _reindex_work(spec, planned, existing, plan, chunk, schema_change)
    else:
        work = _build_work(spec, planned, decision, plan, chunk, schema)
    layout = actor_layout(spec, cpus=planned.cpus, gpus=planned.gpus,
                          cores=int(largest_node_cpus()) or 1, documents=work.size,
                          node_cpus=largest_node_cpus(),
                          chunk_tokens=manifest.chunking.max_tokens)
    new_table = decision.action == "create"  # made empty at the first commit, then appended
    checkpointer = Checkpointer(
        uri, schema=work.schema, mode="append" if new_table else work.mode,
        read_version=work.read_version, job=planned.job, storage_options=opts,
        expect_latest=existing.version if existing is not None else 0,  # other writers
        create=new_table,
        shards_per_commit=spec.write.shards_per_commit,
        commit_interval_s=spec.write.commit_interval_s, deletions=work.deletions,
        carried=work.carried, total_shards=len(work.pending), lease=planned.lease)
    checkpointer.add_empty(work.empty)
    embed_started = time.perf_counter()
    if work.to_read:
        progress(f"embedding {work.size} {work.unit} from {len(work.to_read)} shard(s) on "
                 f"{layout.actors} actor(s) x {layout.threads} torch thread(s)"
                 + (f", {layout.gpus:g} GPU each" if layout.gpus else ""))
        _wait_for_gpus(spec, layout)
        with _data_block_bytes(_block_bytes(layout)):
            ds = work.dataset(layout)
            meter = JobProgress(work.size, unit=work.unit, label=work.label)
            checkpointer.on_shard_written = work.shard_written
            ds = _embed_stage(ds, info=info, spec=spec, layout=layout,
                              precision=planned.precision, codebook=codebook, size=work.size,
                              early=planned.early)
            written = ds.map_batches(
                write_shard_fragments, fn_kwargs=dict(
                    uri=uri, schema=work.schema, max_rows_per_file=spec.write.max_rows_per_file,
                    storage_options=opts, replace=work.mode == "create",
                    shards_per_set=spec.write.shards_per_commit),
                batch_size=_write_rows(spec, layout.rows_per_block),
                batch_format="pyarrow", num_cpus=layout.write_cpus)
            try:  # no prefetch: it hands a block over only once the next one is ready,
                # which held every checkpoint back by one write task (15-18 s at 1M docs)
                for block in written.iter_batches(batch_size=None, batch_format="pyarrow",
                                                  prefetch_batches=0):
                    checkpointer.consume(block)
                    meter.update(documents=work.done(checkpointer), chunks=checkpointer.rows)
                    if planned.clock is not None:
                        planned.clock.sample(force=False)
                    if planned.meter is not None:
                        planned.meter.totals(documents_embedded=work.written_documents[0],
                                             chunks=checkpointer.rows,
                                             commits=len(checkpointer.commit_seconds))
            except Exception as err:
                raise _quiver_cause(err) or err from None
            finally:
                meter.close()
    if work.commits:  # an unchanged source commits nothing
        checkpointer.finish(always=existing is None or decision.action in ("overwrite",
                                                                            "cutover"))
    embedded = sum(s.documents for s in work.to_read)
    return checkpointer, layout, work.diff, embedded, time.perf_counter() - embed_started


@dataclass
class _Work:
    """What one run embeds and how it commits, whichever case it is in: a build (create,
    overwrite, resume, cut-over) reads its pending shards from the source; a reindex
    embeds the changed chunks its diff left tokenized and commits them with its
    deletions in one `Update`. `_execute` runs either without asking which it is."""

    mode: Literal["create", "append", "update"]
    schema: pa.Schema
    read_version: int | None
    pending: list[Shard]
    """The shards this run accounts for (commits)."""
    to_read: list[Shard]
    size: int
    """Documents (a build) or chunks (a reindex) to embed."""
    unit: str
    label: str
    dataset: Callable[[ActorLayout], object]
    """The Ray Data stream of chunks to embed, given the actor layout."""
    empty: list[str] = field(default_factory=list)
    """Shards with nothing to write (every record rejected), committed empty."""
    deletions: tuple[list[int], list] = ([], [])
    carried: list = field(default_factory=list)
    diff: ReindexDiff | None = None
    commits: bool = True
    """False when there is nothing to commit (a reindex that found no change)."""
    written_documents: list[int] = field(default_factory=lambda: [0])
    documents_of: dict[str, int] = field(default_factory=dict)

    def shard_written(self, shard_id: str) -> None:
        self.written_documents[0] += self.documents_of.get(shard_id, 0)

    def done(self, checkpointer: Checkpointer) -> int:
        """Progress in the work's unit: documents written, or chunks for a reindex."""
        return checkpointer.rows if self.diff is not None else self.written_documents[0]


def _build_work(spec: JobSpec, planned: _Planned, decision: _Decision, plan: ReadPlan,
                chunk: Callable[[pa.Table], pa.Table], schema: pa.Schema) -> _Work:
    """A build: every pending shard read from the source, chunked in its own stage."""
    import ray.data

    appending = decision.action in ("resume", "finished")
    pending = [s for s in plan.shards if s.shard_id not in decision.done]
    to_read = [s for s in pending if s.documents]

    def dataset(layout: ActorLayout):
        # every pending shard, so a file's run is not cut by an all-rejected one
        shards = ShardDatasource(pending, source=spec.source, metadata=plan.metadata,
                                 chosen=plan.chosen, skips=plan.skips,
                                 tasks=2 * max(1, int(planned.cpus // layout.read_cpus)))
        ds = ray.data.read_datasource(shards, override_num_blocks=len(shards.groups),
                                      num_cpus=layout.read_cpus)
        return ds.map_batches(ChunkBlocks(chunk), batch_size=None, batch_format="pyarrow",
                              num_cpus=layout.chunk_cpus)

    return _Work(
        mode="append" if appending else "create",
        # rows must match the table as it is (a column added later sits last)
        schema=decision.existing.schema if appending else schema,
        read_version=decision.existing.version if appending else None,
        pending=pending, to_read=to_read, size=sum(s.documents for s in pending),
        unit="documents", label="embedding", dataset=dataset,
        empty=[s.shard_id for s in pending if not s.documents],
        documents_of={s.shard_id: s.documents or 0 for s in to_read})


def _reindex_work(spec: JobSpec, planned: _Planned, existing: lance.LanceDataset,
                  plan: ReadPlan, chunk: Callable[[pa.Table], pa.Table],
                  schema_change: dict | None) -> _Work:
    """A reindex: the diff (changed chunks left tokenized, kept rows rewritten), its
    deletion vectors written by cluster tasks, all for one `Update` commit."""
    import ray.data

    assert planned.documents is not None  # planned with a table to compare with
    task_cpus = min(1.0, planned.cpus)
    diff, reindex_seconds = plan_reindex(
        existing, plan, planned.documents, spec, chunk=chunk, schema=existing.schema,
        task_cpus=task_cpus, cpus=planned.cpus)
    planned.documents = None  # the buckets can go from the object store
    diff.seconds, diff.schema_change = reindex_seconds, schema_change
    progress(f"reindex: {diff.added} chunks added, {diff.changed} changed, "
             f"{diff.deleted} deleted, {diff.carried_rows} kept their vectors "
             f"({diff.seconds['chunk_diff']:.1f}s)")
    removed, updated, report = delete_on_cluster(
        existing, diff.remove, storage_options=spec.write.storage_options,
        task_cpus=task_cpus, slots=max(1, int(planned.cpus)))
    diff.seconds["deletions"], diff.deletion_tasks = report["seconds"], report["tasks"]
    pending = [s for s in plan.shards if s.shard_id in diff.todo]
    return _Work(
        mode="update", schema=existing.schema, read_version=existing.version,
        pending=pending, to_read=pending, size=diff.embed, unit="chunks", label="reindex",
        dataset=lambda layout: ray.data.from_arrow_refs(diff.chunks),
        deletions=(removed, updated), carried=diff.carried, diff=diff,
        commits=not diff.nothing)


@dataclass
class _Finished:
    """What `_finish` did after the last commit."""

    report: IndexReport | None = None
    change_report: dict | None = None
    cleaned: int = 0
    compaction: dict | None = None


def _finish(spec: JobSpec, planned: _Planned, decision: _Decision, run: Checkpointer,
            diff: ReindexDiff | None) -> _Finished:
    """Compact what the job wrote, index it, move the `current` tag, mark the job done,
    clean versions."""
    manifest, opts = decision.manifest, spec.write.storage_options
    # Opened before the lease check below, and kept: each compaction, index build and
    # config write here commits from this object's version (it moves to each commit it
    # makes), so a takeover after the check, which fences the table with a Restore, makes
    # Lance refuse them. Opening the latest version after the check would build on top
    # of the fence.
    final = run.table()
    if not run.versions and decision.action in ("finished", "resume") and \
            job_finished(final, job=planned.job):
        return _Finished()  # nothing new: a finished job's rerun touches nothing
    if diff is not None and diff.nothing:
        return _Finished()  # a reindex that found no change: no index work, no commit
    if planned.lease is not None:
        planned.lease.check()  # a run that was taken over leaves the table alone
    builder = LOCAL
    if final.count_rows() >= spec.index.distributed_min_rows:
        builder = ClusterBuilder(index_workers(planned.cpus), opts, lease=planned.lease)
    # A reindex or cut-over leaves the fragments the table held before it as they are:
    # the rewrite costs what the job wrote, not the table. A build (or its resume) made
    # every fragment of the table itself.
    before = decision.existing
    settled = {f.fragment_id for f in before.get_fragments()} \
        if before is not None and decision.action in ("reindex", "cutover") else set()
    compaction = _compact(final, builder, settled) if spec.write.compact else None
    progress(f"indexing {final.count_rows()} rows")
    # The stored manifest: a new table's code is fitted after the decision was made.
    code = TableManifest.from_schema(final.schema, where=spec.table).vectors.code
    if diff is not None:
        report = maintain_indices(final, spec.index, metric=manifest.metric,
                                  codecs=manifest.vectors.codecs, dims=manifest.vectors.dims,
                                  changed=diff.embed + diff.carried_rows + diff.deleted,
                                  code=code, builder=builder)
    else:
        report = build_indices(final, spec.index, metric=manifest.metric,
                               codecs=manifest.vectors.codecs, dims=manifest.vectors.dims,
                               code=code, builder=builder)
    # Before the tag, so it tags the last version; fenced by the lease's epoch.
    mark_finished(final, job=planned.job, storage_options=opts,
                  epoch=planned.lease.record.epoch if planned.lease is not None else 0)
    change_report = cut_over(run.table(), manifest, compare=spec.write.compare_queries,
                             lease=planned.lease)  # the lease is a tag's only fence
    if change_report and change_report.get("held"):
        progress(change_report["hint"])
    elif change_report:
        progress(f"cut over: {change_report}")
    final = run.table()
    cleaned = 0
    if not spec.write.keep_checkpoints and run.versions:
        # Every version this job made before the last: the empty table it created,
        # checkpoints and index builds.
        first = run.created if run.created is not None else run.versions[0]
        cleaned = cleanup_checkpoints(final, range(first, final.version))
    cleaned += cleanup_versions(run.table(), spec.write)
    return _Finished(report, change_report, cleaned, compaction)


def _compact(ds: lance.LanceDataset, builder: Builder, settled: set[int]) -> dict | None:
    """Compact the fragments this job wrote when there are more than
    `COMPACT_MIN_FRAGMENTS` of them; the report for the summary, None when skipped."""
    written = sum(f.fragment_id not in settled for f in ds.get_fragments())
    if written <= COMPACT_MIN_FRAGMENTS:
        return None
    started = time.perf_counter()
    progress(f"compacting the {written} fragments this job wrote "
             f"({f'{builder.workers} workers' if builder.workers else 'on the driver'})")
    rewritten = builder.compact(ds, settled=settled)
    return {"fragments_written": written, "fragments_rewritten": rewritten,
            "fragments_after": len(ds.checkout_version(ds.latest_version).get_fragments()),
            "seconds": round(time.perf_counter() - started, 2),
            "workers": builder.workers}


def run_embed(spec: JobSpec, *, wait: bool = False) -> JobSummary:
    """Run an embed job to completion (or resume one) and index the table, holding the
    table's lease throughout (`operators.lease`).

    Args:
        spec: The job.
        wait: When another run holds the table's lease, wait for it instead of failing.

    Raises:
        SpecError, SourceError, ModelError: before any work starts.
        TableError: when the table exists and was made by another job.
        LeaseHeldError: another live run is writing the table (and `wait` is off).
        LeaseLostError: this run stalled past the lease timeout and was taken over; it
            committed nothing after that.
    """
    started, started_at = time.perf_counter(), time.time()
    spec = with_absolute_paths(spec, base=Path.cwd())  # what the Ray workers read and write
    lease = Lease.acquire(spec.table, spec.write.storage_options, wait=wait,
                          purpose=f"a quiver run of {spec.source.uri}")
    early = EarlyEmbedder()
    try:
        return _run_embed(spec, lease, started, started_at, early)
    finally:
        early.kill()
        lease.release()


def node_clock(spec: JobSpec, started: float) -> NodeClock:
    """The job's node clock, naming nodes by `cost.cluster_yaml`'s node types.

    Raises:
        SpecError: the cluster.yaml cannot be read or names no node types.
    """
    types = {}
    if spec.cost.cluster_yaml:
        try:
            types = launcher_node_types(spec.cost.cluster_yaml)
        except (OSError, ValueError) as err:
            raise SpecError(f"cost.cluster_yaml: {err}") from None
    return NodeClock(cluster_nodes, node_types=types, started=started)


def _run_embed(spec: JobSpec, lease: Lease, started: float, started_at: float,
               early: EarlyEmbedder) -> JobSummary:
    clock = node_clock(spec, started)
    info = describe_model(spec.model)
    existing = _open_existing(spec.table, spec.write.storage_options)
    counts, listing = unchanged_counts(spec, existing, _shaping(spec, info))
    if counts is not None:  # the same inputs and embedding: the code must match too
        _check_code(spec, TableManifest.from_schema(existing.schema, where=spec.table),
                    spec.table)
        return _unchanged_summary(spec, existing, counts, started)
    listing = _start_early(spec, info, existing, listing, early)
    planned = _plan(spec, started, info, listing)
    planned.lease, planned.early = lease, early
    planned.meter, planned.clock = DriverMeter(spec.table), clock
    clock.sample()
    planned.meter.totals(documents_read=planned.plan.documents + planned.plan.rejected,
                         documents_rejected=planned.plan.rejected)
    decision = _decide(spec, planned)
    if decision.action != "reindex":
        planned.documents = None  # nothing to compare: the buckets leave the object store
    run, layout, diff, embedded, embed_seconds = _execute(spec, planned, decision)
    run.seconds["plan"] = planned.plan_seconds
    index_started = time.perf_counter()
    finished = _finish(spec, planned, decision, run, diff)
    report, change_report, cleaned = finished.report, finished.change_report, finished.cleaned
    index_seconds = time.perf_counter() - index_started
    plan, uri = planned.plan, spec.table
    final = run.table()
    if spec.source.limit is None:  # a rerun of these inputs on this version does nothing
        record_inputs(spec, version=final.version, rows=final.count_rows(),
                      key=planned.listing_key, plan=plan)
    # older plannings' left-out records: no saved plan names them (the lease is held)
    drop_skips(spec.table, spec.write.storage_options, own=plan.skips)
    pending = len(plan.shards) - len(decision.done)
    planned.meter.totals(documents_embedded=embedded, chunks=run.rows, tokens=run.tokens,
                         commits=len(run.versions))
    clock.sample()
    node_hours = clock.node_hours()
    index = "unchanged" if report is None else \
        report.vector + ("; " + ", ".join(report.scalar) if report.scalar else "")
    return JobSummary(
        table=uri,
        version=final.version,
        documents=plan.documents,
        chunks=final.count_rows(),
        rejects=plan.rejected,
        excluded=plan.excluded,
        reject_reasons=dict(plan.reject_reasons),
        shards=len(plan.shards),
        shards_skipped=len(plan.shards) - pending if diff is None else
        len(plan.shards) - len(diff.todo),
        tokens=run.tokens,
        truncated_tokens=run.truncated_tokens,
        tokens_per_s=round(run.tokens / embed_seconds, 1) if embed_seconds else math.nan,
        documents_per_s=round(embedded / embed_seconds, 2) if embed_seconds else math.nan,
        embed_seconds=round(embed_seconds, 2),
        index=index,
        index_seconds=round(index_seconds, 2),
        table_bytes=_table_bytes(uri) if "://" not in uri else -1,
        seconds=round(time.perf_counter() - started, 2),
        rejects_table=rejects_uri(uri) if plan.rejected else None,
        reindex=None if diff is None else {
            "added": diff.added, "changed": diff.changed, "deleted": diff.deleted,
            "unchanged": final.count_rows() - run.rows, "carried": diff.carried_rows,
            "embedded": run.rows,
            "documents": {"added": diff.docs_added, "changed": diff.docs_changed,
                          "deleted": diff.docs_deleted},
            "seconds": {k: round(v, 2) for k, v in diff.seconds.items()},
            "deletion_tasks": diff.deletion_tasks, "schema_change": diff.schema_change},
        versions_cleaned=cleaned,
        compaction=finished.compaction,
        cutover=change_report,
        files=plan.files,
        files_skipped=plan.skipped,
        commits=len(run.versions),
        first_commit_s=None if run.first_commit_at is None
        else round(run.first_commit_at - started_at, 2),
        model_loads=run.model_loads,
        source_bytes_read=plan.bytes_read,
        commit_seconds=run.commit_seconds,
        node_hours=node_hours,
        cost=job_cost(node_hours, spec.cost.prices, documents=embedded, tokens=run.tokens,
                      currency=spec.cost.currency),
        profile=stage_profile(
            run.seconds, ray_start=planned.ray_start, actors=layout.actors,
            embed_seconds=embed_seconds,
            first_block=run.first_embedded_at - started_at
            if run.first_embedded_at is not None else None,
            first_load=load_times(sorted(run.loads)), started_at=started_at,
            early=early.used),
    )


def _unchanged_summary(spec: JobSpec, existing: lance.LanceDataset, counts: dict,
                       started: float) -> JobSummary:
    """The summary of a rerun that found the finished job's inputs unchanged."""
    progress(f"unchanged: the {counts['files']} source file(s) and the settings match the "
             f"finished job's; nothing read ({counts['check_seconds']:.2f}s)")
    return JobSummary(
        table=spec.table, version=existing.version, documents=counts["documents"],
        chunks=existing.count_rows(), rejects=counts["rejected"],
        reject_reasons=counts["reasons"], shards=counts["shards"],
        shards_skipped=counts["shards"], tokens=0, truncated_tokens=0,
        tokens_per_s=math.nan, documents_per_s=math.nan, embed_seconds=0.0,
        index="unchanged", index_seconds=0.0,
        table_bytes=_table_bytes(spec.table) if "://" not in spec.table else -1,
        seconds=round(time.perf_counter() - started, 2),
        rejects_table=rejects_uri(spec.table) if counts["rejected"] else None,
        files=counts["files"], files_skipped=counts["skipped"], excluded=counts["excluded"],
        source_bytes_read=0)
