"""Index builds and compaction on the cluster for big tables.

Lance-ray trains the IVF model once and builds one index segment per worker over a share
of the fragments (scalar and full-text indices likewise), then commits them as one index;
search reads every segment. Compaction runs Lance's own compaction tasks as Ray tasks and
commits their rewrites once, from the driver. Below `index.distributed_min_rows` the
driver's own single-process build (`operators.index.Builder`) is faster than starting
the workers.
"""

from __future__ import annotations

from collections.abc import Collection

import lance

from operators.index import Builder, compaction_options

DISTRIBUTED_SCALAR_KINDS = frozenset({"BTREE", "BITMAP", "INVERTED", "FTS", "ZONEMAP"})
"""Scalar index kinds lance-ray builds in segments; any other is built by the driver."""


def index_workers(cpus: float) -> int:
    """One index worker per two cluster CPUs, at least 2.

    >>> index_workers(2), index_workers(64)
    (2, 32)
    """
    return max(2, int(cpus) // 2)


class ClusterBuilder(Builder):
    """`operators.index.Builder` whose builds run on `workers` Ray workers.

    Lance-ray opens the latest version again before it commits an index, so a build it
    runs is not refused by a takeover's fence (`operators.lease.fence`) the way a build
    from the job's own table object is. With the run's `lease`, each such build checks
    it first: a run taken over before a build starts builds nothing; one stalled inside
    a build can still commit it (docs/reliability.md)."""

    def __init__(self, workers: int, storage_options: dict[str, str], *,
                 lease=None) -> None:
        self.workers = workers
        self.storage_options = storage_options or None
        self.lease = lease

    def _check(self) -> None:
        if self.lease is not None:
            self.lease.check()

    def vector(self, ds: lance.LanceDataset, column: str, *, index_type: str, metric: str,
               params: dict) -> None:
        self._check()
        import lance_ray

        lance_ray.create_index(ds.uri, column=column, index_type=index_type, metric=metric,
                               replace=True, num_workers=self.workers,
                               storage_options=self.storage_options, **params)

    def scalar(self, ds: lance.LanceDataset, column: str, kind: str) -> None:
        if kind not in DISTRIBUTED_SCALAR_KINDS:
            super().scalar(ds, column, kind)
            return
        self._check()
        import lance_ray

        lance_ray.create_scalar_index(ds.uri, column=column, index_type=kind, replace=True,
                                      num_workers=self.workers,
                                      storage_options=self.storage_options)

    def compact(self, ds: lance.LanceDataset, *, settled: Collection[int] = ()) -> int:
        """Lance's compaction plan, its tasks run as Ray tasks on `ds`'s version (each
        rewrites its group of fragments into new files), then one commit from here."""
        import ray
        from lance.optimize import Compaction

        plan = Compaction.plan(ds, compaction_options(ds, settled))
        if not plan.num_tasks():
            return 0
        task = ray.remote(_compact_task)
        rewrites = ray.get([task.remote(ds.uri, ds.version, self.storage_options, t)
                            for t in plan.tasks])
        Compaction.commit(ds, rewrites)
        return sum(len(t.fragments) for t in plan.tasks)


def _compact_task(uri: str, version: int, storage_options: dict[str, str] | None, task):
    """One Lance compaction task, on the version the plan was made from."""
    return task.execute(lance.dataset(uri, version=version, storage_options=storage_options))
