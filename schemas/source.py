"""Source files, shards and read plans: the contract between the driver that plans and the
tasks that validate and read."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

ShardKind = Literal["jsonl", "parquet", "csv", "text", "lance"]
PositionKind = Literal["line", "row", "file"]


@dataclass(frozen=True)
class SourceFile:
    """One file of a source as listed when the job was planned.

    `size` and `mtime_ns` pin it: a reader that finds either changed refuses to read it,
    so a file edited while a job runs can never mix two versions into the table.
    """

    path: str
    size: int
    mtime_ns: int | None


@dataclass(frozen=True)
class Unit:
    """One validation task's worth of a source: a file, a group of text files, or a row
    range of a Lance dataset. Units are numbered in source order, which is what
    "first record wins" means for duplicate ids."""

    index: int
    kind: ShardKind
    file: SourceFile
    """The file (text: the root folder; lance: the dataset, size = its version)."""
    start: int = 0
    """Lance: the first row. Text: the index of the first file. A byte range of a plain
    JSON Lines file: its first byte."""
    stop: int | None = None
    """Lance: the row after the last. Text: unused. A byte range of a plain JSON Lines
    file: the byte after it (None: the whole file). Its records are the lines whose
    first byte lies in the range, their positions counted from the range's first line
    in pass 1 and made file-wide by the plan (`assemble_plan`)."""
    files: tuple[SourceFile, ...] = ()
    """Text folders: the unit's files, with paths relative to `file.path`."""


@dataclass(frozen=True)
class Shard:
    """One read task's worth of a source, small enough to be the unit of commit.

    A shard is `records` consecutive records of one unit starting at record `start`
    (0-based, counted over the unit's non-blank records). `skip` holds the record numbers
    the plan rejected as duplicates or left out as excluded ids (the table's exclusion
    list), once a task has attached them; readers find the other rejects again
    themselves.
    """

    shard_id: str
    kind: ShardKind
    unit: Unit
    start: int
    records: int
    first_position: int
    """Line (jsonl, csv: 1-based), row (parquet, lance: 0-based) or file index (text) of
    the shard's first record."""
    offset: int | None = None
    """Byte offset of the first record in the file's decompressed content (line
    formats); None means read from the top and skip `start` records."""
    part: int = 0
    """Parquet: the row group; `start` then counts rows of the file."""
    skip: frozenset[int] = field(default_factory=frozenset)
    """Filled only inside the task that reads the shard (`operators.sources.skips`): the
    driver's shards hold `left_out`, a count."""
    documents: int | None = None
    """Valid documents the plan counted; a reader that finds another number refuses."""
    left_out: int = 0
    """Records the plan leaves out by id (duplicates, excluded ids): their numbers are
    kept off the driver, in the plan's `Skips`."""

    @property
    def path(self) -> str:
        return self.unit.file.path


def shard_to_json(shard: Shard) -> dict:
    """A shard as plain JSON values (`shard_from_json` reads it back exactly).

    >>> f = SourceFile("a.jsonl", 10, 5)
    >>> s = Shard("a#0", "jsonl", Unit(0, "jsonl", f), 0, 3, 1, offset=0, skip=frozenset({2}))
    >>> shard_from_json(shard_to_json(s)) == s
    True
    """
    out = asdict(shard)
    out["skip"] = sorted(shard.skip)
    return out


def shard_from_json(data: dict) -> Shard:
    unit = dict(data["unit"])
    unit["file"] = SourceFile(**unit["file"])
    unit["files"] = tuple(SourceFile(**f) for f in unit.get("files", ()))
    return Shard(**{**data, "unit": Unit(**unit), "skip": frozenset(data.get("skip", ()))})
