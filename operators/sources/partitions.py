"""Hive-style partition folders: `year=2020/part-0.parquet` gives every record of that
file the field `year` = 2020, as Spark, Hive, pyarrow and Ray Data lay datasets out and
read them back.

Every pass reads records through `records` (and typed files' field types through
`file_kinds`), so planning, validation, reading and reindex diffs all see the same
fields. Only the folders below the source's root count (a `k=v` folder above the uri is
part of where the data lives, not of the data). A value is an integer, else a float,
else a string (`__HIVE_DEFAULT_PARTITION__` is null), percent-escapes decoded. A field
the file itself holds keeps the file's value. Text folders carry no metadata, and a Lance
source is one dataset, so neither has partitions.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import replace
from typing import Any
from urllib.parse import unquote

import pyarrow as pa

from operators.filesystems import resolve
from operators.sources.base import (
    GLOB_CHARS,
    RawRecord,
    SourceFormat,
    glob_root,
    metadata_names,
)
from operators.sources.csv import csv_value
from schemas.source import Unit
from schemas.spec import SourceSpec

HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"


def partition_value(text: str) -> Any:
    """A folder's value as the type it reads as.

    >>> partition_value("2020"), partition_value("0.5"), partition_value("en%2Dus")
    (2020, 0.5, 'en-us')
    >>> partition_value(HIVE_NULL) is None
    True
    """
    text = unquote(text)
    return None if text == HIVE_NULL else csv_value(text)


def source_root(source: SourceSpec) -> str:
    """The folder the partition folders are counted from: the uri's folder, or a glob's
    fixed prefix."""
    _, path = resolve(source.uri, source.storage_options)
    if any(c in source.uri for c in GLOB_CHARS):
        return glob_root(path)
    return path.rstrip("/")


def partitions_of(path: str, root: str) -> dict[str, Any]:
    """The `key=value` folders between `root` and the file at `path`.

    >>> partitions_of("/d/year=2020/lang=en/p.parquet", "/d")
    {'year': 2020, 'lang': 'en'}
    >>> partitions_of("/x=1/d/p.parquet", "/x=1/d"), partitions_of("/d/p.jsonl", "/d/p.jsonl")
    ({}, {})
    """
    if not path.startswith(root.rstrip("/") + "/"):
        return {}
    folders = path[len(root.rstrip("/")) + 1:].split("/")[:-1]
    return {key: partition_value(value) for key, _, value in
            (f.partition("=") for f in folders if "=" in f) if key}


def _arrow_type(value: Any) -> pa.DataType:
    return pa.int64() if isinstance(value, int) else pa.float64() \
        if isinstance(value, float) else pa.string()


def unit_partitions(fmt: SourceFormat, unit: Unit, source: SourceSpec) -> dict[str, Any]:
    """The partition fields of a unit's file that are metadata (the spec's
    `metadata_fields`, or every field but id and text)."""
    if fmt.kind in ("text", "lance"):
        return {}
    found = partitions_of(unit.file.path, source_root(source))
    keep = set(metadata_names(dict.fromkeys(found), source, fmt.kind))
    return {k: v for k, v in found.items() if k in keep}


def records(fmt: SourceFormat, unit: Unit, source: SourceSpec, **where: Any
            ) -> Generator[RawRecord, None, Any]:
    """`fmt.iter_records(unit, source, **where)` with the file's partition fields added
    to each record (and to a typed record's field types); returns what it returns."""
    found = unit_partitions(fmt, unit, source)
    if not found:
        return (yield from fmt.iter_records(unit, source, **where))
    inner = fmt.iter_records(unit, source, **where)
    kinds: tuple[tuple[str, str], ...] | None = None
    while True:
        try:
            rec = next(inner)
        except StopIteration as done:
            return done.value
        if rec.value is None:
            yield rec
            continue
        value = {**found, **rec.value}
        if rec.kinds is not None:
            if kinds is None:
                have = {n for n, _ in rec.kinds}
                kinds = rec.kinds + tuple((n, str(_arrow_type(v))) for n, v in found.items()
                                          if n not in have)
            yield replace(rec, value=value, kinds=kinds)
        else:
            yield replace(rec, value=value)


def file_kinds(fmt: SourceFormat, unit: Unit, source: SourceSpec
               ) -> dict[str, pa.DataType] | None:
    """A typed file's metadata field types, its partition fields included."""
    kinds = fmt.file_kinds(unit, source)
    if kinds is None:
        return None
    extra = {n: _arrow_type(v) for n, v in unit_partitions(fmt, unit, source).items()
             if n not in kinds}
    return {**kinds, **extra}
