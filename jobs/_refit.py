"""Give a table a fitted first-stage code from its stored float vectors: `quiver table
refit`.

Nothing is embedded again: the code is fitted on a sample of the table's own `vector`
column, its codebook is written beside the table (`operators.codebooks`), and Ray tasks
encode every fragment's vectors into a new `vector_code` data file (Lance's
`merge_columns`, a group of fragments per task). One Lance `Merge` commits them all,
with the manifest naming the code, read from the version the refit started at: a run
that took the table over in the meantime has fenced it (`operators.lease.fence`), so
Lance refuses the late commit. Readers' `current` tag follows unless a rollback holds
it. The embedding fingerprint does not change, so later jobs append to the table as
before and their actors encode new rows with the stored codebook.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping

import lance
import numpy as np
import pyarrow as pa
from lance.fragment import FragmentMetadata
from lance.schema import LanceSchema

from jobs._index import ClusterBuilder, index_workers
from jobs._maintenance import follow_current, open_dataset
from jobs._ray import cluster_resources, ensure_ray
from operators.codebooks import save_codebook
from operators.codecs import Codec, fit
from operators.index import LOCAL, build_code_index
from operators.lease import Lease
from operators.quantize import column_matrix, fixed_size_list
from schemas.errors import SpecError, TableError
from schemas.manifest import CodeManifest, TableManifest
from schemas.records import VECTOR_COLUMN, code_field, lance_indexed_code
from schemas.spec import CodeSpec, IndexSpec

Progress = Callable[[str], None]


def _encoder(codec: Codec) -> Callable[[pa.RecordBatch], pa.RecordBatch]:
    """The per-batch UDF Lance's `merge_columns` runs: float vectors in, codes out."""
    field = code_field(codec.name, codec.nbytes)
    schema = pa.schema([field])

    def encode(batch: pa.RecordBatch) -> pa.RecordBatch:
        vectors = column_matrix(batch.column(VECTOR_COLUMN)).astype(np.float32)
        codes = fixed_size_list(codec.encode(vectors), field.type)
        return pa.RecordBatch.from_arrays([codes], schema=schema)

    return encode


def encode_fragments(uri: str, version: int, fragment_ids: list[int], codebook: bytes,
                     storage_options: Mapping[str, str] | None) -> list[tuple[str, list]]:
    """One task's fragments encoded into new `vector_code` data files (not committed):
    each fragment's metadata as JSON, with the schema Lance gives the merged fragment."""
    ds = lance.dataset(uri, version=version,
                       storage_options=dict(storage_options) if storage_options else None)
    encode = _encoder(Codec.from_bytes(codebook))
    out = []
    for fid in fragment_ids:
        meta, schema = ds.get_fragment(fid).merge_columns(encode, columns=[VECTOR_COLUMN])
        out.append((json.dumps(meta.to_json()), _field_ids(schema)))
    return out


def _field_ids(schema: LanceSchema) -> list:
    """Every field's name and Lance id, nested fields included, in order."""
    def walk(field) -> tuple:
        return field.name(), field.id(), [walk(c) for c in field.children()]
    return [walk(f) for f in schema.fields()]


