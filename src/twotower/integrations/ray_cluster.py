"""Connecting to a Ray cluster, or starting a local one that listens and connects on 127.0.0.1 only.

By default Ray binds the machine's network address (and all interfaces for its gRPC servers). A local
cluster started here instead uses the loopback address for every process: node IP 127.0.0.1, no
dashboard, no usage-stats reporting. Ray reads the switch that keeps the node IP on loopback
(`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`: "no multi-node cluster", under which Ray resolves the node
IP to the loopback address) when it is imported, so `loopback_environment()` must run before `import ray`;
`start_local_cluster` sets it itself when Ray is not imported yet, and refuses a node that did not
end up on 127.0.0.1.
"""

from __future__ import annotations

import logging
import os
import sys

LOOPBACK = "127.0.0.1"
LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # node IP resolves to 127.0.0.1 (single-machine mode)
    "RAY_USAGE_STATS_ENABLED": "0",  # no reporting to an outside address
}


class ClusterError(RuntimeError):
    """Ray could not be started or reached as asked."""


def loopback_environment() -> None:
    """Set the environment that keeps a local Ray cluster on loopback (call before importing ray;
    the processes Ray starts inherit it)."""
    os.environ.update(LOOPBACK_ENV)


def start_local_cluster(
    *, num_cpus: int | None = None, num_gpus: int | None = None, object_store_memory: int | None = None, **init_kwargs
) -> dict:
    """`ray.init` a new single-machine cluster on 127.0.0.1 only; returns Ray's address info."""
    if "ray" not in sys.modules:
        loopback_environment()
    elif any(os.environ.get(k) != v for k, v in LOOPBACK_ENV.items()):
        raise ClusterError(
            "Ray was imported before the loopback settings were made: call "
            "twotower.integrations.ray_cluster.loopback_environment() before importing ray"
        )
    import ray

    context = ray.init(
        address="local",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        object_store_memory=object_store_memory,
        include_dashboard=False,
        _node_ip_address=LOOPBACK,
        logging_level=logging.WARNING,
        **init_kwargs,
    )
    info = dict(context.address_info)
    if info.get("node_ip_address") != LOOPBACK:
        ray.shutdown()
        raise ClusterError(f"the local Ray node came up on {info.get('node_ip_address')}, not {LOOPBACK}")
    return info


def connect(address: str | None) -> bool:
    """Use the Ray cluster this process is already connected to, the one at `address` (e.g. "auto" or
    "HEAD:6379"), or else a new loopback-only local one. Returns True when this call started Ray (the
    caller shuts it down)."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return False
    if address is None:
        start_local_cluster()
        return True
    import ray

    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ClusterError(f"cannot connect to the Ray cluster at {address}: {err}") from None
    return True


def cluster_resources() -> dict[str, float]:
    """The connected cluster's resources, e.g. {"CPU": 16.0, "GPU": 8.0}."""
    import ray

    return {name: float(n) for name, n in ray.cluster_resources().items()}
