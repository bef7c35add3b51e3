"""A uniform sample of the query texts a server answers, per table, kept in a local
folder so a QB-Norm bank can be built from real traffic (`quiver serve --keep-queries
DIR`, then `quiver table qbnorm TABLE --queries DIR/TABLE.queries.jsonl`).

Off unless asked for: it writes what users typed to disk. Each table keeps at most
`limit` texts, a reservoir sample (Vitter's algorithm R) of every text query and batch
query it answered since the server started, so the bank reflects the traffic and not
its first hour. Vector queries and refused requests are not kept. The file is JSON
lines with a `text` field, the format `quiver table qbnorm --queries` reads, and it is
replaced whole (written beside, then renamed), at most every `flush_s` seconds and when
the server stops. A restarted server starts from the texts the file holds, counting
them as the whole history: what came before them weighs a little less than it should.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

SAMPLE_LIMIT = 2_000
"""Texts kept per table: `jobs._qbnorm.BANK_LIMIT`, the most a bank uses by default."""
FLUSH_S = 5.0
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")


class QuerySample:
    """Per-table reservoirs of query texts, written to `folder` (see the module
    docstring); safe to call from the server's worker threads."""

    def __init__(self, folder: Path, *, limit: int = SAMPLE_LIMIT, flush_s: float = FLUSH_S,
                 seed: int | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if limit < 1:
            raise ValueError(f"a query sample keeps at least 1 text, got limit={limit}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.limit = limit
        self.flush_s = flush_s
        self._clock = clock
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self._writing = threading.Lock()
        """Held across a flush, so two flushes (a request's and the shutdown's) write
        one after the other and the later snapshot lands last."""
        self._kept: dict[str, list[str]] = {}
        self._seen: dict[str, int] = {}
        self._dirty: set[str] = set()
        self._flushed = clock()

    def path(self, table: str) -> Path:
        """The table's sample file.

        Raises:
            ValueError: for a name that is not a plain file name.
        """
        if not SAFE_NAME.fullmatch(table):
            raise ValueError(f"{table!r} is not a table name a sample file can carry")
        return self.folder / f"{table}.queries.jsonl"

    def _reservoir(self, table: str) -> list[str]:
        if table not in self._kept:
            from jobs._qbnorm import read_queries  # the bank's reader: one file format

            path = self.path(table)
            kept = read_queries(path, self.limit) if path.is_file() else []
            self._kept[table], self._seen[table] = kept, len(kept)
        return self._kept[table]

    def add(self, table: str, texts: Sequence[str]) -> None:
        """Offer `texts` (answered queries of `table`) to its reservoir; writes the files
        that changed when `flush_s` has passed since the last write."""
        with self._lock:
            kept = self._reservoir(table)
            for text in texts:
                self._seen[table] += 1
                if len(kept) < self.limit:
                    kept.append(text)
                else:
                    slot = int(self._rng.integers(self._seen[table]))
                    if slot >= self.limit:
                        continue
                    kept[slot] = text
                self._dirty.add(table)
            due = self._clock() - self._flushed >= self.flush_s
        if due:
            self.flush()

    def flush(self) -> list[Path]:
        """Write every table's sample that changed since its last write; the written
        paths."""
        with self._writing:
            with self._lock:
                pending = {t: list(self._kept[t]) for t in self._dirty}
                self._dirty.clear()
                self._flushed = self._clock()
            written = []
            for table, texts in pending.items():
                path = self.path(table)
                part = path.with_name(f".{path.name}.{os.getpid()}.part")
                part.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                                        for t in texts), encoding="utf-8")
                os.replace(part, path)
                written.append(path)
            return written

    def seen(self, table: str) -> int:
        """Texts offered for `table` (the file's own count after a restart)."""
        with self._lock:
            self._reservoir(table)
            return self._seen[table]
