"""The embed job: plan on the driver, embed on a Ray actor pool, commit per checkpoint.

    plan (driver)  → rejects written, shards listed, table checked
    per checkpoint: read shards (tasks) → chunk + tokenize (tasks)
                    → embed (actor pool, token-budget batches) → write fragments (tasks)
                    → commit (driver, one Lance transaction naming the shards it covers)
    index (driver) → BTREE on id, ANN on vector when the table is large

A rerun of the same job (same source files, same embedding configuration) reads the
shards already committed from the table's transaction log and does only the rest.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib.metadata import version

import lance
import pyarrow as pa

from jobs._calibrate import calibrate_ranges, sample_chunks
from jobs._cutover import CURRENT_TAG, cut_over, pin_current
from jobs._lance_io import LanceCommitSink, ShardDatasource
from jobs._ray import cluster_resources, ensure_ray, largest_node_cpus
from operators.chunk import Chunker
from operators.embed import Embedder, resolve_precision
from operators.index import build_indices, cleanup_versions, maintain_indices
from operators.model import ModelInfo, describe_model
from operators.quantize import Codebook
from operators.read import ReadPlan, plan_source
from operators.reindex import ReindexDiff, deletion_fragments, diff_chunks
from operators.write import committed_shards, remove_orphans
from schemas.errors import ManifestMismatchError, SourceError, SpecError, TableError
from schemas.manifest import (
    ChunkingManifest,
    ModelManifest,
    SourceManifest,
    TableManifest,
    VectorsManifest,
)
from schemas.records import REJECTS_SCHEMA, table_schema
from schemas.spec import JobSpec, Precision

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
    cutover: dict | None = None
    """When the embedding configuration changed: old and new versions, top-10 overlap."""
    profile: dict | None = None
    """Where the time went (see `stage_profile`)."""

    def to_dict(self) -> dict:
        return asdict(self)


def _progress(message: str) -> None:
    print(f"[quiver] {message}", file=sys.stderr, flush=True)


def rejects_uri(table_uri: str) -> str:
    """The rejects dataset sits next to its table: `x.lance` → `x.rejects.lance`."""
    base = table_uri[: -len(".lance")] if table_uri.endswith(".lance") else table_uri
    return f"{base}.rejects.lance"


def build_manifest(spec: JobSpec, info: ModelInfo, *, precision: Precision) -> TableManifest:
    """The manifest a table written by this spec carries (with the resolved precision)."""
    chunk_tokens = min(spec.chunking.max_tokens or info.max_tokens, info.max_tokens)
    dims = spec.vectors.dims or info.dim
    if dims > info.dim:
        raise SpecError(f"vectors.dims ({dims}) exceeds the model's dimension ({info.dim})")
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


def _job_fingerprint(plan: ReadPlan, manifest: TableManifest, spec: JobSpec) -> str:
    parts = [plan.fingerprint, manifest.embedding_fingerprint(),
             str(spec.source.records_per_shard), ",".join(s.shard_id for s in plan.shards)]
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


@dataclass(frozen=True)
class ActorLayout:
    """How the embed stage is placed on the cluster."""

    actors: int
    cpus: float
    """Logical CPUs each actor holds."""
    gpus: float
    threads: int
    """torch threads inside each actor."""
    task_cpus: float = 1.0
    """Logical CPUs each read/chunk and write task asks for: what the actors leave free."""


def _uses_gpus(spec: JobSpec, gpus: float) -> bool:
    """Whether the embed actors run on GPUs: the cluster has one and the spec allows it."""
    return gpus >= 1 and spec.model.device != "cpu"


def actor_layout(spec: JobSpec, *, cpus: float, gpus: float, cores: int,
                 documents: int | None = None, node_cpus: float | None = None) -> ActorLayout:
    """Place the embed actors.

    One actor per GPU when the cluster has GPUs (unless the spec pins the CPU). On CPU,
    one single-threaded actor per logical CPU, but no more actors than there are batches
    of work (`documents` / `rows_per_batch`): each model copy costs a few seconds to load.
    One thread per actor beats one actor with every thread: measured with bf16 on two
    cores, two 1-thread processes run the forward pass 8% faster together than one
    2-thread process, and a core taken by a read task or a Ray daemon stalls one actor
    instead of every thread of a parallel matmul. Together the actors hold at most all
    CPUs but one, so read/chunk and write tasks always find a CPU: actors holding every
    CPU of a two-core machine starve the read tasks and the job hangs. The share is
    sized on the largest node (`node_cpus`), not the whole cluster: when nodes die, Ray
    restarts their actors on the survivors, and even all of them on one node must leave
    a CPU free there.

    >>> from schemas.spec import parse_spec
    >>> s = parse_spec({"kind": "embed", "table": "t.lance",
    ...                 "source": {"uri": "c.jsonl", "id_field": "_id"}})
    >>> actor_layout(s, cpus=16, gpus=4, cores=16)
    ActorLayout(actors=4, cpus=1.0, gpus=1.0, threads=1, task_cpus=1.0)
    >>> actor_layout(s, cpus=2, gpus=0, cores=2)
    ActorLayout(actors=2, cpus=0.5, gpus=0.0, threads=1, task_cpus=1.0)
    >>> actor_layout(s, cpus=2, gpus=0, cores=2, documents=40)  # one batch of work
    ActorLayout(actors=1, cpus=1.0, gpus=0.0, threads=2, task_cpus=1.0)
    >>> actor_layout(s, cpus=2, gpus=0, cores=2, documents=0).actors  # a finished job
    1
    >>> actor_layout(s, cpus=1, gpus=0, cores=1)  # one CPU: actor and tasks share it
    ActorLayout(actors=1, cpus=0.5, gpus=0.0, threads=1, task_cpus=0.5)
    >>> lay = actor_layout(s, cpus=3, gpus=0, cores=2, node_cpus=2)  # nodes of 2 and 1 CPU
    >>> lay.actors, round(lay.actors * lay.cpus, 2)  # all on the 2-CPU node: 1 CPU free
    (3, 1.0)
    >>> many = parse_spec({**s.model_dump(), "compute": {"actors": 1000}})
    >>> actor_layout(many, cpus=2, gpus=0, cores=2).task_cpus  # still a CPU for tasks
    1.0
    """
    if _uses_gpus(spec, gpus):
        actors = spec.compute.actors or int(gpus)
        return ActorLayout(actors, 1.0, 1.0, spec.compute.torch_threads or 1)
    actors = spec.compute.actors
    if actors is None:
        batches = int(cpus) if documents is None \
            else math.ceil(documents / spec.compute.rows_per_batch)
        actors = max(1, min(int(cpus), batches))
    room = min(cpus, node_cpus or cpus)
    per_actor = min(1.0, (room - 1) / actors) if room > 1 else room / (2 * actors)
    threads = spec.compute.torch_threads or max(1, cores // actors)
    return ActorLayout(actors, per_actor, 0.0, threads,
                       task_cpus=round(min(1.0, room - actors * per_actor), 4))


def stage_profile(seconds: dict[str, float], *, ray_start: float, first_block: float | None,
                  actors: int, embed_seconds: float) -> dict:
    """The job's time by stage, in seconds.

    `read`/`tokenize` and `write` are summed over Ray tasks, `forward`/`pool`/`quantize`
    over embed actors (so with two actors they can add up to twice the wall time);
    `commit` is the driver's. `ray_start` and `first_block` are wall time from the job's
    start: Ray up, and the first embedded block out of an actor. `actor_idle` is the
    actors' share of the embed phase not spent on a batch: model loading, waiting for
    blocks, the tail, and whatever Ray's own processes took from them.

    >>> stage_profile({"forward": 50.0, "pool": 1.0, "quantize": 1.0}, ray_start=3.0,
    ...               first_block=12.0, actors=2, embed_seconds=30.0)["actor_idle"]
    8.0
    """
    busy = sum(seconds.get(s, 0.0) for s in ("forward", "pool", "quantize"))
    profile = {stage: round(seconds.get(stage, 0.0), 4)
               for stage in ("read", "tokenize", "forward", "pool", "quantize", "write",
                             "commit")}
    return {**profile, "ray_start": round(ray_start, 2),
            "first_block": None if first_block is None else round(first_block, 2),
            "actors": actors, "actor_idle": round(max(0.0, actors * embed_seconds - busy), 2)}


def _check_reject_rate(spec: JobSpec, plan: ReadPlan) -> None:
    """Fail before anything is written when more records are bad than the spec tolerates."""
    limit = spec.source.max_reject_rate
    if limit is None or not plan.records:
        return
    rate = plan.rejects.num_rows / plan.records
    if rate > limit:
        top = ", ".join(f"{n} x {reason}" for reason, n in plan.reject_reasons.most_common(3))
        raise SourceError(f"{spec.source.uri}: {plan.rejects.num_rows} of {plan.records} "
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
        _progress(message)


def _calibrated(manifest: TableManifest, spec: JobSpec, plan: ReadPlan,
                chunk: Callable[[pa.Table], pa.Table], info: ModelInfo) -> TableManifest:
    """The manifest with int8 ranges measured on a sample of the corpus."""
    started = time.perf_counter()
    sample = sample_chunks(plan.shards, source=spec.source, metadata=plan.metadata,
                           chunker=chunk, wanted=spec.vectors.calibration_sample)
    vectors = manifest.vectors
    if sample:
        embedder = Embedder(info, precision=resolve_precision(spec.model.precision,
                                                              on_gpu=False),
                            device="cpu", batch_tokens=spec.compute.batch_tokens,
                            torch_threads=os.cpu_count() or 1,
                            trust_remote_code=spec.model.trust_remote_code)
        low, high = calibrate_ranges(embedder, sample, dims=vectors.dims,
                                     renormalize=info.normalize and vectors.truncated)
    else:  # nothing to sample: the widest range a normalised vector can span
        low, high = [-1.0] * vectors.dims, [1.0] * vectors.dims
    _progress(f"int8 calibrated on {len(sample)} chunks in "
              f"{time.perf_counter() - started:.1f}s")
    return manifest.model_copy(update={"vectors": vectors.model_copy(
        update={"int8_low": low, "int8_high": high})})


def _embed_stage(ds, *, info: ModelInfo, spec: JobSpec, layout: ActorLayout,
                 precision: Precision, codebook: Codebook):
    """The embed actor pool over chunk rows (token ids in, codec columns out)."""
    from ray.data import ActorPoolStrategy

    if layout.actors > 1:
        # Streaming split into rows_per_batch-row blocks: Ray Data hands one block to one
        # actor, so a shard-sized block would keep one actor busy while the others idle.
        ds = ds.repartition(target_num_rows_per_block=spec.compute.rows_per_batch)
    return ds.map_batches(
        Embedder,
        fn_constructor_args=(info,),
        fn_constructor_kwargs=dict(
            precision=precision, device=spec.model.device,
            batch_tokens=spec.compute.batch_tokens, torch_threads=layout.threads,
            trust_remote_code=spec.model.trust_remote_code, codebook=codebook,
        ),
        compute=ActorPoolStrategy(size=layout.actors),
        num_cpus=layout.cpus,
        num_gpus=layout.gpus,
        batch_size=spec.compute.rows_per_batch,
        batch_format="pyarrow",
    )


def _diff_with_table(existing: lance.LanceDataset, plan: ReadPlan, spec: JobSpec,
                     chunk: Callable[[pa.Table], pa.Table]) -> ReindexDiff:
    """First reindex pass: chunk every shard in Ray tasks, keep only (id, hash, shard)."""
    import ray.data

    fresh_ds = ray.data.read_datasource(
        ShardDatasource(plan.shards, source=spec.source, metadata=plan.metadata,
                        chunker=chunk, hashes_only=True),
        override_num_blocks=max(1, len(plan.shards)),
    )
    blocks = [ray.get(ref) for ref in fresh_ds.to_arrow_refs()]
    fresh = pa.concat_tables(blocks) if blocks else pa.table(
        {"id": pa.array([], pa.string()), "content_hash": pa.array([], pa.binary(16)),
         "shard": pa.array([], pa.string())})
    rows = existing.to_table(columns=["id", "content_hash"], with_row_address=True)
    return diff_chunks(rows, fresh)


def run_embed(spec: JobSpec) -> JobSummary:
    """Run an embed job to completion (or resume one) and index the table.

    Raises:
        SpecError, SourceError, ModelError: before any work starts.
        TableError: when the table exists and was made by another job.
    """
    import ray.data

    started, started_at = time.perf_counter(), time.time()
    info = describe_model(spec.model)
    plan = plan_source(spec.source)
    _progress(f"source {spec.source.uri}: {plan.records} records, {plan.documents} valid, "
              f"{plan.rejects.num_rows} rejected, {len(plan.shards)} shards ({plan.kind})")
    _check_filterable(spec, plan)
    _check_reject_rate(spec, plan)
    ensure_ray()
    ray_start = time.perf_counter() - started
    cpus, gpus = cluster_resources()
    precision = resolve_precision(spec.model.precision, on_gpu=_uses_gpus(spec, gpus))
    manifest = build_manifest(spec, info, precision=precision)
    _progress(f"model {spec.model.name}: dim {info.dim}, {info.pooling} pooling, "
              f"normalize={info.normalize}, max {info.max_tokens} tokens, {precision}")
    _warn_untrained_truncation(info, manifest.vectors)
    job = _job_fingerprint(plan, manifest, spec)
    uri = spec.table
    opts = spec.write.storage_options

    existing = _open_existing(uri, opts)
    done: set[str] = set()
    reindex = False
    cutover = False
    if existing is not None and spec.write.mode == "create":
        old = TableManifest.from_schema(existing.schema, where=uri)
        try:
            old.check_same_embedding(manifest, where=uri)
        except ManifestMismatchError as err:
            if spec.write.on_config_change == "refuse":
                raise
            cutover = True
            pinned = pin_current(existing)  # readers stay on the old model meanwhile
            _progress(f"{err}\n[quiver] cut-over: the new configuration is written as new "
                      f"versions; tag '{CURRENT_TAG}' stays on version {pinned} until the "
                      "new table is complete and indexed")
    if existing is not None and spec.write.mode == "create" and not cutover:
        manifest = manifest.model_copy(update={"vectors": old.vectors})  # keep its ranges
        done = committed_shards(existing, job=job)
        if done:
            orphans = remove_orphans(existing, opts)
            _progress(f"resuming: {len(done)} of {len(plan.shards)} shards already committed"
                      + (f"; removed {orphans} data files an interrupted run left uncommitted"
                         if orphans else ""))
        elif _same_source(old.source.uri, spec.source.uri) or spec.kind == "reindex":
            reindex = True
        else:
            raise TableError(
                f"{uri} already exists and holds {old.source.uri}, not {spec.source.uri}; "
                "use kind: reindex to make it follow the new source, write.mode: overwrite "
                "to replace it, or pick another table"
            )

    rejects_path = rejects_uri(uri)
    if plan.rejects.num_rows or _open_existing(rejects_path, opts) is not None:
        lance.write_dataset(plan.rejects.cast(REJECTS_SCHEMA), rejects_path, mode="overwrite",
                            storage_options=opts or None)

    pending = [s for s in plan.shards if s.shard_id not in done]
    groups = [pending[i : i + spec.write.shards_per_commit]
              for i in range(0, len(pending), spec.write.shards_per_commit)]
    if not plan.shards and existing is None:
        groups = [[]]  # an empty source still makes an (empty) table
    chunk_tokens = manifest.chunking.max_tokens
    chunker_kwargs = dict(
        max_tokens=chunk_tokens, overlap=spec.chunking.overlap, mode=spec.chunking.mode,
        document_prefix=info.document_prefix, metadata=plan.metadata,
        config_fingerprint=manifest.embedding_fingerprint(),
        trust_remote_code=spec.model.trust_remote_code,
    )
    model_path = info.path

    def chunk(docs: pa.Table) -> pa.Table:
        return Chunker(model_path, **chunker_kwargs)(docs)

    if "int8" in manifest.vectors.codecs and manifest.vectors.int8_low is None:
        manifest = _calibrated(manifest, spec, plan, chunk, info)
    schema = table_schema(plan.metadata, dim=manifest.vectors.dims,
                          codecs=manifest.vectors.codecs).with_metadata(manifest.to_metadata())
    codebook = Codebook.from_manifest(manifest.vectors, normalize=info.normalize)

    version_now = existing.version \
        if existing is not None and spec.write.mode == "create" and not cutover else None
    mode = "append" if version_now is not None else "create"
    keep = None
    deletions: tuple[list[int], list] = ([], [])
    diff: ReindexDiff | None = None
    if reindex:
        diff = _diff_with_table(existing, plan, spec, chunk)
        _progress(f"reindex: {diff.added} added, {diff.changed} changed, {diff.deleted} "
                  f"deleted, {diff.unchanged} unchanged chunks")
        pending = [s for s in plan.shards if s.shard_id in diff.todo]
        groups = [pending]  # one commit: readers see the old table or the new one
        keep = {sid: frozenset(ids) for sid, ids in diff.todo.items()}
        deletions = deletion_fragments(existing, diff.remove)
        mode = "update"
        done = set()
    work = diff.embed if diff is not None else sum(s.records - len(s.skip) for s in pending)
    layout = actor_layout(spec, cpus=cpus, gpus=gpus, cores=os.cpu_count() or 1,
                          documents=work, node_cpus=largest_node_cpus())
    _progress(f"embedding {work} {'chunks' if diff is not None else 'documents'} on "
              f"{layout.actors} actor(s) x {layout.threads} torch thread(s)"
              + (", 1 GPU each" if layout.gpus else ""))
    stage = dict(info=info, spec=spec, layout=layout, precision=precision, codebook=codebook)
    seen = existing.version if existing is not None else 0  # guards against other writers
    rows = tokens = truncated = 0
    seconds: Counter[str] = Counter()
    first_out: list[float] = []
    embed_started = time.perf_counter()
    for n, group in enumerate(groups, 1):
        ds = ray.data.read_datasource(
            ShardDatasource(group, source=spec.source, metadata=plan.metadata, chunker=chunk,
                            keep=keep),
            override_num_blocks=max(1, len(group)), num_cpus=layout.task_cpus,
        )
        covered = {s.shard_id for s in plan.shards} if reindex \
            else done | {s.shard_id for s in group}
        sink = LanceCommitSink(
            uri, schema=schema, mode=mode, read_version=version_now, job=job,
            shards=sorted(covered), max_rows_per_file=spec.write.max_rows_per_file,
            storage_options=opts, deletions=deletions, expect_latest=seen,
        )
        _embed_stage(ds, **stage).write_datasink(
            sink, ray_remote_args={"num_cpus": layout.task_cpus})
        rows += sink.rows
        tokens += sink.tokens
        truncated += sink.truncated_tokens
        seconds.update(sink.seconds)
        if sink.first_embedded_at is not None:
            first_out.append(sink.first_embedded_at)
        version_now, mode, seen = sink.version, "append", sink.version
        done |= covered
        _progress(f"checkpoint {n}/{len(groups)} committed: version {sink.version}, "
                  f"{rows} chunks so far")
    embed_seconds = time.perf_counter() - embed_started

    final = lance.dataset(uri, storage_options=opts or None)
    index_started = time.perf_counter()
    _progress(f"indexing {final.count_rows()} rows")
    if diff is not None:
        report = maintain_indices(final, spec.index, metric=manifest.metric,
                                  codecs=manifest.vectors.codecs, dims=manifest.vectors.dims,
                                  changed=diff.embed + diff.deleted)
    else:
        report = build_indices(final, spec.index, metric=manifest.metric,
                               codecs=manifest.vectors.codecs, dims=manifest.vectors.dims)
    change_report = cut_over(final, manifest, compare=spec.write.compare_queries)
    if change_report:
        _progress(f"cut over to version {final.version}: {change_report}")
    final = lance.dataset(uri, storage_options=opts or None)
    cleaned = cleanup_versions(final, spec.write)
    index_seconds = time.perf_counter() - index_started
    final = lance.dataset(uri, storage_options=opts or None)
    embedded_docs = sum(s.records - len(s.skip) for s in pending)
    summary = JobSummary(
        table=uri,
        version=final.version,
        documents=plan.documents,
        chunks=final.count_rows(),
        rejects=plan.rejects.num_rows,
        reject_reasons=dict(plan.reject_reasons),
        shards=len(plan.shards),
        shards_skipped=len(plan.shards) - len(pending),
        tokens=tokens,
        truncated_tokens=truncated,
        tokens_per_s=round(tokens / embed_seconds, 1) if embed_seconds else math.nan,
        documents_per_s=round(embedded_docs / embed_seconds, 2) if embed_seconds else math.nan,
        embed_seconds=round(embed_seconds, 2),
        index=report.vector + ("; " + ", ".join(report.scalar) if report.scalar else ""),
        index_seconds=round(index_seconds, 2),
        table_bytes=_table_bytes(uri) if "://" not in uri else -1,
        seconds=round(time.perf_counter() - started, 2),
        rejects_table=rejects_path if plan.rejects.num_rows else None,
        reindex=None if diff is None else {
            "added": diff.added, "changed": diff.changed, "deleted": diff.deleted,
            "unchanged": diff.unchanged, "embedded": rows},
        versions_cleaned=cleaned,
        cutover=change_report,
        profile=stage_profile(
            seconds, ray_start=ray_start, actors=layout.actors, embed_seconds=embed_seconds,
            first_block=min(first_out) - started_at if first_out else None),
    )
    return summary
