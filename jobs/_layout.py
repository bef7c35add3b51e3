"""Where the embed stage runs: how many actors, and what each of them holds."""

from __future__ import annotations

import math
from dataclasses import dataclass

from operators.embed import CPU_ROWS_PER_BLOCK, DEFAULT_BATCH_TOKENS, GPU_BATCHES_PER_BLOCK
from schemas.spec import JobSpec


def rows_per_block(spec: JobSpec, *, gpu: bool, chunk_tokens: int) -> int:
    """Chunks handed to one actor at once: `compute.rows_per_batch` when the spec sets
    it, else `CPU_ROWS_PER_BLOCK` on CPU, and on a GPU `GPU_BATCHES_PER_BLOCK` budgets'
    worth of full-length chunks, so the number follows the token budget.

    >>> from schemas.spec import parse_spec
    >>> s = parse_spec({"kind": "embed", "table": "t.lance",
    ...                 "source": {"uri": "c.jsonl", "id_field": "_id"}})
    >>> rows_per_block(s, gpu=False, chunk_tokens=256), rows_per_block(s, gpu=True,
    ...     chunk_tokens=256), rows_per_block(s, gpu=True, chunk_tokens=512)
    (256, 1024, 512)
    """
    if spec.compute.rows_per_batch is not None:
        return spec.compute.rows_per_batch
    if not gpu:
        return CPU_ROWS_PER_BLOCK
    budget = spec.compute.batch_tokens or DEFAULT_BATCH_TOKENS["cuda"]
    return max(1, GPU_BATCHES_PER_BLOCK * budget // max(1, chunk_tokens))


@dataclass(frozen=True)
class ActorLayout:
    """How the embed stage is placed on the cluster."""

    actors: int
    cpus: float
    """Logical CPUs each actor holds."""
    gpus: float
    threads: int
    """torch threads inside each actor."""
    task_cpus: float = 1.0
    """Logical CPUs the actors leave free on a node, for read/chunk and write tasks."""
    rows_per_block: int = CPU_ROWS_PER_BLOCK
    """Chunks handed to an actor at once (`rows_per_block`)."""

    @property
    def read_cpus(self) -> float:
        """A read task decompresses and parses; chunking and tokenizing run in their own
        tasks (`chunk_cpus`). With CPU actors, the reads and chunk tasks share what the
        actors leave, less a write task's share: the actors wait for blocks part of the
        time, and tokenizing is then what keeps the cores busy. A read task of a
        compressed file streams the whole file and runs for minutes; reads holding
        everything the actors left kept every write (so every commit) waiting until one
        ended (at 1M documents the first commit came at 158 s). Reads and chunk tasks
        ask for different shares, which also keeps Ray Data from fusing them into one
        task (a fused task would tokenize a whole compressed file on one core).

        >>> ActorLayout(2, 0.5, 0.0, 1).read_cpus, ActorLayout(1, 1.0, 1.0, 1).read_cpus
        (0.225, 0.5)
        """
        if self.gpus:
            return round(self.task_cpus / 2, 4)
        return round((self.task_cpus - self.write_cpus) * 0.3, 4)

    @property
    def chunk_cpus(self) -> float:
        """A chunk task's share: two of them and a read task fill what the actors and a
        write task leave (on CPU); beside GPU actors each has its CPU.

        >>> ActorLayout(2, 0.5, 0.0, 1).chunk_cpus, ActorLayout(1, 1.0, 1.0, 1).chunk_cpus
        (0.2625, 1.0)
        """
        if self.gpus:
            return self.task_cpus
        return round((self.task_cpus - self.write_cpus) * 0.35, 4)

    @property
    def write_cpus(self) -> float:
        """A write task is short I/O; a small share keeps it from queueing behind reads
        (a write waiting for a whole CPU held checkpoints back until every read ended)."""
        return round(self.task_cpus / 4, 4)


def uses_gpus(spec: JobSpec, gpus: float) -> bool:
    """Whether the embed actors ask for GPUs: the spec asks for them (whether or not any
    are up yet, so an autoscaler can start them), or the cluster has some and the spec
    allows them."""
    if spec.model.device == "cpu":
        return False
    if spec.model.device == "cuda" or spec.compute.gpus_per_actor is not None:
        return True
    return gpus >= 1


MIN_BATCHES_PER_ACTOR = 8
"""Batches of work an extra CPU actor must get to be worth its model load."""


def actor_layout(spec: JobSpec, *, cpus: float, gpus: float, cores: int,
                 documents: int | None = None, node_cpus: float | None = None,
                 chunk_tokens: int = 256) -> ActorLayout:
    """Place the embed actors.

    One actor per GPU when the cluster has GPUs (unless the spec pins the CPU). On CPU,
    one single-threaded actor per logical CPU, but each actor gets at least
    `MIN_BATCHES_PER_ACTOR` blocks of work (`documents` / `rows_per_block`): each model
    copy costs a few seconds to load, which a small reindex would mostly spend loading
    (scifact's 164 changed chunks: two MiniLM loads for two batches).
    One thread per actor beats one actor with every thread: measured with bf16 on two
    cores, two 1-thread processes run the forward pass 8% faster together than one
    2-thread process, and a core taken by a read task or a Ray daemon stalls one actor
    instead of every thread of a parallel matmul. Together the actors hold at most all
    CPUs but one, so read/chunk and write tasks always find a CPU: actors holding every
    CPU of a two-core machine starve the read tasks and the job hangs. The share is
    sized on the largest node (`node_cpus`), not the whole cluster: when nodes die, Ray
    restarts their actors on the survivors, and even all of them on one node must leave
    a CPU free there.

    >>> from schemas.spec import parse_spec
    >>> s = parse_spec({"kind": "embed", "table": "t.lance",
    ...                 "source": {"uri": "c.jsonl", "id_field": "_id"}})
    >>> actor_layout(s, cpus=16, gpus=4, cores=16)
    ActorLayout(actors=4, cpus=1.0, gpus=1.0, threads=1, task_cpus=1.0, rows_per_block=1024)
    >>> actor_layout(s, cpus=2, gpus=0, cores=2)
    ActorLayout(actors=2, cpus=0.5, gpus=0.0, threads=1, task_cpus=1.0, rows_per_block=256)
    >>> actor_layout(s, cpus=2, gpus=0, cores=2, documents=40).threads  # one batch of work
    2
    >>> actor_layout(s, cpus=2, gpus=0, cores=2, documents=1000).actors  # 4 blocks: one
    1
    >>> actor_layout(s, cpus=2, gpus=0, cores=2, documents=10_000).actors
    2
    >>> actor_layout(s, cpus=2, gpus=0, cores=2, documents=0).actors  # a finished job
    1
    >>> actor_layout(s, cpus=1, gpus=0, cores=1).cpus  # one CPU: actor and tasks share it
    0.5
    >>> lay = actor_layout(s, cpus=3, gpus=0, cores=2, node_cpus=2)  # nodes of 2 and 1 CPU
    >>> lay.actors, round(lay.actors * lay.cpus, 2)  # all on the 2-CPU node: 1 CPU free
    (3, 1.0)
    >>> many = parse_spec({**s.model_dump(), "compute": {"actors": 1000}})
    >>> actor_layout(many, cpus=2, gpus=0, cores=2).task_cpus  # still a CPU for tasks
    1.0
    """
    if uses_gpus(spec, gpus):
        per_gpu = spec.compute.gpus_per_actor or 1.0
        actors = spec.compute.actors or max(1, int(gpus / per_gpu))
        return ActorLayout(actors, 1.0, per_gpu, spec.compute.torch_threads or 1,
                           rows_per_block=rows_per_block(spec, gpu=True,
                                                         chunk_tokens=chunk_tokens))
    block = rows_per_block(spec, gpu=False, chunk_tokens=chunk_tokens)
    actors = spec.compute.actors
    if actors is None:
        worth = int(cpus) if documents is None else \
            math.ceil(documents / block) // MIN_BATCHES_PER_ACTOR
        actors = max(1, min(int(cpus), worth))
    room = min(cpus, node_cpus or cpus)
    per_actor = min(1.0, (room - 1) / actors) if room > 1 else room / (2 * actors)
    threads = spec.compute.torch_threads or max(1, cores // actors)
    return ActorLayout(actors, per_actor, 0.0, threads,
                       task_cpus=round(min(1.0, room - actors * per_actor), 4),
                       rows_per_block=block)
