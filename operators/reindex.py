"""Incremental reindex: compare fresh chunk hashes with the table's, change only the rest.

A chunk's `content_hash` covers its text and the embedding configuration, so a chunk
whose id and hash are both in the table needs nothing. Everything else is one of:

- added:   a new id (a new document, or a document that now has more chunks);
- changed: a known id with a new hash (edited text);
- deleted: an id the source no longer produces (a vanished document, or one that now
  has fewer chunks).

Changed and deleted rows are removed with deletion vectors on their fragments (by row
address, no SQL predicate), and the re-embedded rows arrive as new fragments; both go in
one Lance `Update` transaction, so a reader sees the old version or the new one.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import lance
import numpy as np
import pyarrow as pa
from lance.fragment import FragmentMetadata

ADDRESS_BITS = 32


@dataclass
class ReindexDiff:
    """What a reindex must do, chunk by chunk."""

    todo: dict[str, set[str]] = field(default_factory=dict)
    """Shard id -> chunk ids to embed there (added or changed)."""
    remove: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    """Row addresses of the table rows to drop (changed and deleted chunks)."""
    added: int = 0
    changed: int = 0
    deleted: int = 0
    unchanged: int = 0

    @property
    def embed(self) -> int:
        return self.added + self.changed


def diff_chunks(table_rows: pa.Table, fresh: pa.Table) -> ReindexDiff:
    """Compare the table's (id, content_hash, _rowaddr) with the source's chunks.

    Args:
        table_rows: Every table row's id, content hash and row address.
        fresh: Every chunk the source yields now: id, content_hash, and the shard it
            comes from.

    >>> t = pa.table({"id": ["a#0", "b#0", "c#0"], "content_hash": [b"1", b"2", b"3"],
    ...               "_rowaddr": pa.array([0, 1, 2], pa.uint64())})
    >>> f = pa.table({"id": ["a#0", "b#0", "d#0"], "content_hash": [b"1", b"X", b"4"],
    ...               "shard": ["s0", "s0", "s1"]})
    >>> d = diff_chunks(t, f)
    >>> (d.added, d.changed, d.deleted, d.unchanged), sorted(d.remove.tolist()), d.todo
    ((1, 1, 1, 1), [1, 2], {'s0': {'b#0'}, 's1': {'d#0'}})
    """
    old = dict(zip(table_rows.column("id").to_pylist(),
                   zip(table_rows.column("content_hash").to_pylist(),
                       table_rows.column("_rowaddr").to_pylist(), strict=True), strict=True))
    diff = ReindexDiff()
    todo: dict[str, set[str]] = defaultdict(set)
    remove: list[int] = []
    seen: set[str] = set()
    for cid, digest, shard in zip(fresh.column("id").to_pylist(),
                                  fresh.column("content_hash").to_pylist(),
                                  fresh.column("shard").to_pylist(), strict=True):
        seen.add(cid)
        known = old.get(cid)
        if known is None:
            diff.added += 1
            todo[shard].add(cid)
        elif known[0] != digest:
            diff.changed += 1
            todo[shard].add(cid)
            remove.append(known[1])
        else:
            diff.unchanged += 1
    for cid, (_, address) in old.items():
        if cid not in seen:
            diff.deleted += 1
            remove.append(address)
    diff.todo = dict(todo)
    diff.remove = np.asarray(sorted(remove), dtype=np.uint64)
    return diff


def deletion_fragments(ds: lance.LanceDataset,
                       addresses: np.ndarray) -> tuple[list[int], list[FragmentMetadata]]:
    """Fragments emptied entirely, and fragments given deletion vectors, for `addresses`.

    A row address is `fragment_id << 32 | offset`. `LanceFragment.delete_rows` (marked
    internal in pylance 14) deletes by offset without evaluating a SQL predicate, which is
    what keeps ids from the source out of any filter string.
    """
    by_fragment: dict[int, list[int]] = defaultdict(list)
    for address in np.asarray(addresses, dtype=np.uint64).tolist():
        by_fragment[address >> ADDRESS_BITS].append(address & ((1 << ADDRESS_BITS) - 1))
    removed, updated = [], []
    for fragment_id, offsets in sorted(by_fragment.items()):
        fragment = ds.get_fragment(fragment_id)
        if fragment is None:
            raise ValueError(f"fragment {fragment_id} is not in version {ds.version}")
        meta = fragment.delete_rows(offsets)
        if meta is None:
            removed.append(fragment_id)
        else:
            updated.append(meta)
    return removed, updated
