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


def _v1_autoscaler_may_add_nodes() -> bool:
    """Whether a v1 autoscaler that can launch nodes watches the attached cluster.

    Every Ray head runs a monitor; without an autoscaling config it is a read-only one whose
    node types merely mirror the alive nodes ("node_<node id>"). Only other node types mean a
    real node provider. Before the monitor's first report nothing can be ruled out."""
    import json

    from ray._private import ray_constants
    from ray.autoscaler._private.util import format_readonly_node_type
    from ray.experimental.internal_kv import _internal_kv_get
    if ray._private.worker.global_worker.node.is_head():
        return False  # this process started the Ray it uses: an embedded Ray never autoscales
    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    if not raw:
        return False  # no monitor at all
    report = json.loads(raw).get("autoscaler_report")
    if report is None:
        return True
    mirrors = {format_readonly_node_type(n["NodeID"]) for n in ray.nodes()}
    return not set((report.get("node_type_mapping") or {}).values()) <= mirrors


def placeable_workers(worker: dict[str, float]) -> int | None:
    """Upper bound on the workers of reservation `worker` (e.g. {"CPU": 1, "GPU": 1}) the
    attached Ray can place: its alive nodes, plus every node its autoscaler may add (the node
    groups the v2 autoscaler reports to the GCS; -1 nodes = unbounded). None when a v1
    autoscaler may add nodes: it does not report its node types, so nothing can be ruled out."""
    from ray._private.state import state
    count = sum(_fits(n["Resources"], worker) for n in ray.nodes() if n["Alive"])
    config = state.get_cluster_config()  # None without a v2 autoscaler
    if config is None:
        return None if _v1_autoscaler_may_add_nodes() else count
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
