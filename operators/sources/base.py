"""What every source format shares: finding files, opening them, pinning them, and turning
raw records into documents or reasons for rejecting them.

A source is a file, a folder or a glob, local or on an object store. Listing reads file
metadata only (names, sizes, modification times); every record is read by cluster tasks.
Each format (one module each, like Ray Data's `FileBasedDatasource` subclasses) says
which suffixes it reads, how a file becomes validation units, and how to iterate a
unit's records from any record on.
"""

from __future__ import annotations

import fnmatch
import io
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any, ClassVar

import pyarrow as pa
import pyarrow.fs as pafs

from operators.filesystems import resolve
from schemas.errors import SourceChangedError, SourceError
from schemas.records import hash_document
from schemas.source import PositionKind, ShardKind, SourceFile, Unit
from schemas.spec import SourceSpec

RAW_PREVIEW_CHARS = 1000
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2"}
GLOB_CHARS = "*?["

KIND_TYPES: dict[str, pa.DataType] = {
    "bool": pa.bool_(),
    "int": pa.int64(),
    "float": pa.float64(),
    "str": pa.string(),
    "json": pa.string(),
}
"""Metadata kinds of untyped formats (JSON Lines, CSV) and the Arrow type each becomes."""


@dataclass
class RawRecord:
    """One record as found in the source, before validation."""

    ordinal: int
    """0-based number of the record in its unit (blank lines are not records)."""
    position: int
    """Line, row or file index, as the rejects table reports it."""
    value: dict[str, Any] | None
    error: str | None = None
    raw: str | None = None
    offset: int | None = None
    """Byte offset of the record, when the file can later be read from there."""
    part: int = 0
    """Parquet row group."""
    kinds: tuple[tuple[str, str], ...] | None = None
    """Typed formats: the metadata fields' types in this record's file."""


class SourceFormat:
    """One record format. Subclasses set the class attributes and `iter_records`."""

    kind: ClassVar[ShardKind]
    suffixes: ClassVar[tuple[str, ...]]
    position_kind: ClassVar[PositionKind]
    compressible: ClassVar[bool] = True
    typed: ClassVar[bool] = False
    """Typed formats bring an Arrow schema; the others get metadata types inferred."""

    def units(self, files: list[SourceFile], source: SourceSpec, *, root: str) -> list[Unit]:
        """Validation units, in source order: one per file unless the format says more."""
        return [Unit(i, self.kind, f) for i, f in enumerate(files)]

    def iter_records(self, unit: Unit, source: SourceSpec, *, start: int = 0,
                     offset: int | None = None, position: int | None = None,
                     part: int = 0) -> Iterator[RawRecord]:
        """The unit's records from record `start` on, in order.

        With `offset` (and `position`, the record's line) the reader seeks there instead
        of scanning from the top; `part` is the Parquet row group that holds `start`.
        """
        raise NotImplementedError

    def file_kinds(self, unit: Unit, source: SourceSpec) -> dict[str, pa.DataType] | None:
        """Typed formats: the metadata fields' Arrow types in this unit's file."""
        return None


def compression_of(path: str) -> str | None:
    """The codec a file's last suffix names ('gzip', 'zstd', 'bz2'), or None."""
    lowered = path.lower()
    return next((c for s, c in COMPRESSIONS.items() if lowered.endswith(s)), None)


def base_suffix(path: str) -> str:
    """The format suffix under any compression suffix: `a.jsonl.gz` → `.jsonl`.

    >>> base_suffix("x/a.JSONL.gz"), base_suffix("b.parquet"), base_suffix("README")
    ('.jsonl', '.parquet', '')
    """
    name = path.rsplit("/", 1)[-1].lower()
    for suffix in COMPRESSIONS:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return "." + name.rsplit(".", 1)[-1] if "." in name else ""


BYTES_READ = [0]
"""Bytes this process has read from line-format source files (JSON Lines, CSV, text;
decompressed), so a pass can say what it read: an unchanged rerun must read none."""


class _Counted(io.RawIOBase):
    """A raw stream that adds what it reads to `BYTES_READ`."""

    def __init__(self, raw: Any) -> None:
        super().__init__()
        self._raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._raw.readinto(buffer)
        BYTES_READ[0] += n
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


    @property
    def truncated(self) -> str | None:
        return getattr(self._raw, "truncated", None)


