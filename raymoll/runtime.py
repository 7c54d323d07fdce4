"""Where Ray runs: an existing cluster when RAY_ADDRESS is set, else an embedded local Ray."""
from __future__ import annotations

import os

import ray


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
