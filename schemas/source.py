"""Shards and read plans: the contract between the driver that plans and the tasks that read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ShardKind = Literal["jsonl", "parquet", "csv", "text", "lance"]


@dataclass(frozen=True)
class Shard:
    """One read task's worth of a source, small enough to be the unit of commit.

    `skip` holds the positions the plan rejected (bad records and duplicates), so a reader
    drops exactly the rows the rejects table accounts for.
    """

    shard_id: str
    kind: ShardKind
    path: str
    start: int
    """Byte offset (jsonl), first row (parquet, csv, lance) or first file index (text)."""
    stop: int
    """Exclusive end in the same unit as `start`."""
    first_position: int
    """1-based line (jsonl) or 0-based row number of the shard's first record."""
    records: int
    skip: frozenset[int] = field(default_factory=frozenset)
    files: tuple[str, ...] = ()
    """Text folders only: the files of this shard, relative to `path`."""
