"""The table manifest: everything needed to rebuild a query vector, kept in the table.

It lives in the Lance schema metadata under `quiver.manifest`, so a table is
self-describing: `query`, `eval` and later appends read it and refuse a mismatch.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from schemas.errors import ManifestMismatchError, TableError
from schemas.kinds import ChunkMode, Codec, Pooling, Precision

MANIFEST_KEY = b"quiver.manifest"
SCHEMA_VERSION = 3
"""3: precision is recorded but no longer part of the embedding fingerprint."""
PRECISION_FINGERPRINTED_BEFORE = 3
"""Manifests older than this folded `model.precision` into the fingerprint, so every
chunk hash in their tables did too: their fingerprint keeps that form (see
`TableManifest.embedding_fingerprint`)."""
Metric = Literal["dot", "cosine"]


class ModelManifest(BaseModel):
    """The model exactly as it was used to embed the table."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The spec's model name (package or folder).")
    weights_sha256: str = Field(description="Hash of the weight files.")
    pooling: Pooling
    normalize: bool
    max_tokens: int = Field(ge=1)
    dim: int = Field(ge=1)
    query_prefix: str = ""
    document_prefix: str = ""
    precision: Precision = "fp32"
    """What the table was first embedded with; recorded, not compared: bf16 and fp16
    agree with fp32 to cosine 0.9999 (tests/test_embed.py), so a spec run from a machine
    that resolves `auto` differently is the same configuration."""


class ChunkingManifest(BaseModel):
    """How documents were cut into chunks."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(ge=1)
    overlap: int = Field(ge=0)
    mode: ChunkMode = "windows"


class CodeManifest(BaseModel):
    """The table's fitted first-stage code: which, and the digest of its codebook file
    (`operators.codebooks`). Not part of the embedding's fingerprint: the code is
    derived from the stored vectors, so it never decides whether to embed again."""

    model_config = ConfigDict(extra="forbid")

    name: str
    nbytes: int = Field(ge=1)
    sha256: str = Field(description="Of the codebook file's bytes.")
    sample_rows: int = Field(ge=0, description="Vectors the code was fitted on.")


class VectorsManifest(BaseModel):
    """How the stored vectors were derived from the model's output.

    The int8 ranges are calibrated once, when the table is created, and reused by every
    append and every query, so all rows and all queries share one quantization grid.
    """

    model_config = ConfigDict(extra="forbid")

    codecs: list[Codec] = Field(default_factory=lambda: ["float32"])
    dims: int = Field(ge=1, description="Stored dimensions (after Matryoshka truncation).")
    truncated: bool = Field(False, description="True when dims < the model's dim.")
    int8_low: list[float] | None = Field(None, description="Per-dimension int8 range floor.")
    int8_high: list[float] | None = Field(None, description="Per-dimension int8 range top.")
    code: CodeManifest | None = Field(None, description="The fitted first-stage code.")

    def settings(self) -> dict:
        """What shapes the stored columns, without the calibrated ranges."""
        return {"codecs": sorted(self.codecs), "dims": self.dims}


class SourceManifest(BaseModel):
    """Which fields of which source made the table."""

    model_config = ConfigDict(extra="forbid")

    uri: str
    id_field: str | None
    text_fields: list[str]


class TableManifest(BaseModel):
    """A Quiver table's self-description."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    quiver_version: str
    lance_version: str
    model: ModelManifest
    chunking: ChunkingManifest
    source: SourceManifest
    vectors: VectorsManifest
    metric: Metric = Field(description="'dot' for normalised vectors, else 'cosine'.")

    def embedding_settings(self) -> dict[str, dict]:
        """What decides whether two embeddings are the same configuration: model,
        chunking and stored vectors, without the precision the model ran in."""
        return {"model": self.model.model_dump(exclude={"precision"}),
                "chunking": self.chunking.model_dump(), "vectors": self.vectors.settings()}

    def embedding_fingerprint(self) -> str:
        """Hash of `embedding_settings`; part of every content hash.

        A table whose manifest predates `PRECISION_FINGERPRINTED_BEFORE` hashed its
        chunks with the precision included, so its fingerprint keeps that form: a reindex
        compares its chunks in the form they were written in, and nothing is embedded
        again because the precision left the fingerprint. Continuing a table keeps its
        manifest's version and precision (`jobs._embed_job._decide`).

        >>> from schemas.manifest import ChunkingManifest, ModelManifest, SourceManifest
        >>> m = TableManifest(quiver_version="0", lance_version="0", metric="dot",
        ...     model=ModelManifest(name="m", weights_sha256="w", pooling="mean",
        ...                         normalize=True, max_tokens=8, dim=4, precision="bf16"),
        ...     chunking=ChunkingManifest(max_tokens=8, overlap=0), vectors=VectorsManifest(
        ...     dims=4), source=SourceManifest(uri="c", id_field="id", text_fields=["t"]))
        >>> fp32 = m.model_copy(update={"model": m.model.model_copy(update={"precision":
        ...     "fp32"})})
        >>> m.embedding_fingerprint() == fp32.embedding_fingerprint()
        True
        >>> old = lambda x: x.model_copy(update={"schema_version": 2})
        >>> old(m).embedding_fingerprint() == old(fp32).embedding_fingerprint()
        False
        """
        shaping = self.embedding_settings()
        if self.schema_version < PRECISION_FINGERPRINTED_BEFORE:
            shaping["model"] = self.model.model_dump()
        blob = json.dumps(shaping, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:32]

    def to_metadata(self) -> dict[bytes, bytes]:
        return {MANIFEST_KEY: self.model_dump_json().encode()}

    @classmethod
    def from_schema(cls, schema: pa.Schema, *, where: str = "table") -> TableManifest:
        """Read the manifest from a table's schema metadata.

        Raises:
            TableError: when the table carries none (it was not written by Quiver).
        """
        raw = (schema.metadata or {}).get(MANIFEST_KEY)
        if raw is None:
            raise TableError(f"{where}: not a Quiver table (no {MANIFEST_KEY.decode()} metadata)")
        return cls.model_validate_json(raw)

    def check_same_embedding(self, other: TableManifest, *, where: str) -> None:
        """Refuse to mix vectors from two embedding configurations.

        Raises:
            ManifestMismatchError: listing every field that differs, old and new.
        """
        mine, theirs = self.embedding_settings(), other.embedding_settings()
        diffs = [
            f"{section}.{key}: table has {mine[section][key]!r}, got {theirs[section][key]!r}"
            for section in mine
            for key in mine[section]
            if mine[section][key] != theirs[section][key]
        ]
        if diffs:
            raise ManifestMismatchError(
                f"{where} was embedded with a different configuration:\n  " + "\n  ".join(diffs)
            )
