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

Replacing a code (`--replace`) is the same one commit: its `Merge` names the new code's
field `vector_code` and leaves the old code's field out (Lance drops it as
`drop_columns` would, with any index on it), so a reader sees the old code or the new,
never neither, and no append can fall between two commits.
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
from operators.codebooks import load_codebook, save_codebook
from operators.codecs import Codec, fit, overlap_report
from operators.index import LOCAL, build_code_index
from operators.lease import Lease
from operators.quantize import column_matrix, fixed_size_list
from schemas.errors import SpecError, TableError
from schemas.manifest import CodeManifest, TableManifest
from schemas.records import CODE_COLUMN, VECTOR_COLUMN, code_field, lance_indexed_code
from schemas.spec import CodeSpec, IndexSpec

Progress = Callable[[str], None]
NEXT_CODE_COLUMN = "vector_code_next"
"""A replacement code's column as the Ray tasks write it; the commit names it `vector_code`."""
OVERLAP_ROWS = 20_000
"""Rows the replacement's overlap report compares the two codes on (200 of them ask)."""


def _encoder(codec: Codec, column: str) -> Callable[[pa.RecordBatch], pa.RecordBatch]:
    """The per-batch UDF Lance's `merge_columns` runs: float vectors in, codes out (as
    `column`: the code's own, or `NEXT_CODE_COLUMN` while it replaces another)."""
    field = code_field(codec.name, codec.nbytes).with_name(column)
    schema = pa.schema([field])

    def encode(batch: pa.RecordBatch) -> pa.RecordBatch:
        vectors = column_matrix(batch.column(VECTOR_COLUMN)).astype(np.float32)
        codes = fixed_size_list(codec.encode(vectors), field.type)
        return pa.RecordBatch.from_arrays([codes], schema=schema)

    return encode


def encode_fragments(uri: str, version: int, fragment_ids: list[int], codebook: bytes,
                     storage_options: Mapping[str, str] | None,
                     column: str = CODE_COLUMN) -> list[tuple[str, LanceSchema]]:
    """One task's fragments encoded into new `column` data files (not committed): each
    fragment's metadata as JSON, with the schema Lance gives the merged fragment."""
    ds = lance.dataset(uri, version=version,
                       storage_options=dict(storage_options) if storage_options else None)
    encode = _encoder(Codec.from_bytes(codebook), column)
    out = []
    for fid in fragment_ids:
        meta, schema = ds.get_fragment(fid).merge_columns(encode, columns=[VECTOR_COLUMN])
        out.append((json.dumps(meta.to_json()), schema))
    return out


def refit(uri: str, *, name: str, nbytes: int, sample: int = 4096,
          storage_options: Mapping[str, str] | None = None, wait: bool = False,
          replace: bool = False, index_spec: IndexSpec | None = None,
          progress: Progress = lambda _: None) -> dict:
    """Fit `name` at `nbytes` per vector on `sample` of the table's float vectors and
    add it as `vector_code` in one commit (see the module docstring); a Lance-indexed
    code (`pca-rq`) then gets its IVF_RQ index when the table has `index_spec`'s
    `ann_min_rows` (default 100k), in a later commit.

    With `replace`, a table that has a code gets the new one in its place, in the same
    one commit, and the result carries `overlap_report`'s comparison of the two on a
    sample of the table's rows.

    Raises:
        SpecError: an unknown code, or a budget it cannot meet on these vectors.
        TableError: the table stores no float vectors, or already has a code and
            `replace` was not given.
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
        old = manifest.vectors.code
        if old is not None and not replace:
            raise TableError(f"{uri} already has the first-stage code {old.name} at "
                             f"{old.nbytes} bytes; pass --replace (replace=True) to put "
                             "another in its place")
        if VECTOR_COLUMN not in ds.schema.names:
            raise TableError(f"{uri} stores no float vectors to fit a code on")
        start, rows = ds.version, ds.count_rows()
        vectors = _sample_vectors(ds, wanted.sample)
        try:
            codec = fit(vectors, wanted.name, wanted.bytes)
        except ValueError as err:
            raise SpecError(f"refit: {err} (sampled {len(vectors)} of {rows} rows)") from None
        sha = save_codebook(uri, codec, storage_options)
        progress(f"{codec.name} ({codec.nbytes} B/vector) fitted on {len(vectors)} rows; "
                 f"codebook {sha[:12]}")
        overlap = None
        if old is not None:  # measured on rows drawn again: not the ones it was fitted on
            overlap = overlap_report(_sample_vectors(ds, OVERLAP_ROWS),
                                     load_codebook(uri, old.sha256, storage_options), codec)
            progress(f"overlap on {overlap['rows']} rows: {overlap_line(overlap)}")
        column = NEXT_CODE_COLUMN if old is not None else CODE_COLUMN
        fragments, merged = _encode_on_cluster(uri, ds, codec, column, storage_options,
                                               progress)
        code = CodeManifest(name=codec.name, nbytes=codec.nbytes, sha256=sha,
                            sample_rows=len(vectors))
        refitted = manifest.model_copy(update={"vectors": manifest.vectors.model_copy(
            update={"code": code})})
        metadata = {**_text(ds.schema.metadata or {}), **_text(refitted.to_metadata())}
        schema = commit_schema(merged, column, metadata, where=uri)
        lease.check()
        done = lance.LanceDataset.commit(uri, lance.LanceOperation.Merge(fragments, schema),
                                         read_version=start, storage_options=opts)
        index = _index_code(done, code, index_spec or IndexSpec(), lease, opts, progress)
        moved = follow_current(done, start)
    return {"table": uri, "code": code.model_dump(), "rows": rows,
            "fragments": len(fragments), "version": done.latest_version, "index": index,
            "replaced": old.model_dump() if old is not None else None, "overlap": overlap,
            "current_moved": moved, "seconds": round(time.perf_counter() - started, 2)}


def _sample_vectors(ds: lance.LanceDataset, rows: int) -> np.ndarray:
    """A random sample of the stored float vectors (Lance's sample: no full scan)."""
    taken = ds.sample(min(rows, ds.count_rows()), columns=[VECTOR_COLUMN])
    return column_matrix(taken.column(VECTOR_COLUMN)).astype(np.float32)


def overlap_line(overlap: dict) -> str:
    """One line of `overlap_report`: each code's recall and what they share."""
    def code(side: dict) -> str:
        return side["code"] + (" (its projection, before Lance's RaBitQ)"
                               if side["by_projection"] else "")

    return (f"{code(overlap['old'])} finds {overlap['old']['recall']:.3f} and "
            f"{code(overlap['new'])} {overlap['new']['recall']:.3f} of the float top "
            f"{overlap['k']} among their top {overlap['depth']}; they share "
            f"{overlap['shared']:.3f} of those candidates ({overlap['queries']} queries)")


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


def _encode_on_cluster(uri: str, ds: lance.LanceDataset, codec: Codec, column: str,
                       storage_options: Mapping[str, str] | None,
                       progress: Progress) -> tuple[list[FragmentMetadata], LanceSchema]:
    """Every fragment encoded by Ray tasks, two per CPU, the codebook put once; with the
    schema Lance gives the merged fragments (refused unless every task got the same)."""
    import ray

    ensure_ray()
    ids = [f.fragment_id for f in ds.get_fragments()]
    tasks = max(1, min(len(ids), 2 * int(cluster_resources()[0] or 1)))
    groups = [ids[i::tasks] for i in range(tasks)]
    progress(f"encoding {len(ids)} fragments in {len(groups)} Ray tasks")
    book = ray.put(codec.to_bytes())
    remote = ray.remote(num_cpus=1)(encode_fragments)
    done = ray.get([remote.remote(uri, ds.version, g, book, storage_options, column)
                    for g in groups if g])
    metas = [m for part in done for m in part]
    schemas = {_fields(schema) for _, schema in metas}
    if len(schemas) != 1:
        raise TableError(f"{uri}: the refit's tasks merged their fragments into different "
                         f"schemas ({sorted(schemas)}); nothing was committed")
    return [FragmentMetadata.from_json(meta) for meta, _ in metas], metas[0][1]


def _text(metadata: Mapping) -> dict[str, str]:
    """Schema metadata with str keys and values (pyarrow gives bytes)."""
    return {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes)
                                                          else v)
            for k, v in metadata.items()}


