"""Per-stage seconds that ride along with the rows, so a job can say where its time went.

Each stage (read, tokenize, forward, pool, quantize) times the block it handles and
spreads that time evenly over the block's rows in a float64 column. A sum over any set of
rows is then what those rows cost in that stage, however Ray Data splits, merges or
reorders blocks between stages, and on whatever node they ran. The writer drops the
columns; `stage_totals` sums them where the blocks end up.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

STAGE_COLUMNS = {"read": "_read_s", "tokenize": "_tokenize_s", "forward": "_forward_s",
                 "pool": "_pool_s", "quantize": "_quantize_s"}
"""Stage name -> the column holding each row's share of that stage's seconds."""
LOADED_BY = "_loaded_by"
"""Which model load (actor process and load time) embedded the row."""
EMBEDDED_AT = "_embedded_at"
"""Unix time at which the row's block left the embed actor (the same for the block)."""


def constant_columns(rows: int, values: list[float]) -> list[pa.Array]:
    """A float64 column of `rows` copies of each value: slices of one Arrow array made by
    one numpy repeat, so a block's work columns cost two calls, not two per column.

    >>> [c.to_pylist() for c in constant_columns(2, [1.0, 3.5])]
    [[1.0, 1.0], [3.5, 3.5]]
    """
    flat = pa.array(np.repeat(np.array(values, np.float64), rows))
    return [flat.slice(i * rows, rows) for i in range(len(values))]


def stage_arrays(rows: int, **seconds: float) -> dict[str, pa.Array]:
    """One float64 column per named stage, each of its `rows` holding `seconds / rows`.

    >>> {k: v.to_pylist() for k, v in stage_arrays(2, read=1.0, pool=3.0).items()}
    {'_read_s': [0.5, 0.5], '_pool_s': [1.5, 1.5]}
    """
    shares = constant_columns(rows, [s / max(rows, 1) for s in seconds.values()])
    return {STAGE_COLUMNS[stage]: column for stage, column in zip(seconds, shares, strict=True)}


def with_stage_seconds(table: pa.Table, **seconds: float) -> pa.Table:
    """Append one column per named stage, each row holding `seconds / num_rows`.

    >>> t = with_stage_seconds(pa.table({"x": [1, 2, 3, 4]}), forward=2.0)
    >>> t.column("_forward_s").to_pylist()
    [0.5, 0.5, 0.5, 0.5]
    """
    for name, array in stage_arrays(table.num_rows, **seconds).items():
        table = table.append_column(name, array)
    return table


def stage_totals(table: pa.Table) -> dict[str, float]:
    """Seconds per stage over the table's rows, for the stage columns it has.

    >>> t = with_stage_seconds(pa.table({"x": [1, 2]}), read=1.0, tokenize=3.0)
    >>> stage_totals(t.slice(0, 1))
    {'read': 0.5, 'tokenize': 1.5}
    """
    names = set(table.column_names)
    return {stage: float(pc.sum(table.column(column)).as_py() or 0.0)
            for stage, column in STAGE_COLUMNS.items() if column in names}


def first_embedded_at(table: pa.Table) -> float | None:
    """When the earliest of these rows left an embed actor (Unix time), if recorded."""
    if EMBEDDED_AT not in table.column_names or table.num_rows == 0:
        return None
    return float(pc.min(table.column(EMBEDDED_AT)).as_py())
