"""Where Ray runs: an existing cluster when RAY_ADDRESS is set, else an embedded local Ray."""
from __future__ import annotations

import os
import sys

import ray

from raymoll.errors import RaymollError


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster in RAY_ADDRESS, or start a local Ray (num_cpus = all by default).

    On a cluster `ray.init()` must take no resource arguments: the cluster already has them.
    """
    if ray.is_initialized():
        return
    # Worker prints would otherwise appear twice on the driver (docs/platform.md, Ray).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(num_cpus=num_cpus)


class InsufficientResources(RaymollError):
    """The cluster cannot place the workers a run asks for, now or after autoscaling."""


def _fits(node: dict[str, float], worker: dict[str, float]) -> int:
    """How many `worker` bundles one node of resources `node` holds."""
    return min((int(node.get(key, 0) // need) for key, need in worker.items() if need > 0),
               default=sys.maxsize)


def placeable_workers(worker: dict[str, float]) -> int | None:
    """Upper bound on the workers of reservation `worker` (e.g. {"CPU": 1, "GPU": 1}) the
    attached Ray can place: its alive nodes, plus every node its autoscaler may add (the node
    groups the autoscaler reports to the GCS; -1 nodes = unbounded). None when an autoscaler
    runs that does not report its node types (Ray's v1 autoscaler): nothing can be ruled out."""
    from ray._private import ray_constants
    from ray._private.state import state
    from ray.experimental.internal_kv import _internal_kv_get
    count = sum(_fits(n["Resources"], worker) for n in ray.nodes() if n["Alive"])
    config = state.get_cluster_config()  # None without an autoscaler, or with the v1 one
    if config is None:
        return None if _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS) else count
    for group in config.node_group_configs:
        per_node = _fits(dict(group.resources), worker)
        if per_node and group.max_count:
            count += sys.maxsize if group.max_count < 0 else per_node * group.max_count
    return count


def check_resources(worker: dict[str, float], num_workers: int) -> None:
    """Refuse, within seconds, a run whose `num_workers` x `worker` the cluster can never place
    (Ray Train would wait for them and retry without end). Call after `init_ray`."""
    possible = placeable_workers(worker)
    if possible is not None and possible < num_workers:
        have = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        raise InsufficientResources(
            f"the run needs {num_workers} worker(s) of {worker} each, but this Ray cluster can "
            f"place {possible} (alive nodes: {have} in all, plus what its autoscaler's node "
            f"types may add). Lower run.num_workers or run.cpus_per_worker, set "
            f"run.use_gpu=false, or attach a cluster with such nodes (RAY_ADDRESS).")
