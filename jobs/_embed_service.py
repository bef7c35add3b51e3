"""A kept embed actor: small runs on the warm scheduler's Ray reuse one loaded model.

A scheduled reindex of a few hundred chunks spends most of its seconds starting an embed
actor and loading the model into it, every run, because Ray Data's actors belong to the
run that made them. `quiver scheduler` (warm) keeps its own Ray between runs and sets
`QUIVER_KEEP_EMBEDDER=1` in their environment; a run with at most `KEPT_MAX_CHUNKS`
chunks to embed on CPU then hands its blocks to a detached actor of that Ray, named after
the model and the settings that shape its output, and creates it when no earlier run
did. The next run finds the model loaded.

Design choices:
- The actor is asked for no CPU (`num_cpus=0`): between runs it holds only memory, so a
  large run's actor pool still gets every core; a small run's blocks share the cores
  with its own read and write tasks, as an actor pool's would.
- Each run's codecs (int8 ranges, fitted code) come with its blocks: the actor keeps one
  `Embedder.with_codebook` view per codebook, sharing the weights.
- Runs larger than `KEPT_MAX_CHUNKS`, GPU runs, and runs outside a warm scheduler use
  the actor pool as before: one process and model per actor per run.
- The actor lives as long as the scheduler's Ray (the scheduler's process). Ray restarts
  it when its process dies and retries the block it held (`KEPT_RESTARTS`), as Ray Data
  restarts a pool's actor.

The same actor class also serves a small one-off run (`early_wanted`): Ray Data starts
a pool's actors only when the stream reaches the embed stage, after planning and the
reindex diff, so a small `quiver run` on its own Ray waited for a process to import
torch and transformers and load the model (about 4 s here) after everything else. A
run that is likely small starts one such actor, for this run only, as soon as Ray is
up; its imports and load overlap planning. If the plan turns out larger than
`KEPT_MAX_CHUNKS`, the actor is killed and the pool runs as before.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys

import numpy as np
import pyarrow as pa

from jobs._job_metrics import ActorMeter
from operators.embed import Embedder
from operators.model import ModelInfo
from operators.quantize import Codebook

KEEP_ENV = "QUIVER_KEEP_EMBEDDER"
"""Set to 1 by the warm scheduler in its runs' environment."""
EARLY_ENV = "QUIVER_EARLY_EMBEDDER"
"""Set to 0 to never start a run's model actor early (the test suite does, so that its
small jobs run the actor pool that large jobs use)."""
EARLY_MAX_SOURCE_BYTES = 4 << 20
"""The largest source (listed bytes) a build starts its model actor early for: about
5,000 chunks of text (scifact's first 1,500 documents are 2.3 MB and 2,764 windows chunks)."""
KEPT_MAX_CHUNKS = 5_000
"""The most chunks a run sends to the kept actor (about 20 s of MiniLM forward on 2
cores); a larger run starts its own actor pool, whose start-up it then amortises."""
NAMESPACE = "quiver"
KEPT_TASK_CPUS = 0.25
"""CPUs Ray counts for the task that hands a block to the kept actor and waits."""
KEPT_RESTARTS = 3
"""Times Ray restarts a kept actor whose process died (the OOM killer, a crash), and
retries the block it was embedding: a run on it survives what a run on the actor pool
survives."""
KEPT_CODEBOOKS = 8
"""Codebook views an actor keeps (one per table it served lately)."""


class KeptEmbedder:
    """One loaded model for many runs' blocks (the scheduler's detached actor, or a
    small run's early one): a codebook view per table, each block metered as the
    pool's actors are (`jobs._job_metrics.ActorMeter`)."""

    def __init__(self, info: ModelInfo, **settings) -> None:
        self.embedder = Embedder(info, **settings)
        self.views: dict[str, Embedder] = {}
        self.meter = ActorMeter()

    def embed(self, key: str, codebook: Codebook, batch: pa.Table, table: str) -> pa.Table:
        """`Embedder.__call__` on a block with the run's codecs; `table` is its metrics
        tag."""
        view = self.views.get(key)
        if view is None:
            if len(self.views) >= KEPT_CODEBOOKS:
                self.views.pop(next(iter(self.views)))
            view = self.views[key] = self.embedder.with_codebook(codebook)
        return self.meter.block(view, batch, table=table)

    def embed_ids(self, input_ids: list[list[int]]) -> np.ndarray:
        """Full-size vectors of token id lists (a new table's calibration sample)."""
        return self.embedder.embed_ids(input_ids)


