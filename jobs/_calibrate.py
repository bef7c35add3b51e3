"""int8 calibration: embed a spread-out sample of chunks on the driver, take their ranges.

It runs once, when a table is created with the int8 codec; the ranges go into the
manifest before any actor starts, so every actor, every later append and every query
quantize on the same grid.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa

from operators.embed import Embedder
from operators.quantize import calibrate_int8, sample_positions, truncate
from operators.sources.read import sample_documents
from operators.sources.skips import Skips
from schemas.source import Shard
from schemas.spec import SourceSpec


def sample_chunks(shards: list[Shard], *, source: SourceSpec, metadata: pa.Schema,
                  chosen: dict[str, str], chunker: Callable[[pa.Table], pa.Table],
                  wanted: int, skips: Skips | None) -> list[list[int]]:
    """Token ids of about `wanted` chunks, from shards spread evenly over the source.

    Enough documents are read for twice the wanted rows (so the sample is spread within
    them too), always deterministically, so a rerun calibrates identically.
    """
    docs = sample_documents(shards, wanted=2 * wanted, source=source, metadata=metadata,
                            chosen=chosen, skips=skips)
    if docs is None:
        return []
    ids = chunker(docs).column("input_ids")
    return [ids[i].as_py() for i in sample_positions(len(ids), wanted)]


def calibrate_ranges(embedder: Embedder, input_ids: list[list[int]], *, dims: int,
                     renormalize: bool) -> tuple[list[float], list[float]]:
    """Per-dimension int8 ranges of the sample, after the table's truncation."""
    import torch

    full = embedder.embed_ids(input_ids)
    stored = truncate(torch.from_numpy(full), dims, renormalize=renormalize).numpy()
    return calibrate_int8(np.asarray(stored))
