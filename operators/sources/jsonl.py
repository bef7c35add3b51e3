"""JSON Lines (`.jsonl`, `.ndjson`, `.json`; also gzip, zstd or bz2 compressed).

Plain files are read from a shard's byte offset; compressed ones are scanned from the top
and the records before the shard are skipped without being parsed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from operators.filesystems import resolve
from operators.sources.base import (
    RawRecord,
    SourceFormat,
    open_at,
    open_stream,
)
from schemas.source import Unit
from schemas.spec import SourceSpec


def parse_line(line: bytes, *, ordinal: int, position: int, offset: int) -> RawRecord:
    """One non-blank line as a record, or the reason it is not one."""
    stripped = line.strip()
    try:
        text = stripped.decode("utf-8")
    except UnicodeDecodeError as err:
        preview = stripped[:1000].decode("utf-8", "replace")
        return RawRecord(ordinal, position, None,
                         f"not valid UTF-8 (byte {err.start} of the line)", preview, offset)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        return RawRecord(ordinal, position, None, f"invalid JSON: {err.msg}", text, offset)
    if not isinstance(value, dict):
        return RawRecord(ordinal, position, None,
                         f"not a JSON object (got {type(value).__name__})", text, offset)
    return RawRecord(ordinal, position, value, raw=text, offset=offset)


class JsonlFormat(SourceFormat):
    kind = "jsonl"
    suffixes = (".jsonl", ".ndjson", ".json")
    position_kind = "line"

    def iter_records(self, unit: Unit, source: SourceSpec, *, start: int = 0,
                     offset: int | None = None, position: int | None = None,
                     part: int = 0) -> Iterator[RawRecord]:
        fs, _ = resolve(source.uri, source.storage_options)
        if offset is not None:
            stream, byte, line_no, ordinal = open_at(fs, unit.file, offset), offset, \
                position or 1, start
        else:
            stream, byte, line_no, ordinal = open_stream(fs, unit.file), 0, 1, 0
        with stream:
            for line in stream:
                here, number = byte, line_no
                byte += len(line)
                line_no += 1
                if line.isspace() or not line:
                    continue
                current = ordinal
                ordinal += 1
                if current < start:
                    continue
                yield parse_line(line, ordinal=current, position=number, offset=here)
