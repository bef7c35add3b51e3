"""JSON Lines (`.jsonl`, `.ndjson`, `.json`; also gzip, zstd or bz2 compressed).

Plain files are read from a shard's byte offset; compressed ones are scanned from the top
and the records before the shard are skipped without being parsed. A plain file bigger
than `source.unit_bytes` is cut into byte ranges, each its own planning unit, so one huge
file is validated by many tasks at once.
"""

from __future__ import annotations

import json
from collections.abc import Generator

from operators.filesystems import resolve
from operators.sources.base import (
    RawRecord,
    SourceFormat,
    compression_of,
    open_at,
    open_stream,
    truncated_tail,
    truncation,
)
from schemas.source import SourceFile, Unit
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

    def units(self, files: list[SourceFile], source: SourceSpec, *, root: str) -> list[Unit]:
        """One unit per file, except a plain file bigger than `source.unit_bytes`: one
        unit per range of that many bytes (the cuts do not move when the file grows)."""
        out: list[Unit] = []
        for f in files:
            if compression_of(f.path) is None and f.size > source.unit_bytes:
                for begin in range(0, f.size, source.unit_bytes):
                    out.append(Unit(len(out), self.kind, f, start=begin,
                                    stop=min(f.size, begin + source.unit_bytes)))
            else:
                out.append(Unit(len(out), self.kind, f))
        return out

    def iter_records(self, unit: Unit, source: SourceSpec, *, start: int = 0,
                     offset: int | None = None, position: int | None = None,
                     part: int = 0) -> Generator[RawRecord, None, int]:
        """The unit's records; returns the lines it went through (blank ones included),
        which for a byte range is what the plan needs to number the next range's lines."""
        fs, _ = resolve(source.uri, source.storage_options)
        stop = unit.stop
        if offset is not None:
            stream, byte, line_no, ordinal = open_at(fs, unit.file, offset), offset, \
                position or 1, start
        elif stop is not None and unit.start > 0:  # a range: skip the line begun before it
            stream = open_at(fs, unit.file, unit.start - 1)
            byte, line_no, ordinal = unit.start - 1 + len(stream.readline()), 1, 0
        else:
            stream, byte, line_no, ordinal = open_stream(fs, unit.file), 0, 1, 0
        first_line = line_no
        with stream:
            for line in stream:
                if stop is not None and byte >= stop:
                    break
                if not line.endswith(b"\n") and truncation(stream):
                    break  # a line cut by the truncation: part of the unreadable tail
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
            if truncation(stream) and (stop is None or byte < stop) and ordinal >= start:
                yield truncated_tail(stream, ordinal=ordinal, position=line_no, offset=byte)
                line_no += 1
        return line_no - first_line
