"""What a job cost: node-hours by node type, and money from a price table.

A cluster that bills by the hour bills for nodes while they are up. So a job's cost is
the time each node was part of the cluster while the job ran, summed by node type, times
that type's hourly price. `NodeClock` samples the cluster's nodes (`ray.nodes()`) at the
job's start, as it runs and at its end; a node seen first at t1 and last at t2 counts
t2 - t1 seconds (an autoscaled node that joins halfway counts from when it joined).
This is the bill of a cluster the job has to itself, as an autoscaled one does; a cluster
shared by several jobs bills each for less.

A node's type is the first of `node_types` (name -> Ray resources, as the launcher's
cluster.yaml `available_node_types` gives them) whose CPU and GPU counts it matches;
otherwise its shape: `cpu8`, `cpu4-gpu1`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

SAMPLE_EVERY_S = 10.0
"""How often a running job looks at the cluster's nodes (one GCS call each time)."""


def shape_name(resources: Mapping[str, float]) -> str:
    """A node type named by its shape.

    >>> shape_name({"CPU": 8.0, "memory": 1e9}), shape_name({"CPU": 4, "GPU": 1})
    ('cpu8', 'cpu4-gpu1')
    """
    cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
    return f"cpu{cpus}" + (f"-gpu{gpus}" if gpus else "")


def node_type(resources: Mapping[str, float],
              node_types: Mapping[str, Mapping[str, float]]) -> str:
    """The name of the first type whose CPU and GPU counts `resources` has, else its shape.

    >>> node_type({"CPU": 4, "GPU": 1}, {"head": {"CPU": 8}, "gpu": {"CPU": 4, "GPU": 1}})
    'gpu'
    """
    have = (int(resources.get("CPU", 0)), int(resources.get("GPU", 0)))
    for name, wanted in node_types.items():
        if (int(wanted.get("CPU", 0)), int(wanted.get("GPU", 0))) == have:
            return name
    return shape_name(resources)


def launcher_node_types(path: str | Path) -> dict[str, dict[str, float]]:
    """Node type name -> resources from a Ray cluster-launcher config (`cluster.yaml`).

    Raises:
        ValueError: the file has no `available_node_types` with `resources`.
    """
    import yaml

    config = yaml.safe_load(Path(path).read_text()) or {}
    types = {name: dict(node.get("resources") or {})
             for name, node in (config.get("available_node_types") or {}).items()}
    if not any(types.values()):
        raise ValueError(f"{path}: no available_node_types with resources to price")
    return types


@dataclass
class NodeClock:
    """Seconds each node of the cluster was up while a job ran (see the module docstring).

    Args:
        node_types: Type name -> resources, to name nodes (`node_type`).
        nodes: Returns the cluster's nodes as `ray.nodes()` does (`NodeID`, `Alive`,
            `Resources`); a job passes `jobs._ray.cluster_nodes`.
        clock: Seconds (monotonic).
        started: When the job started, on `clock`.
    """

    nodes: Callable[[], list[dict]]
    node_types: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    clock: Callable[[], float] = time.perf_counter
    started: float | None = None
    """When the job started (on `clock`): nodes up at the first sample count from here,
    since they were up before Ray told of them."""
    seen: dict[str, list] = field(default_factory=dict)
    """Node id -> [type, first seen, last seen]."""
    _last_sample: float = -math.inf

    def sample(self, *, force: bool = True) -> None:
        """Look at the nodes now (when `force` is off, at most every SAMPLE_EVERY_S)."""
        now = self.clock()
        if not force and now - self._last_sample < SAMPLE_EVERY_S:
            return
        self._last_sample = now
        for node in self.nodes():
            if not node.get("Alive"):
                continue
            entry = self.seen.get(node["NodeID"])
            if entry is None:
                first = now if self.seen or self.started is None else self.started
                self.seen[node["NodeID"]] = [node_type(node.get("Resources") or {},
                                                       self.node_types), first, now]
            else:
                entry[2] = now

    def node_hours(self) -> dict[str, float]:
        """Hours by node type, to 6 places (3.6 ms)."""
        hours: dict[str, float] = {}
        for kind, first, last in self.seen.values():
            hours[kind] = hours.get(kind, 0.0) + (last - first) / 3600
        return {k: round(v, 6) for k, v in sorted(hours.items())}


def job_cost(node_hours: Mapping[str, float], prices: Mapping[str, float], *,
             documents: int, tokens: int, currency: str) -> dict | None:
    """The cost of `node_hours` at `prices`, in all and per million documents and tokens;
    None without prices. A node type with no price is named in `unpriced`, not guessed.

    >>> c = job_cost({"cpu2": 0.5, "cpu4-gpu1": 0.1}, {"cpu2": 0.2}, documents=1000,
    ...              tokens=10**6, currency="USD")
    >>> c["total"], c["per_million_documents"], c["per_million_tokens"], c["unpriced"]
    (0.1, 100.0, 0.1, ['cpu4-gpu1'])
    """
    if not prices:
        return None
    by_type = {k: round(h * prices[k], 6) for k, h in node_hours.items() if k in prices}
    total = round(sum(by_type.values()), 6)
    return {"currency": currency, "total": total, "by_type": by_type,
            "per_million_documents": round(total / documents * 1e6, 6) if documents else None,
            "per_million_tokens": round(total / tokens * 1e6, 6) if tokens else None,
            "unpriced": sorted(k for k in node_hours if k not in prices)}
