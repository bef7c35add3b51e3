"""A Lance dataset as a source, read at the version the job was planned on."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from operators.sources.base import RawRecord, SourceFormat
from operators.sources.parquet import typed_kinds
from schemas.errors import SourceError
from schemas.source import SourceFile, Unit
from schemas.spec import SourceSpec


def open_lance(uri: str, storage_options: dict[str, str], version: int | None = None):
    """The dataset (at `version`), or a SourceError saying why it cannot be read."""
    import lance

    try:
        return lance.dataset(uri, version=version, storage_options=storage_options or None)
    except (OSError, ValueError) as err:
        raise SourceError(f"source.uri: {uri}: not a readable Lance dataset: {err}") from None


class LanceFormat(SourceFormat):
    kind = "lance"
    suffixes = (".lance",)
    position_kind = "row"
    compressible = False
    typed = True

    def units(self, files: list[SourceFile], source: SourceSpec, *, root: str) -> list[Unit]:
        """Row ranges of `records_per_shard` rows, pinned to the dataset's current version
        (stored as the file's `size`, so a reader opens exactly that version)."""
        ds = open_lance(root, source.storage_options)
        pinned = SourceFile(root, ds.version, None)
        rows, per = ds.count_rows(), source.records_per_shard
        return [Unit(i, "lance", pinned, start, min(rows, start + per))
                for i, start in enumerate(range(0, rows, per))]

    def file_kinds(self, unit: Unit, source: SourceSpec) -> dict[str, pa.DataType]:
        ds = open_lance(unit.file.path, source.storage_options, unit.file.size)
        return typed_kinds(ds.schema, source)

    def iter_records(self, unit: Unit, source: SourceSpec, *, start: int = 0,
                     offset: int | None = None, position: int | None = None,
                     part: int = 0) -> Iterator[RawRecord]:
        ds = open_lance(unit.file.path, source.storage_options, unit.file.size)
        kinds = tuple((n, str(t)) for n, t in typed_kinds(ds.schema, source).items())
        first = unit.start + start
        table = ds.to_table(offset=first, limit=(unit.stop or first) - first)
        for i, value in enumerate(table.to_pylist()):
            yield RawRecord(start + i, first + i, value, kinds=kinds)