DECOMPRESS_CHUNK = 1 << 16
"""Bytes a compressed file's content is pulled from its codec in, whatever the reader
asks for: so a truncated file always ends at the same byte."""


class _Decompressed(io.RawIOBase):
    """A compressed file's content. A file cut short (an interrupted download) reads as
    ended where its last whole chunk ends, with `truncated` saying why, instead of
    raising from the middle of a pass: the records before it are kept, and the format
    rejects the unreadable tail as one record (`truncated_tail`)."""

    def __init__(self, raw: Any) -> None:
        super().__init__()
        self._raw = raw
        self._chunk = memoryview(b"")
        self._at = 0
        self.truncated: str | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._at >= len(self._chunk):
            if self.truncated is not None:
                return 0
            try:
                self._chunk = memoryview(self._raw.read(DECOMPRESS_CHUNK))
            except OSError as err:  # Arrow: "Truncated compressed stream", a bad block
                self.truncated, self._chunk = str(err), memoryview(b"")
            self._at = 0
            if not len(self._chunk):
                return 0
        n = min(len(buffer), len(self._chunk) - self._at)
        buffer[:n] = self._chunk[self._at:self._at + n]
        self._at += n
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def truncation(stream: IO[bytes]) -> str | None:
    """Why a stream from `open_stream` / `open_at` ended early (None: it did not)."""
    return getattr(getattr(stream, "raw", None), "truncated", None)


def truncated_tail(stream: IO[bytes], *, ordinal: int, position: int, offset: int,
                   kind: str = "line") -> RawRecord:
    """The reject that stands for a truncated file's unreadable tail: one record, at the
    first position not read whole, naming the last good one."""
    return RawRecord(ordinal, position, None,
                     f"truncated compressed file: nothing after {kind} {position - 1} can be "
                     f"read ({truncation(stream)}); the file was cut short, as an "
                     "interrupted copy or download leaves it", "", offset)


def open_stream(fs: pafs.FileSystem, file: SourceFile) -> IO[bytes]:
    """A buffered binary stream over the file, decompressed when its suffix says so."""
    check_pinned(fs, file)
    codec = compression_of(file.path)
    raw = fs.open_input_stream(file.path, compression=None, buffer_size=1 << 20)
    if codec is not None:
        raw = _Decompressed(pa.CompressedInputStream(raw, codec))
    return io.BufferedReader(_Counted(raw), buffer_size=1 << 20)


SKIP_CHUNK = 4 << 20


def open_at(fs: pafs.FileSystem, file: SourceFile, offset: int) -> IO[bytes]:
    """A buffered stream starting at byte `offset` of the file's (decompressed) content.

    Plain files seek there. Compressed ones cannot, so they are decompressed from the top
    and the bytes before `offset` are dropped in big chunks, at the codec's speed: no
    line of them is split or parsed.
    """
    if compression_of(file.path) is not None:
        stream = open_stream(fs, file)
        left = offset
        while left > 0:
            dropped = len(stream.read(min(left, SKIP_CHUNK)))
            if not dropped:
                break
            left -= dropped
        return stream
    check_pinned(fs, file)
    handle = fs.open_input_file(file.path)
    handle.seek(offset)
    return io.BufferedReader(_Counted(handle), buffer_size=1 << 20)


def check_pinned(fs: pafs.FileSystem, file: SourceFile) -> None:
    """Refuse a file whose size or modification time changed since planning.

    Raises:
        SourceChangedError: naming the file and what changed.
    """
    info = fs.get_file_info(file.path)
    if info.type == pafs.FileType.NotFound:
        raise SourceChangedError(f"{file.path}: removed while the job ran; nothing read from it "
                          "after that was committed. Run the job again.")
    mtime = info.mtime_ns
    if info.size != file.size or (file.mtime_ns is not None and mtime != file.mtime_ns):
        raise SourceChangedError(
            f"{file.path}: changed while the job ran (size {file.size} -> {info.size}, "
            f"mtime {file.mtime_ns} -> {mtime}); nothing read from the changed file was "
            "committed. Run the job again: it plans the new contents.")


# ---------------------------------------------------------------- listing


