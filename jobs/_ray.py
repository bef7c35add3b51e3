"""Start or join Ray, sized for the machine it runs on, and private to it when local."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator

from jobs._progress import route_ray_logs

# Ray starts its workers as fresh processes, so Lance's fork warning is noise here.
warnings.filterwarnings("ignore", message="lance is not fork-safe")

LOOPBACK = "127.0.0.1"
# Ray's single-machine switch (made for Windows and macOS): with it off, Ray keeps a node
# address of 127.0.0.1 instead of swapping in the machine's routable IP, and its GCS,
# raylet, worker, object-manager and agent servers then listen on loopback only.
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def ray_on_loopback() -> Iterator[None]:
    """While Ray starts, make it bind every server to 127.0.0.1.

    The environment variable reaches the GCS and raylet started now (and through the
    raylet, every worker); the module constant covers a Ray this process imported before.
    Both are restored afterwards, because left off they make a later `ray start` of a
    worker node in this process's environment refuse to run.
    """
    from ray._private import ray_constants

    before_env, before_flag = os.environ.get(SINGLE_MACHINE_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[SINGLE_MACHINE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before_flag
        if before_env is None:
            os.environ.pop(SINGLE_MACHINE_ENV, None)
        else:
            os.environ[SINGLE_MACHINE_ENV] = before_env


TASK_WORKERS = 4
"""Worker processes the fractional read, chunk and write tasks run in beside the actors:
one read, two chunk tasks and a write share the CPU the CPU actors leave
(`jobs._layout.ActorLayout`)."""
SOFT_LIMIT_ENV = "RAY_num_workers_soft_limit"


def worker_soft_limit(cpus: int) -> int:
    """Idle worker processes a local Ray keeps: one per CPU (Ray's default) plus the
    fractional tasks' workers.

    At Ray's default, a 2-CPU machine runs six workers at once (two actors, four tasks)
    but keeps two idle; every other one was killed between tasks and restarted, importing
    torch and transformers again. Measured at 100k documents (`benchmarks/scale.py`, 2
    cores): idle and starting workers 19.4-19.9 CPU-s at the default against 8.6-9.5 at
    this limit, the Ray daemons 16-18 against 10-11, and the job 111-118 s against 99-106 s.

    >>> worker_soft_limit(2), worker_soft_limit(64)
    (6, 68)
    """
    return cpus + TASK_WORKERS


def _is_loopback(address: str) -> bool:
    """Whether a Ray address (`host:port`, optionally `scheme://`) names this machine.

    >>> _is_loopback("127.0.0.1:6379"), _is_loopback("localhost:6379")
    (True, True)
    >>> _is_loopback("10.0.0.5:6379"), _is_loopback("auto")
    (False, False)
    """
    host = address.split("://", 1)[-1].rsplit(":", 1)[0]
    return host in ("127.0.0.1", "localhost")


def ensure_ray(address: str | None = None) -> None:
    """Join `address` (or RAY_ADDRESS) if given, else start a private Ray in-process.

    A local Ray has no dashboard and listens on 127.0.0.1 only: nothing on the network
    can reach its ports or submit work to it.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address and _is_loopback(address):
        # A cluster reached on 127.0.0.1 lives on this machine and may listen on loopback
        # only; without the switch Ray rewrites the address to the host's IP and hangs.
        with ray_on_loopback():
            ray.init(address=address, logging_level=logging.WARNING)
        route_ray_logs()
        return
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        route_ray_logs()
        return
    from ray._private.utils import get_num_cpus  # the count Ray itself will use (cgroups)

    # a limit set in the environment (Ray's own variable) wins
    system = {} if SOFT_LIMIT_ENV in os.environ else \
        {"num_workers_soft_limit": worker_soft_limit(int(get_num_cpus()) or 1)}
    # "local" stops Ray from joining whatever cluster `ray start` left on this machine:
    # without an address Quiver promises a private, in-process run.
    with ray_on_loopback():
        ray.init(
            address="local",
            include_dashboard=False,
            logging_level=logging.WARNING,
            configure_logging=True,
            _node_ip_address=LOOPBACK,
            _system_config=system or None,
        )
    route_ray_logs()
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK:  # a Ray release that ignores the switch: say so, don't hide it
        warnings.warn(f"local Ray listens on {node_ip}, not only on {LOOPBACK}",
                      RuntimeWarning, stacklevel=2)


def release_ray() -> None:
    """Leave Ray now, as a command that finished cleanly does.

    Ray's own exit hook does the same work but sleeps 0.5 s first, so that late error
    messages from workers reach the terminal; a command that succeeded has none to wait
    for. A local Ray's processes still get their graceful stop (SIGTERM, then up to a
    second each): killing them outright orphans Ray's dashboard and runtime-env agents.
    Joined to a cluster this only disconnects. A failed command keeps the exit hook.
    """
    ray = sys.modules.get("ray")  # a command that never started Ray has nothing to leave
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def cluster_nodes() -> list[dict]:
    """The cluster's nodes, as `ray.nodes()` lists them (for `operators.cost.NodeClock`)."""
    import ray

    return ray.nodes()


def cluster_resources() -> tuple[float, float]:
    """(CPUs, GPUs) the joined cluster offers."""
    import ray

    res = ray.cluster_resources()
    return float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))


def largest_node_cpus() -> float:
    """CPUs of the joined cluster's biggest live node: where every actor may end up."""
    import ray

    return max((float(n["Resources"].get("CPU", 0.0)) for n in ray.nodes() if n["Alive"]),
               default=0.0)


def autoscaler_gpus() -> float:
    """GPUs the cluster's autoscaler could start, summed over the node types it offers.

    The autoscaler publishes its node types to the GCS (the record Ray Data's own
    autoscaling reads); a type with `max_workers: -1` counts as one node of it, so an
    unbounded type never asks for more GPUs than one node brings. A cluster with no
    autoscaler (a local Ray, a fixed cluster) has no such record and offers 0.
    """
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except (ImportError, AttributeError, RuntimeError, ConnectionError) as err:
        logging.getLogger(__name__).debug("no autoscaler node types: %s", err)
        return 0.0
    if config is None:
        return 0.0
    total = 0.0
    for group in config.node_group_configs:
        per_node = float(group.resources.get("GPU", 0))
        if per_node <= 0 or group.max_count == 0:
            continue
        total += per_node * (group.max_count if group.max_count > 0 else max(group.min_count, 1))
    if "GPU" in config.max_resources:
        total = min(total, float(config.max_resources["GPU"]))
    return total
