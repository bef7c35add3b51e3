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
"""

from __future__ import annotations

import hashlib
import os
import pickle

import pyarrow as pa

from operators.embed import Embedder
from operators.model import ModelInfo
from operators.quantize import Codebook

KEEP_ENV = "QUIVER_KEEP_EMBEDDER"
"""Set to 1 by the warm scheduler in its runs' environment."""
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
    """The detached actor: one loaded model, a codebook view per table."""

    def __init__(self, info: ModelInfo, **settings) -> None:
        self.embedder = Embedder(info, **settings)
        self.views: dict[str, Embedder] = {}

    def embed(self, key: str, codebook: Codebook, batch: pa.Table) -> pa.Table:
        """`Embedder.__call__` on a block with the run's codecs."""
        view = self.views.get(key)
        if view is None:
            if len(self.views) >= KEPT_CODEBOOKS:
                self.views.pop(next(iter(self.views)))
            view = self.views[key] = self.embedder.with_codebook(codebook)
        return view(batch)


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


def kept_embedder(info: ModelInfo, settings: dict):
    """The kept actor for this model and settings, created on first use."""
    import ray

    cls = ray.remote(num_cpus=0, max_concurrency=1, max_restarts=KEPT_RESTARTS,
                     max_task_retries=KEPT_RESTARTS)(KeptEmbedder)
    return cls.options(name=actor_name(info, settings), namespace=NAMESPACE,
                       lifetime="detached", get_if_exists=True).remote(info, **settings)


def codebook_key(codebook: Codebook) -> str:
    """A digest that tells one run's codecs from another's."""
    return hashlib.sha256(pickle.dumps(codebook)).hexdigest()[:16]


def embed_on_kept(batch: pa.Table, *, actor, key: str, codebook) -> pa.Table:
    """The Ray Data map function of a run on the kept actor: the block there and back
    (`codebook` is the run's `Codebook`, put in the object store once)."""
    import ray

    return ray.get(actor.embed.remote(key, codebook, batch))