def _fields(schema: LanceSchema) -> tuple[tuple[str, int], ...]:
    """Every top-level field's name and Lance id, in order."""
    return tuple((f.name(), f.id()) for f in schema.fields())


def commit_schema(merged: LanceSchema, column: str, metadata: Mapping[str, str], *,
                  where: str) -> LanceSchema:
    """The schema the refit commits, from the one Lance gave the merged fragments, so
    that every field keeps its Lance id: the new code's `column` named `vector_code`, a
    replaced code's field left out, and `metadata` (the manifest naming the new code).

    pylance builds a LanceSchema with chosen ids only from its pickle form (metadata as
    JSON, one protobuf `Field` message per field), so the rename rewrites the name
    (field 2) of the new code's message; the result is checked field by field before
    anything commits.

    Raises:
        TableError: the schema built is not the one meant (another pylance's form).
    """
    _, (_, *protos) = merged.__reduce__()
    replacing = column != CODE_COLUMN
    kept = [(message, name, fid) for message, (name, fid)
            in zip(protos, _fields(merged), strict=True)
            if not (replacing and name == CODE_COLUMN)]
    schema = LanceSchema._from_protos(
        json.dumps({k: list(v.encode()) for k, v in metadata.items()}),
        *(_renamed(message, CODE_COLUMN) if name == column else message
          for message, name, _ in kept))
    meant = tuple((CODE_COLUMN if name == column else name, fid) for _, name, fid in kept)
    got = {k.decode(): v.decode() for k, v in (schema.to_pyarrow().metadata or {}).items()}
    if _fields(schema) != meant or got != dict(metadata):
        raise TableError(f"{where}: refit built the schema {_fields(schema)}, not {meant}; "
                         "nothing was committed")
    return schema


def _renamed(message: bytes, name: str) -> bytes:
    """A protobuf message with its field 2 (a Lance `Field`'s name) set to `name`; every
    other field copied as it is."""
    out, i = bytearray(), 0
    while i < len(message):
        start = i
        tag, i = _varint(message, i)
        wire = tag & 7
        if wire == 0:
            _, i = _varint(message, i)
        elif wire == 2:
            size, i = _varint(message, i)
            i += size
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise TableError(f"refit: unexpected protobuf wire type {wire} in a Lance field")
        if tag == (2 << 3 | 2):
            encoded = name.encode()
            out += bytes([tag]) + _as_varint(len(encoded)) + encoded
        else:
            out += message[start:i]
    return bytes(out)


def _varint(data: bytes, i: int) -> tuple[int, int]:
    """The protobuf varint at `i`, and the index after it."""
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _as_varint(value: int) -> bytes:
    """`value` as a protobuf varint."""
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes([*out, value])
