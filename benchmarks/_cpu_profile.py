"""Where a job's CPU time goes: sample a process tree and charge CPU-seconds to roles.

A Ray worker process runs many tasks over its life and renames itself for each one
(`ray::ReadQuiverShards`, `ray::Write…`, `ray::IDLE`), so the CPU a process used since the
last sample is charged to the title it has now. Sampling every 0.2 s makes that exact for
the embed actor (one title for its whole life) and close for short tasks.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import psutil

ROLES = (
    ("embed actor", ("Embedder)", "MapWorker(")),  # MapBatches(MeteredEmbedder)
    ("read tasks", ("ReadQuiverShards", "QuiverShards")),
    ("chunk + tokenize tasks", ("ChunkBlocks",)),
    ("write tasks", ("Write", "QuiverLance", "write_shard_fragments")),
    ("plan tasks (validate, dedup, rejects)", ("ray::_scan", "ray::_dedup", "ray::_rejects")),
    ("Ray Data helper actors", ("_StatsActor", "_AutoscalingCoordinator",
                                "ActorLocationTracker", "SplitCoordinator")),
    ("Ray daemons (gcs, raylet, agents, log monitor)",
     ("gcs_server", "raylet", "dashboard", "agent", "log_monitor", "monitor.py",
      "runtime_env", "ray_client")),
    ("idle Ray workers (and workers starting up)", ("ray::IDLE",)),
)


def _title(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline()) or proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "other"


def _role(proc: psutil.Process, root: int) -> str:
    if proc.pid == root:
        return "driver (planning, Ray Data executor, commit)"
    title = _title(proc)
    for role, marks in ROLES:
        if any(m in title for m in marks):
            return role
    return "other"


class CpuProfile:
    """Charge the CPU of `pid` and all its descendants to roles until `stop()`."""

    def __init__(self, pid: int, *, interval: float = 0.2) -> None:
        self.pid = pid
        self.interval = interval
        self.seconds: dict[str, float] = defaultdict(float)
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = time.perf_counter()
        self.wall = 0.0

    def start(self) -> CpuProfile:
        self._thread.start()
        return self

    def _sample(self) -> None:
        try:
            root = psutil.Process(self.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for proc in tree:
            try:
                times = proc.cpu_times()
                used = times.user + times.system
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            delta = used - self._last.get(proc.pid, 0.0)
            self._last[proc.pid] = used
            if delta > 0:
                self.seconds[_role(proc, self.pid)] += delta

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def stop(self) -> dict[str, float]:
        """Stop sampling; CPU-seconds per role (the last interval before exit is lost)."""
        self._stop.set()
        self._thread.join()
        self.wall = time.perf_counter() - self.started
        return dict(self.seconds)
