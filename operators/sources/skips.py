"""The records a plan leaves out by id (duplicates, and ids on the table's exclusion
list), kept off the driver.

Pass 2 (`dedup.find_duplicates`) finds them bucket by bucket. The driver needs only how
many each shard has (`dedup.loser_counts`, bounded by the shards); the record numbers are
needed only by the tasks that read a shard (to drop them) and by pass 3 (to name the
first record of each duplicate). So they stay in the object store, or in files beside
the table's saved plan, cut by unit range into at most `MAX_PARTS` parts
(`gather_skips`), and a task fetches the one part its shards are in (`Skips.attach`).

At 100M documents with 1% duplicates the driver used to hold 1M record numbers in
shards' skip sets and the saved plan (about 183 bytes each, some 180 MB); it now holds
one count per shard and one handle per part.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators.filesystems import resolve
from schemas.errors import SourceChangedError
from schemas.source import Shard

SKIPS_SCHEMA = pa.schema([("unit", pa.int32()), ("ordinal", pa.int64()),
                          ("first_path", pa.string()), ("first_position", pa.int64())])
"""A left-out record (its unit and record number) and, for a duplicate, where the first
record with its id is: file and position (line, row or file index) in it. An excluded
id has no first record (nulls)."""

UNITS_SCHEMA = pa.schema([("w_unit", pa.int32()), ("first_path", pa.string()),
                          ("base", pa.int64())])
"""Each unit's file and the lines of the file before it (`plan.line_bases`): how pass 2's
(unit, position in unit) of a first record becomes a file and a line."""

MAX_PARTS = 256
"""Most parts the left-out records are cut into. A read task fetches one part (about
1/parts of them); pass 2's tasks hand the driver buckets x parts refs, briefly."""


