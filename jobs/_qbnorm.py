"""Build a table's QB-Norm query bank (`quiver table qbnorm`): embed a file of queries as
the table embeds its own, find the chunk each ranks first (DIS's activation set), and
store both beside the table (`operators.qbnorm`).

The bank is one file, replaced whole, read by searches that ask for `qbnorm`; the table
itself is not written. Its activation set is the table's state when it was built: after
a large reindex, build it again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from jobs.table import open_table
from operators.qbnorm import DEFAULT_BETA, QueryBank, save_bank
from operators.search import take_rows
from schemas.errors import SpecError

BANK_LIMIT = 2_000
"""Queries a bank keeps by default: 2,000 × 384 floats is 3 MB, and scoring 100
candidates against them about 80M multiply-adds per search."""
EMBED_BATCH = 256


def read_queries(path: Path, limit: int) -> list[str]:
    """The first `limit` queries of a file: JSON lines with a `text` field (BEIR's
    queries.jsonl), or one query per line.

    Raises:
        SpecError: the file is missing, empty, or a JSON line has no text.
    """
    if not path.is_file():
        raise SpecError(f"{path}: queries file not found")
    texts: list[str] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                try:
                    text = json.loads(line).get("text")
                except json.JSONDecodeError as err:
                    raise SpecError(f"{path}:{number}: not JSON: {err}") from None
                if not isinstance(text, str) or not text.strip():
                    raise SpecError(f"{path}:{number}: no 'text' string in this record")
                line = text
            texts.append(line)
            if len(texts) >= limit:
                break
    if not texts:
        raise SpecError(f"{path}: no queries in it")
    return texts


def build_bank(uri: str, queries: Path, *, beta: float = DEFAULT_BETA,
               limit: int = BANK_LIMIT, storage_options: Mapping[str, str] | None = None,
               progress: Callable[[str], None] = lambda _: None) -> dict:
    """Embed `queries` with the table's model, find each one's best chunk in the table,
    and store the bank beside it (see the module docstring)."""
    started = time.perf_counter()
    table = open_table(uri, storage_options=dict(storage_options or {}) or None)
    texts = read_queries(Path(queries), limit)
    progress(f"embedding {len(texts)} bank queries")
    searcher = table.searcher
    vectors = np.vstack([
        np.stack([searcher.query_vector(v) for v in table.embed_queries(texts[i:i + EMBED_BATCH])])
        for i in range(0, len(texts), EMBED_BATCH)]).astype(np.float32)
    if table.manifest.metric == "cosine":
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    progress(f"finding each bank query's best chunk in {table.ds.count_rows()} rows")
    best = [searcher.candidates(v, k=1)[0][:1] for v in vectors]
    row_ids = np.concatenate(best) if best else np.zeros(0, np.uint64)
    ids = take_rows(table.ds, row_ids, np.zeros(len(row_ids)), ("id",)).column("id")
    bank = QueryBank(vectors, float(beta), frozenset(ids.to_pylist()),
                     table.manifest.embedding_fingerprint())
    where = save_bank(uri, bank, storage_options)
    return {"table": str(uri), "bank": where, "queries": len(texts), "beta": beta,
            "activated": len(bank.activated), "version": table.ds.version,
            "seconds": round(time.perf_counter() - started, 2)}