@dataclass
class Listing:
    """The files a source names, the format they are read as, and what was left out."""

    kind: ShardKind
    root: str
    """The folder ids of text files are relative to (or the Lance dataset)."""
    files: list[SourceFile]
    skipped: dict[str, int] = field(default_factory=dict)
    """Files not read, counted by suffix ('(none)' for files without one)."""


def _file(info: pafs.FileInfo) -> SourceFile:
    return SourceFile(info.path, int(info.size or 0), info.mtime_ns)


def glob_root(path: str) -> str:
    """The fixed folder a glob's matches are under."""
    head = path[: min(path.index(c) for c in GLOB_CHARS if c in path)]
    return head.rsplit("/", 1)[0] if "/" in head else "."


def list_source(source: SourceSpec, formats: dict[ShardKind, SourceFormat]) -> Listing:
    """Resolve `source.uri` (file, folder or glob) into the files to read.

    Args:
        source: The spec's source section.
        formats: The known formats by kind.

    Raises:
        SourceError: when nothing matches, or the format cannot be told.
    """
    fs, path = resolve(source.uri, source.storage_options)
    is_glob = any(c in source.uri for c in GLOB_CHARS)
    if not is_glob:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise SourceError(f"source.uri: {source.uri}: no such file or folder")
        if source.format == "lance" or path.rstrip("/").lower().endswith(".lance"):
            return Listing("lance", path, [SourceFile(path, 0, None)])
        if info.type == pafs.FileType.File:
            kind = source.format if source.format != "auto" else _kind_of(path, formats)
            if kind is None:
                raise SourceError(
                    f"source.uri: {source.uri}: cannot tell the format from the name; "
                    "set source.format to one of jsonl, parquet, csv, text, lance")
            root = path.rsplit("/", 1)[0]
            return Listing(kind, root, [_file(info)])
        root = path.rstrip("/")
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    else:
        root = glob_root(path)
        pattern = path
        infos = [i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True,
                                                               allow_not_found=True))
                 if fnmatch.fnmatchcase(i.path, pattern)]
    candidates = sorted((i for i in infos if i.type == pafs.FileType.File),
                        key=lambda i: i.path)
    by_kind: dict[ShardKind, list[pafs.FileInfo]] = {}
    skipped: Counter[str] = Counter()
    for info in candidates:
        name = info.path.rsplit("/", 1)[-1]
        kind = _kind_of(info.path, formats)
        if name.startswith((".", "_")) or kind is None:
            skipped[base_suffix(info.path) or "(none)"] += 1
            continue
        by_kind.setdefault(kind, []).append(info)
    kind = _choose_kind(source, by_kind)
    for other, files in by_kind.items():
        if other != kind:
            for info in files:
                skipped[base_suffix(info.path)] += 1
    files = [_file(i) for i in by_kind.get(kind, [])]
    if not files:
        found = ", ".join(f"{n} {s}" for s, n in skipped.most_common(5)) or "no files"
        raise SourceError(f"source.uri: {source.uri}: no {kind} files to read "
                          f"(found {found})")
    return Listing(kind, root, files, dict(skipped))


def _kind_of(path: str, formats: dict[ShardKind, SourceFormat]) -> ShardKind | None:
    suffix = base_suffix(path)
    compressed = compression_of(path) is not None
    for kind, fmt in formats.items():
        if suffix in fmt.suffixes and (fmt.compressible or not compressed):
            return kind
    return None


def _choose_kind(source: SourceSpec, by_kind: dict[ShardKind, list]) -> ShardKind:
    """The format of a folder or glob: the spec's, the only one, or the only non-text one
    (a README beside data files is not data)."""
    if source.format != "auto":
        return source.format
    kinds = sorted(by_kind)
    if len(kinds) <= 1:
        return kinds[0] if kinds else "text"
    data = [k for k in kinds if k != "text"]
    if len(data) == 1:
        return data[0]
    found = ", ".join(f"{len(by_kind[k])} {k}" for k in kinds)
    raise SourceError(f"source.uri: {source.uri}: holds files of several formats ({found}); "
                      "set source.format to the one to read")


# ---------------------------------------------------------------- validation


