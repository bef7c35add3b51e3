"""Text files (`.txt`, `.md`, `.rst`, also compressed): one document per file, whose id
is its path relative to the source folder."""

from __future__ import annotations

from collections.abc import Iterator

from operators.filesystems import resolve
from operators.sources.base import RawRecord, SourceFormat, open_stream, truncation
from schemas.source import SourceFile, Unit
from schemas.spec import SourceSpec


class TextFormat(SourceFormat):
    kind = "text"
    suffixes = (".txt", ".md", ".rst")
    position_kind = "file"

    def units(self, files: list[SourceFile], source: SourceSpec, *, root: str) -> list[Unit]:
        """Groups of `records_per_shard` files, ids relative to `root`."""
        per = source.records_per_shard
        cut = len(root.rstrip("/")) + 1
        rel = [SourceFile(f.path[cut:], f.size, f.mtime_ns) for f in files]
        folder = SourceFile(root.rstrip("/"), 0, None)
        return [Unit(i, "text", folder, start, files=tuple(rel[start : start + per]))
                for i, start in enumerate(range(0, len(rel), per))]

    def iter_records(self, unit: Unit, source: SourceSpec, *, start: int = 0,
                     offset: int | None = None, position: int | None = None,
                     part: int = 0) -> Iterator[RawRecord]:
        fs, _ = resolve(source.uri, source.storage_options)
        for n, rel in enumerate(unit.files[start:], start):
            where = SourceFile(f"{unit.file.path}/{rel.path}", rel.size, rel.mtime_ns)
            with open_stream(fs, where) as stream:
                data = stream.read()
                cut = truncation(stream)
            if cut:
                yield RawRecord(n, unit.start + n, None, f"truncated compressed file: "
                                f"{rel.path} was cut short ({cut})", rel.path)
                continue
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as err:
                yield RawRecord(n, unit.start + n, None,
                                f"{rel.path}: not valid UTF-8 (byte {err.start})", rel.path)
                continue
            yield RawRecord(n, unit.start + n, {"path": rel.path, "text": text}, raw=rel.path)
