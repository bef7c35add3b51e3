"""Nearest-neighbour search over a Quiver table with Lance's own scanner."""

from __future__ import annotations

from collections.abc import Sequence

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.manifest import Metric
from schemas.records import VECTOR_COLUMN

DEFAULT_COLUMNS = ("id", "doc_id", "chunk", "text")


def search(ds: lance.LanceDataset, vector: np.ndarray, *, k: int, metric: Metric,
           columns: Sequence[str] = DEFAULT_COLUMNS, nprobes: int | None = None,
           refine_factor: int | None = None) -> pa.Table:
    """Top-k rows by similarity, best first, with a `score` column (higher is closer).

    Lance returns distances (`1 - dot` or `1 - cosine`); the score turns them back into
    similarities so callers never have to know which metric a table uses.
    """
    if k < 1:
        raise ValueError(f"Got k={k}. Must be at least 1.")
    nearest: dict = {"column": VECTOR_COLUMN, "q": np.asarray(vector, dtype=np.float32),
                     "k": k, "metric": metric}
    if nprobes is not None:
        nearest["nprobes"] = nprobes
    if refine_factor is not None:
        nearest["refine_factor"] = refine_factor
    hits = ds.to_table(nearest=nearest, columns=[*columns, "_distance"])
    score = pc.subtract(pa.scalar(1.0, pa.float32()), hits.column("_distance"))
    return hits.drop_columns(["_distance"]).append_column("score", score)


def fold_to_documents(doc_ids: Sequence[str], scores: Sequence[float]) -> list[tuple[str, float]]:
    """Keep each document's best chunk score, best first.

    >>> fold_to_documents(["a", "b", "a"], [0.9, 0.8, 0.95])
    [('a', 0.95), ('b', 0.8)]
    """
    best: dict[str, float] = {}
    for d, s in zip(doc_ids, scores, strict=True):
        if d not in best or s > best[d]:
            best[d] = s
    return sorted(best.items(), key=lambda kv: -kv[1])