def kind_of_value(value: Any) -> str:
    """The metadata kind of a JSON or CSV value."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    return "json"


def id_and_text(value: dict[str, Any], source: SourceSpec, kind: ShardKind
                ) -> tuple[str, str] | str:
    """The record's id and joined text, or the reason it has none."""
    id_field = source.id_field or ("path" if kind == "text" else None)
    text_fields = ["text"] if kind == "text" else source.text_fields
    if id_field not in value:
        return f"missing id field {id_field!r}"
    raw_id = value[id_field]
    if raw_id is None:
        return f"null id field {id_field!r}"
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        return (f"wrong type for id field {id_field!r}: expected string or integer, "
                f"got {type(raw_id).__name__}")
    doc_id = str(raw_id).strip()
    if not doc_id:
        return f"empty id field {id_field!r}"
    present = [f for f in text_fields if f in value]
    if not present:
        return f"missing text field{'s' if len(text_fields) > 1 else ''} {text_fields!r}"
    parts = []
    for f in present:
        v = value[f]
        if v is None:
            continue
        if not isinstance(v, str):
            return f"wrong type for text field {f!r}: expected string, got {type(v).__name__}"
        if v.strip():
            parts.append(v.strip())
    if not parts:
        return "empty text" if any(value[f] is not None for f in present) else "null text"
    return doc_id, " ".join(parts)


def metadata_names(value: dict[str, Any], source: SourceSpec, kind: ShardKind) -> list[str]:
    """The record's pass-through fields: the spec's list, or every field but id and text."""
    if source.metadata_fields is not None:
        return source.metadata_fields
    if kind == "text":
        return []
    taken = {source.id_field, *source.text_fields}
    return [k for k in value if k not in taken]


def document_hash(doc_id: str, text: str, value: dict[str, Any], source: SourceSpec,
                  kind: ShardKind) -> bytes:
    """The record's `doc_hash` (`schemas.records.hash_document`) over its metadata values
    as the source holds them: equal hashes mean the document's rows need nothing, so a
    reindex skips it before tokenizing.

    Planning and reading both compute it from the raw record, so the plan's pass 1 can
    compare documents with the table without reading the source a second time. The
    embedding configuration is not in it: a configuration change is a cut-over, which
    embeds every document anyway, so hashes are only ever compared under one
    configuration.

    >>> s = SourceSpec(uri="c.jsonl", id_field="id")
    >>> a = document_hash("a", "x", {"id": "a", "text": "x", "year": 1}, s, "jsonl")
    >>> a == document_hash("a", "x", {"id": "a", "text": "x", "year": None}, s, "jsonl")
    False
    >>> a == document_hash("a", "y", {"id": "a", "text": "y", "year": 1}, s, "jsonl")
    False
    """
    return hash_document(doc_id, text, {n: value.get(n)
                                        for n in metadata_names(value, source, kind)})


def record_kinds(rec: RawRecord, source: SourceSpec, kind: ShardKind
                 ) -> tuple[tuple[str, str], ...]:
    """The (field, kind) pairs of a record's non-null metadata: its type signature."""
    if rec.kinds is not None:
        return rec.kinds
    assert rec.value is not None
    return tuple((name, kind_of_value(rec.value[name]))
                 for name in metadata_names(rec.value, source, kind)
                 if rec.value.get(name) is not None)


def mismatch(kinds: tuple[tuple[str, str], ...], chosen: dict[str, str]) -> str | None:
    """Why a record's signature disagrees with the source's chosen kinds, if it does.

    >>> mismatch((("n", "str"),), {"n": "int"})
    "wrong type for field 'n': expected int64, got str"
    >>> mismatch((("n", "int"),), {"n": "float"}) is None  # ints widen to floats
    True
    """
    for name, got in kinds:
        want = chosen.get(name)
        if want is None or got == want or (want == "float" and got == "int"):
            continue
        expected = KIND_TYPES.get(want, want)
        return f"wrong type for field {name!r}: expected {expected}, got {got}"
    return None


def raw_preview(rec: RawRecord) -> str:
    """What the rejects table shows of a record: its text, cut to a preview."""
    text = rec.raw if rec.raw is not None else (
        json.dumps(rec.value, default=str) if rec.value else "")
    return text[:RAW_PREVIEW_CHARS]


def coerce_json(value: Any) -> Any:
    """Nested values (lists, objects) are stored as JSON text."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, ensure_ascii=False)