def part_bounds(units: int) -> list[int]:
    """The first unit of each part: units cut into min(units, `MAX_PARTS`) even ranges.

    >>> part_bounds(3), part_bounds(1000)[:3], len(part_bounds(1000))
    ([0, 1, 2], [0, 3, 7], 256)
    """
    parts = max(1, min(units, MAX_PARTS))
    return [units * p // parts for p in range(parts)]


def split_by_part(losers: pa.Table, bounds: Sequence[int]) -> list[pa.Table]:
    """Pass 2's losers (`dedup.LOSERS_SCHEMA`) cut into one table per part.

    >>> t = pa.table({"unit": pa.array([4, 0, 2], pa.int32())})
    >>> [p.column("unit").to_pylist() for p in split_by_part(t, [0, 2, 4])]
    [[0], [2], [4]]
    """
    if not losers.num_rows:
        return [losers] * len(bounds)
    losers = losers.sort_by("unit")
    at = np.searchsorted(losers.column("unit").to_numpy(), np.asarray(bounds[1:]), "left")
    edges = [0, *at.tolist(), losers.num_rows]
    return [losers.slice(a, b - a) for a, b in zip(edges, edges[1:], strict=False)]


def gather_skips(units: pa.Table, *tables: pa.Table) -> pa.Table:
    """One part's losers from every bucket (`split_by_part`), as SKIPS_SCHEMA rows sorted
    by (unit, record number): each duplicate's first record named by its file and
    position there (`units`: UNITS_SCHEMA)."""
    rows = pa.concat_tables(tables) if tables else None
    if rows is None or not rows.num_rows:
        return SKIPS_SCHEMA.empty_table()
    rows = rows.join(units, keys="w_unit", join_type="left outer")
    out = pa.table({"unit": rows.column("unit"), "ordinal": rows.column("ordinal"),
                    "first_path": rows.column("first_path"),
                    "first_position": pc.add(rows.column("w_position"), rows.column("base"))},
                   schema=SKIPS_SCHEMA)
    return out.sort_by([("unit", "ascending"), ("ordinal", "ascending")])


def write_part(table: pa.Table, uri: str, storage_options: dict[str, str]) -> str:
    """Keep a table as one zstd-compressed Arrow file: a part (a resume reads it back),
    or one bucket's share of a part before it is gathered."""
    fs, path = resolve(uri, storage_options)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with fs.open_output_stream(path) as out, pa.ipc.new_file(out, table.schema,
                                                              options=options) as writer:
        writer.write_table(table)
    return uri


def read_part(uri: str, storage_options: dict[str, str]) -> pa.Table:
    """A table `write_part` kept."""
    fs, path = resolve(uri, storage_options)
    with fs.open_input_file(path) as f:
        return pa.ipc.open_file(f).read_all()


def _key(unit: int | np.ndarray, ordinal: int | np.ndarray) -> Any:
    return (np.int64(unit) << 40) | np.int64(ordinal) if np.isscalar(unit) else \
        (unit.astype(np.int64) << 40) | ordinal.astype(np.int64)


@dataclass(frozen=True)
class Skips:
    """Where a plan's left-out records are: part p holds units `bounds[p]` up to the next
    bound. A part is an Arrow table (a plan made in this process), the URI of a file
    `write_part` wrote (a job's, and a saved plan's), or a handle `fetch` resolves (a
    subclass's: `jobs._plan.ObjectStoreSkips` holds Ray object refs, so that this layer
    needs no Ray); None for a part a task does not need (`only`)."""

    bounds: tuple[int, ...]
    parts: tuple[Any, ...]
    storage_options: dict[str, str] = field(default_factory=dict)

    def part_of(self, unit: int) -> int:
        return bisect_right(self.bounds, unit) - 1

    def only(self, shards: Sequence[Shard]) -> Skips:
        """The parts these shards need, the others dropped: what a task carries."""
        need = {self.part_of(s.unit.index) for s in shards if s.left_out}
        return replace(self, parts=tuple(p if i in need else None
                                         for i, p in enumerate(self.parts)))

    def load(self, part: int) -> pa.Table:
        found = self.parts[part]
        if isinstance(found, pa.Table):
            return found
        if isinstance(found, str):
            return read_part(found, self.storage_options)
        if found is None:
            raise ValueError(f"part {part} of the left-out records was not carried")
        return self.fetch(found)

    def fetch(self, handle: Any) -> pa.Table:
        """A part held by some other means than a table or a file."""
        raise TypeError(f"no way to fetch a part held as {type(handle).__name__}")

    def attach(self, shards: Sequence[Shard]
               ) -> list[tuple[Shard, dict[int, tuple[str, int]]]]:
        """Each shard with its `skip` set filled and its duplicates: record number ->
        (file, position) of the first record with the same id.

        Raises:
            SourceChangedError: when a part holds another number of a shard's records
                than the plan counted (a part from another plan).
        """
        loaded: dict[int, tuple[np.ndarray, pa.Table]] = {}
        out = []
        for shard in shards:
            if not shard.left_out:
                out.append((shard, {}))
                continue
            p = self.part_of(shard.unit.index)
            if p not in loaded:
                table = self.load(p)
                keys = _key(table.column("unit").to_numpy(), table.column("ordinal").to_numpy())
                loaded[p] = keys, table
            keys, table = loaded[p]
            lo, hi = np.searchsorted(keys, [_key(shard.unit.index, shard.start),
                                            _key(shard.unit.index, shard.start + shard.records)])
            rows = table.slice(int(lo), int(hi - lo))
            ordinals = rows.column("ordinal").to_pylist()
            if len(ordinals) != shard.left_out:
                raise SourceChangedError(
                    f"{shard.path}: the plan left out {shard.left_out} records of shard "
                    f"{shard.shard_id}, but its saved list holds {len(ordinals)}. Run the "
                    "job again to plan the source afresh.")
            dups = {o: (path, position) for o, path, position in zip(
                ordinals, rows.column("first_path").to_pylist(),
                rows.column("first_position").to_pylist(), strict=True) if path is not None}
            out.append((replace(shard, skip=frozenset(ordinals)), dups))
        return out

    def to_json(self) -> dict:
        """For a saved plan: only file parts can be saved."""
        if not all(isinstance(p, str) for p in self.parts):
            raise ValueError("only left-out records kept in files can be saved")
        return {"bounds": list(self.bounds), "parts": list(self.parts)}

    @classmethod
    def from_json(cls, data: dict, storage_options: dict[str, str]) -> Skips:
        return cls(tuple(data["bounds"]), tuple(data["parts"]), storage_options)


def attached(shards: Sequence[Shard], skips: Skips | None) -> list[Shard]:
    """The shards, with their skip sets filled where they have any."""
    if skips is None or not any(s.left_out for s in shards):
        return list(shards)
    return [shard for shard, _ in skips.attach(shards)]
