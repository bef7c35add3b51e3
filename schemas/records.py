"""Arrow schemas of Quiver's tables: the chunk table, the rejects table, and their columns.

Schemas are built from the embedding dimension and the source's metadata schema, never
inferred from a batch, so every fragment a worker writes has exactly the same layout.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

CONTENT_HASH_BYTES = 16
VECTOR_COLUMN = "vector"
INT8_COLUMN = "vector_i8"
BITS_COLUMN = "vector_bits"
CODE_COLUMN = "vector_code"
"""A table's fitted first-stage code (`vectors.code`): `nbytes` uint8 per row, or for a
Lance-indexed code (`-rq`) the projected vector that Lance's IVF_RQ index quantizes."""
CODE_PROJECTIONS = ("first", "pca", "rot", "itq", "opq")
CODE_QUANTIZERS = ("b1", "b2", "b4", "pq", "rq")
"""A fitted code is named `<projection>-<quantizer>` (`operators.codecs`)."""
LANCE_CODE_QUANTIZER = "rq"
"""The quantizer Lance's IVF_RQ index applies (1 bit per projected dimension, RaBitQ):
Quiver stores and fits only the projection."""
DOC_HASH_COLUMN = "doc_hash"
HASH_COLUMNS = ("content_hash", DOC_HASH_COLUMN)
"""Bookkeeping hashes: neither a filter nor a hit ever names them."""


def lance_indexed_code(name: str) -> bool:
    """True for a code whose quantizer is Lance's index (`pca-rq`), not Quiver's scan.

    >>> lance_indexed_code("pca-rq"), lance_indexed_code("pca-b1")
    (True, False)
    """
    return name.rpartition("-")[2] == LANCE_CODE_QUANTIZER


def hash_document(doc_id: str, text: str, metadata: Mapping[str, Any]) -> bytes:
    """What the `doc_hash` column holds: a hash of a document's id, joined text and
    metadata values. The metadata enters as a JSON object of its non-null values, so a
    field new to the source changes only the documents that have a value for it.

    >>> hash_document("a", "x", {"year": None}) == hash_document("a", "x", {})
    True
    >>> hash_document("a", "x", {"year": 1}) == hash_document("a", "x", {}), len(
    ...     hash_document("a", "x", {}))
    (False, 16)
    """
    meta = {n: v for n, v in metadata.items() if v is not None}
    h = hashlib.blake2b(digest_size=CONTENT_HASH_BYTES)
    for part in (doc_id, text, json.dumps(meta, sort_keys=True, separators=(",", ":"),
                                          default=str)):
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.digest()


RESERVED_COLUMNS = ("id", "doc_id", "chunk", "text", "content_hash", DOC_HASH_COLUMN,
                    VECTOR_COLUMN, INT8_COLUMN, BITS_COLUMN, CODE_COLUMN)
CODEC_COLUMNS = {"float32": VECTOR_COLUMN, "float16": VECTOR_COLUMN, "int8": INT8_COLUMN,
                 "binary": BITS_COLUMN}
"""Which column each codec fills."""
WORK_COLUMNS = ("input_ids", "_truncated_tokens")
"""Columns that travel between stages but are never stored."""


def vector_type(dim: int) -> pa.DataType:
    """The full-precision vector column: a fixed-size list, which Lance indices accept."""
    return pa.list_(pa.float32(), dim)


def codec_type(codec: str, dim: int) -> pa.DataType:
    """The Arrow type of a codec's column; binary packs 8 sign bits per byte.

    >>> codec_type("binary", 384)
    FixedSizeListType(fixed_size_list<item: uint8>[48])
    """
    if codec == "binary":
        return pa.list_(pa.uint8(), dim // 8)
    item = {"float32": pa.float32(), "float16": pa.float16(), "int8": pa.int8()}[codec]
    return pa.list_(item, dim)


def codec_fields(codecs: list[str], dim: int) -> list[pa.Field]:
    """The vector columns a table with these codecs stores, in a fixed order."""
    order = ["float32", "float16", "int8", "binary"]
    return [pa.field(CODEC_COLUMNS[c], codec_type(c, dim), nullable=False)
            for c in order if c in codecs]


def chunk_schema(metadata: pa.Schema) -> pa.Schema:
    """Rows leaving the chunker: text, token ids and pass-through metadata, no vector yet.

    `doc_hash` (on every chunk of a document) covers the document's id, text and
    metadata values (`hash_document`), so a reindex recognises an unchanged document
    before tokenizing it. `_truncated_tokens` counts the document tokens
    `truncate` mode left out (on the document's first chunk), so the job summary can say
    how much text was not embedded.
    """
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("doc_id", pa.string(), nullable=False),
            pa.field("chunk", pa.int32(), nullable=False),
            pa.field("text", pa.large_string(), nullable=False),
            pa.field("content_hash", pa.binary(CONTENT_HASH_BYTES), nullable=False),
            # Nullable: tables written before it existed get it added as nulls.
            pa.field(DOC_HASH_COLUMN, pa.binary(CONTENT_HASH_BYTES)),
            *metadata,
            pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("_truncated_tokens", pa.int32(), nullable=False),
        ]
    )


def code_field(name: str, nbytes: int) -> pa.Field:
    """The fitted code's column: its bytes, or for a Lance-indexed code the projection
    as float16, 8 dims per byte the index keeps (the index is the code; the column is
    what it is built from, on disk only).

    >>> code_field("pca-b1", 24).type
    FixedSizeListType(fixed_size_list<item: uint8>[24])
    >>> code_field("pca-rq", 24).type
    FixedSizeListType(fixed_size_list<item: halffloat>[192])
    """
    if lance_indexed_code(name):
        return pa.field(CODE_COLUMN, pa.list_(pa.float16(), nbytes * 8), nullable=False)
    return pa.field(CODE_COLUMN, pa.list_(pa.uint8(), nbytes), nullable=False)


def table_schema(metadata: pa.Schema, *, dim: int, codecs: list[str] | None = None,
                 code: tuple[str, int] | None = None) -> pa.Schema:
    """The stored table: one row per chunk, the vector columns last (the fitted code's,
    `code` = (name, bytes), after the codecs')."""
    fields = [f for f in chunk_schema(metadata) if f.name not in WORK_COLUMNS]
    code = [code_field(*code)] if code else []
    return pa.schema([*fields, *codec_fields(codecs or ["float32"], dim), *code])


REJECTS_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("position", pa.int64(), nullable=False),
        pa.field("position_kind", pa.string(), nullable=False),
        pa.field("record_id", pa.string()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("raw", pa.large_string()),
    ]
)
"""A rejected record: where it was (file and line or row), what it said, and why."""


def check_metadata_names(metadata: pa.Schema) -> None:
    """Refuse source fields that would shadow Quiver's own columns.

    Raises:
        ValueError: naming the clashing field.
    """
    for name in metadata.names:
        if name in RESERVED_COLUMNS or name == "input_ids" or name.startswith("_"):
            raise ValueError(
                f"source field {name!r} clashes with a column Quiver writes "
                f"({', '.join(RESERVED_COLUMNS)}, input_ids, or a leading '_'); "
                "rename it or leave it out with source.metadata_fields"
            )
