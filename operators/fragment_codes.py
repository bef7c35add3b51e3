"""A table's fitted-code column, held once per process and shared by every open version.

The issue's one exception to "never load a column whole": a compact first stage is only
fast when its codes are in memory. A server keeps one searcher per table version it
serves, and consecutive versions share almost all their fragments (a reindex rewrites a
few, compaction a few more), so the codes are cached per fragment, keyed by the data file
that holds them and the fragment's deletion file: a new version loads only the fragments
it does not share, and a fragment's codes are in memory once however many versions name
it. The cache is bounded (`CODE_HOLD_BYTES`, least recently used out first); a table
whose codes do not fit is streamed batch by batch instead (`operators.search`).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

CODE_HOLD_BYTES = int(os.environ.get("QUIVER_CODE_HOLD_BYTES", 4 << 30))
"""Bytes of fitted codes (and their 8-byte row ids) a process holds: 4 GiB is 134M rows
of a 24 B code. Set QUIVER_CODE_HOLD_BYTES to size it to the server."""

Piece = tuple[np.ndarray, np.ndarray]
"""(row ids, codes): one fragment's live rows, codes column-major for the lookup scan."""


class FragmentCodes:
    """A byte-bounded LRU of fragments' code pieces, safe across request threads."""

    def __init__(self, max_bytes: int = CODE_HOLD_BYTES) -> None:
        self.max_bytes = max_bytes
        self.loads = 0
        """Pieces loaded from storage so far (tests read it)."""
        self._pieces: OrderedDict[tuple, Piece] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def held_bytes(self) -> int:
        return self._bytes

    def get(self, key: tuple, load: Callable[[], Piece]) -> Piece:
        """The piece under `key`, loaded (and kept, within the bound) when missing."""
        with self._lock:
            piece = self._pieces.get(key)
            if piece is not None:
                self._pieces.move_to_end(key)
                return piece
        row_ids, codes = load()
        piece = (row_ids, np.asfortranarray(codes))
        size = piece[0].nbytes + piece[1].nbytes
        with self._lock:
            self.loads += 1
            if key not in self._pieces and size <= self.max_bytes:
                self._pieces[key] = piece
                self._bytes += size
                while self._bytes > self.max_bytes:
                    _, (ids, old) = self._pieces.popitem(last=False)
                    self._bytes -= ids.nbytes + old.nbytes
        return piece


SHARED = FragmentCodes()
"""The process's cache: every `VectorSearcher` of every table uses it."""
