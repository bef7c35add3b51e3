"""Start or join Ray, sized for the machine it runs on."""

from __future__ import annotations

import logging
import os
import warnings

# Ray starts its workers as fresh processes, so Lance's fork warning is noise here.
warnings.filterwarnings("ignore", message="lance is not fork-safe")


def ensure_ray(address: str | None = None) -> None:
    """Join `address` (or RAY_ADDRESS) if given, else start a local Ray in-process.

    Locally the dashboard stays off. Ray 2.60 resolves a loopback node address to the
    machine's own IP (`services.resolve_ip_for_localhost`), so its internal gRPC ports
    cannot be confined to 127.0.0.1 from `ray.init`; see issue 6 for the hardening.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return
    # "local" stops Ray from joining whatever cluster `ray start` left on this machine:
    # without an address Quiver promises a private, in-process run.
    ray.init(
        address="local",
        num_cpus=os.cpu_count() or 1,
        include_dashboard=False,
        logging_level=logging.WARNING,
        configure_logging=True,
    )


def cluster_resources() -> tuple[float, float]:
    """(CPUs, GPUs) the joined cluster offers."""
    import ray

    res = ray.cluster_resources()
    return float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))
