"""CSV with a header row (also compressed). Cells are strings; numbers in metadata
columns become numbers so they get real types. Plain files are read from a shard's byte
offset: the reader tracks where each row starts, even rows with quoted newlines."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from typing import IO, Any

from operators.filesystems import resolve
from operators.sources.base import (
    RawRecord,
    SourceFormat,
    open_at,
    open_stream,
    truncated_tail,
    truncation,
)
from schemas.errors import SourceError
from schemas.source import Unit
from schemas.spec import SourceSpec


def csv_value(text: str) -> Any:
    """A cell as int, float, None (empty) or the string itself.

    >>> csv_value("3"), csv_value("0.5"), csv_value(""), csv_value("x")
    (3, 0.5, None, 'x')
    """
    if text == "":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


class _Lines:
    """Decoded lines of a byte stream, counting bytes and lines as csv.reader pulls them."""

    def __init__(self, stream: IO[bytes], *, path: str, offset: int, line: int) -> None:
        self._stream, self._path = stream, path
        self.offset, self.line = offset, line

    def __iter__(self) -> Iterator[str]:
        for raw in self._stream:
            if not raw.endswith(b"\n") and truncation(self._stream):
                return  # a line cut by the truncation: part of the unreadable tail
            self.offset += len(raw)
            self.line += 1
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise SourceError(f"{self._path}: line {self.line} is not valid UTF-8 "
                                  f"(byte {err.start})") from None


class CsvFormat(SourceFormat):
    kind = "csv"
    suffixes = (".csv",)
    position_kind = "line"

    def _header(self, fs, unit: Unit) -> list[str]:
        with open_stream(fs, unit.file) as stream:
            lines = _Lines(stream, path=unit.file.path, offset=0, line=0)
            return next(csv.reader(iter(lines)), [])

    def iter_records(self, unit: Unit, source: SourceSpec, *, start: int = 0,
                     offset: int | None = None, position: int | None = None,
                     part: int = 0) -> Iterator[RawRecord]:
        fs, _ = resolve(source.uri, source.storage_options)
        header = self._header(fs, unit)
        if not header:
            return
        keep_as_text = {source.id_field, *source.text_fields}
        if offset is not None:
            stream, ordinal = open_at(fs, unit.file, offset), start
            lines = _Lines(stream, path=unit.file.path, offset=offset, line=(position or 2) - 1)
            reader = csv.reader(iter(lines))
        else:
            stream, ordinal = open_stream(fs, unit.file), 0
            lines = _Lines(stream, path=unit.file.path, offset=0, line=0)
            reader = csv.reader(iter(lines))
            next(reader, None)  # the header
        with stream:
            while True:
                row_offset, row_line = lines.offset, lines.line + 1
                row = next(reader, None)
                if row is None:
                    if truncation(stream) and ordinal >= start:
                        yield truncated_tail(stream, ordinal=ordinal, position=row_line,
                                             offset=row_offset)
                    return
                if not row:
                    continue  # a blank line is not a record
                current = ordinal
                ordinal += 1
                if current < start:
                    continue
                raw = ",".join(row)[:1000]
                if len(row) != len(header):
                    yield RawRecord(current, row_line, None,
                                    f"ragged row: {len(row)} fields, the header has "
                                    f"{len(header)}", raw, row_offset)
                    continue
                value = {k: (v if k in keep_as_text else csv_value(v))
                         for k, v in zip(header, row, strict=True)}
                yield RawRecord(current, row_line, value, raw=raw, offset=row_offset)
