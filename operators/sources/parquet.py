"""Parquet: typed columns kept as they are; shards never cross a row group."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from operators.filesystems import resolve
from operators.sources.base import RawRecord, SourceFormat, check_pinned, metadata_names
from schemas.source import Unit
from schemas.spec import SourceSpec

BATCH_ROWS = 4096
UNREADABLE = (pa.ArrowInvalid, OSError)
"""What pyarrow raises for a file whose footer is damaged or missing."""


def typed_kinds(schema: pa.Schema, source: SourceSpec) -> dict[str, pa.DataType]:
    """The metadata fields of a typed file and their Arrow types."""
    names = metadata_names(dict.fromkeys(schema.names), source, "parquet")
    return {n: schema.field(n).type for n in names if n in schema.names}


class ParquetFormat(SourceFormat):
    kind = "parquet"
    suffixes = (".parquet", ".pq")
    position_kind = "row"
    compressible = False
    typed = True

    def _open(self, unit: Unit, source: SourceSpec) -> pq.ParquetFile:
        fs, _ = resolve(source.uri, source.storage_options)
        check_pinned(fs, unit.file)
        return pq.ParquetFile(fs.open_input_file(unit.file.path))

    def file_kinds(self, unit: Unit, source: SourceSpec) -> dict[str, pa.DataType] | None:
        try:
            return typed_kinds(self._open(unit, source).schema_arrow, source)
        except UNREADABLE:
            return None  # rejected whole by iter_records; the other files give the types

    def iter_records(self, unit: Unit, source: SourceSpec, *, start: int = 0,
                     offset: int | None = None, position: int | None = None,
                     part: int = 0) -> Iterator[RawRecord]:
        try:
            pf = self._open(unit, source)
        except UNREADABLE as err:
            # A damaged footer (a cut copy, a file still being written): no row can be
            # found without it, so the file is one reject naming it.
            yield RawRecord(0, 0, None, f"not a readable Parquet file, rejected whole: "
                            f"{err}", unit.file.path)
            return
        meta = pf.metadata
        kinds = tuple((n, str(t)) for n, t in typed_kinds(pf.schema_arrow, source).items())
        row = sum(meta.row_group(g).num_rows for g in range(part))
        for group in range(part, meta.num_row_groups):
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[group]):
                first = row
                row += batch.num_rows
                if row <= start:
                    continue
                for i, value in enumerate(batch.to_pylist()):
                    if first + i >= start:
                        yield RawRecord(first + i, first + i, value, part=group, kinds=kinds)