def wanted(*, chunks: int, gpus: float) -> bool:
    """True when this run should use the kept actor: the warm scheduler asked for it,
    the work is small, and it embeds on CPU."""
    return os.environ.get(KEEP_ENV) == "1" and chunks <= KEPT_MAX_CHUNKS and not gpus


def kept_threads(layout, pinned: int | None) -> int:
    """The torch threads of the kept actor: one actor does the work of the pool's
    `layout.actors`, so it gets all their threads (unless the spec pins a count).
    Without this a run large enough for two one-thread actors on two cores ran on one
    thread, and was another kept actor (the thread count is in its name).

    >>> from jobs._layout import ActorLayout
    >>> kept_threads(ActorLayout(2, 0.5, 0.0, 1), None), kept_threads(ActorLayout(1, 0.5,
    ...     0.0, 2), None), kept_threads(ActorLayout(2, 0.5, 0.0, 1), 1)
    (2, 2, 1)
    """
    return pinned or layout.threads * layout.actors


def actor_name(info: ModelInfo, settings: dict) -> str:
    """The kept actor's name: the model's folder and every setting that shapes its
    output or speed, hashed."""
    key = repr((info.path, info.pooling, info.normalize, info.dim, sorted(settings.items())))
    return "quiver-embed-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _actor_class():
    """`KeptEmbedder` as a Ray actor: no CPU asked, one block at a time, restarted with
    its block retried when its process dies."""
    import ray

    return ray.remote(num_cpus=0, max_concurrency=1, max_restarts=KEPT_RESTARTS,
                      max_task_retries=KEPT_RESTARTS)(KeptEmbedder)


def kept_embedder(info: ModelInfo, settings: dict):
    """The kept actor for this model and settings, created on first use."""
    return _actor_class().options(name=actor_name(info, settings), namespace=NAMESPACE,
                                  lifetime="detached", get_if_exists=True).remote(info, **settings)


def early_wanted(*, nodes: int, gpus: float, device: str, reindex: bool,
                 source_bytes: int, limit: int | None = None) -> bool:
    """True when a run should start its model actor while it plans: it runs on one
    node with no GPU to ask for, outside the warm scheduler (whose kept actor is
    loaded already), and is likely small: a reindex (most change little), a build from
    at most `EARLY_MAX_SOURCE_BYTES` of source, or one of at most `KEPT_MAX_CHUNKS`
    documents by its `source.limit`. `QUIVER_EARLY_EMBEDDER=0` says no to all (the
    rules are tested in tests/test_early_embedder.py, which sets the variable).
    """
    if os.environ.get(KEEP_ENV) == "1" or os.environ.get(EARLY_ENV) == "0":
        return False
    small = reindex or 0 < source_bytes <= EARLY_MAX_SOURCE_BYTES \
        or (limit is not None and limit <= KEPT_MAX_CHUNKS)
    return nodes == 1 and not gpus and device != "cuda" and small


class EarlyEmbedder:
    """A run's own model actor, started while it plans (`early_wanted`); the run kills it
    when it is done with it, or once its plan is too large for one actor."""

    def __init__(self) -> None:
        self.actor = None
        self.used = False
        """Whether the run embedded on it (the summary's `actor_early`)."""

    def start(self, info: ModelInfo, settings: dict) -> None:
        """Create the actor: Ray starts its process and loads the model meanwhile."""
        self.actor = _actor_class().remote(info, **settings)

    def kill(self) -> None:
        """End the actor, if there is one (again is a no-op). It runs in the job's
        `finally`, so it never raises over the job's own error: when Ray itself is
        gone, so is the actor, which is not detached and dies with its driver."""
        if self.actor is not None:
            import ray

            actor, self.actor = self.actor, None
            if not ray.is_initialized():  # ray.kill would start a Ray of its own
                return
            try:
                ray.kill(actor)
            except Exception as err:  # noqa: BLE001 - the job's error, if any, matters more
                print(f"[quiver] embed: could not kill the early model actor ({err}); it "
                      "ends with this process", file=sys.stderr, flush=True)


def codebook_key(codebook: Codebook) -> str:
    """A digest that tells one run's codecs from another's."""
    return hashlib.sha256(pickle.dumps(codebook)).hexdigest()[:16]


def embed_on_kept(batch: pa.Table, *, actor, key: str, codebook, table: str) -> pa.Table:
    """The Ray Data map function of a run on a kept or early actor: the block there and
    back (`codebook` is the run's `Codebook`, put in the object store once; `table` the
    metrics tag)."""
    import ray

    return ray.get(actor.embed.remote(key, codebook, batch, table))
