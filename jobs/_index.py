"""Index builds on the cluster for big tables, through lance-ray.

Lance-ray trains the IVF model once and builds one index segment per worker over a share
of the fragments (the full-text index likewise), then commits them as one index; search
reads every segment. Below `index.distributed_min_rows` the driver's own single-process
build is faster than starting the workers.
"""

from __future__ import annotations

import lance

from operators.index import ann_params
from schemas.manifest import Metric
from schemas.records import VECTOR_COLUMN
from schemas.spec import IndexSpec


def index_workers(cpus: float) -> int:
    """One index worker per two cluster CPUs, at least 2.

    >>> index_workers(2), index_workers(64)
    (2, 32)
    """
    return max(2, int(cpus) // 2)


def distributed_vector_index(workers: int, storage_options: dict[str, str]):
    """A `vector_builder` for `build_indices` that builds on `workers` Ray workers."""

    def build(ds: lance.LanceDataset, spec: IndexSpec, *, metric: Metric, dims: int) -> str:
        import lance_ray

        params = ann_params(spec.ann_type, rows=ds.count_rows(), dims=dims,
                            num_partitions=spec.num_partitions)
        lance_ray.create_index(ds.uri, column=VECTOR_COLUMN, index_type=spec.ann_type,
                               metric=metric, replace=True, num_workers=workers,
                               storage_options=storage_options or None, **params)
        return (f"{spec.ann_type} ({params['num_partitions']} partitions, {metric}; "
                f"built on {workers} workers)")

    return build


def distributed_fulltext_index(workers: int, storage_options: dict[str, str]):
    """A `fulltext_builder` for `build_indices` that builds on `workers` Ray workers."""

    def build(ds: lance.LanceDataset) -> str:
        import lance_ray

        lance_ray.create_scalar_index(ds.uri, column="text", index_type="INVERTED",
                                      replace=True, num_workers=workers,
                                      storage_options=storage_options or None)
        return f"text: INVERTED (BM25; built on {workers} workers)"

    return build