def refit(uri: str, *, name: str, nbytes: int, sample: int = 4096,
          storage_options: Mapping[str, str] | None = None, wait: bool = False,
          index_spec: IndexSpec | None = None,
          progress: Progress = lambda _: None) -> dict:
    """Fit `name` at `nbytes` per vector on `sample` of the table's float vectors and
    add it as `vector_code` in one commit (see the module docstring); a Lance-indexed
    code (`pca-rq`) then gets its IVF_RQ index when the table has `index_spec`'s
    `ann_min_rows` (default 100k), in a second commit.

    Raises:
        SpecError: an unknown code, or a budget it cannot meet on these vectors.
        TableError: the table stores no float vectors, or already has a code (replacing
            one is not built yet).
    """
    try:
        wanted = CodeSpec(name=name, bytes=nbytes, sample=sample)
    except ValueError as err:
        raise SpecError(f"refit: {err}") from None
    started = time.perf_counter()
    opts = dict(storage_options) if storage_options else None
    with Lease.acquire(uri, storage_options, wait=wait, purpose="quiver table refit") as lease:
        ds = open_dataset(uri, storage_options)
        manifest = TableManifest.from_schema(ds.schema, where=uri)
        if manifest.vectors.code is not None:
            have = manifest.vectors.code
            raise TableError(f"{uri} already has the first-stage code {have.name} at "
                             f"{have.nbytes} bytes; replacing a code is not built yet")
        if VECTOR_COLUMN not in ds.schema.names:
            raise TableError(f"{uri} stores no float vectors to fit a code on")
        start, rows = ds.version, ds.count_rows()
        taken = ds.sample(min(wanted.sample, rows), columns=[VECTOR_COLUMN])
        vectors = column_matrix(taken.column(VECTOR_COLUMN)).astype(np.float32)
        try:
            codec = fit(vectors, wanted.name, wanted.bytes)
        except ValueError as err:
            raise SpecError(f"refit: {err} (sampled {len(vectors)} of {rows} rows)") from None
        sha = save_codebook(uri, codec, storage_options)
        progress(f"{codec.name} ({codec.nbytes} B/vector) fitted on {len(vectors)} rows; "
                 f"codebook {sha[:12]}")
        fragments = _encode_on_cluster(uri, ds, codec, storage_options, progress)
        code = CodeManifest(name=codec.name, nbytes=codec.nbytes, sha256=sha,
                            sample_rows=len(vectors))
        refitted = manifest.model_copy(update={"vectors": manifest.vectors.model_copy(
            update={"code": code})})
        metadata = {**(ds.schema.metadata or {}), **refitted.to_metadata()}
        schema = pa.schema([*ds.schema, code_field(codec.name, codec.nbytes)],
                           metadata=metadata)
        lease.check()
        done = lance.LanceDataset.commit(uri, lance.LanceOperation.Merge(fragments, schema),
                                         read_version=start, storage_options=opts)
        index = _index_code(done, code, index_spec or IndexSpec(), lease, opts, progress)
        moved = follow_current(done, start)
    return {"table": uri, "code": code.model_dump(), "rows": rows,
            "fragments": len(fragments), "version": done.latest_version, "index": index,
            "current_moved": moved, "seconds": round(time.perf_counter() - started, 2)}


def _index_code(ds: lance.LanceDataset, code: CodeManifest, spec: IndexSpec, lease: Lease,
                storage_options: dict[str, str] | None, progress: Progress) -> str | None:
    """A Lance-indexed code's IVF_RQ index, built as a job would (on the cluster from
    `spec.distributed_min_rows` rows) when the table has `spec.ann_min_rows` rows; the
    other codes are scanned and need none."""
    rows = ds.count_rows()
    if not lance_indexed_code(code.name) or rows < max(spec.ann_min_rows, 1):
        return None
    builder = LOCAL
    if rows >= spec.distributed_min_rows:
        builder = ClusterBuilder(index_workers(cluster_resources()[0]), storage_options or {},
                                 lease=lease)
    lease.check()
    progress(f"indexing {code.name} on {rows} rows")
    return build_code_index(ds, spec, code, builder=builder)


def _encode_on_cluster(uri: str, ds: lance.LanceDataset, codec: Codec,
                       storage_options: Mapping[str, str] | None,
                       progress: Progress) -> list[FragmentMetadata]:
    """Every fragment encoded by Ray tasks, two per CPU, the codebook put once; refuses
    when Lance would number the merged fields otherwise than the table's schema says."""
    import ray

    ensure_ray()
    ids = [f.fragment_id for f in ds.get_fragments()]
    tasks = max(1, min(len(ids), 2 * int(cluster_resources()[0] or 1)))
    groups = [ids[i::tasks] for i in range(tasks)]
    progress(f"encoding {len(ids)} fragments in {len(groups)} Ray tasks")
    book = ray.put(codec.to_bytes())
    remote = ray.remote(num_cpus=1)(encode_fragments)
    done = ray.get([remote.remote(uri, ds.version, g, book, storage_options)
                    for g in groups if g])
    metas = [m for part in done for m in part]
    expected = _field_ids(LanceSchema.from_pyarrow(
        pa.schema([*ds.schema, code_field(codec.name, codec.nbytes)])))
    if any(ids != expected for _, ids in metas):
        raise TableError(f"{uri}: Lance numbers this table's fields otherwise than its "
                         "schema lists them (a dropped or nested column); refit cannot "
                         "commit the code safely")
    return [FragmentMetadata.from_json(meta) for meta, _ in metas]
