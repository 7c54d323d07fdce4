"""Where the sets are scored: in this process (`local`), or on a Ray actor pool (`ray`).

The Ray runner starts one actor per share of a GPU (four sets share a GPU: one small-image set
alone leaves most of it idle), or per CPU on a cluster without GPUs; each actor holds the model
and the clean test split on its device for the whole evaluation, and `ray.util.ActorPool` hands
it the next set when it is free. Official -C blocks are read in the driver only when an actor
is free to take them, so at most one block per actor is in flight.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Iterator, Sequence

import torch

from raymoll.evaluation.scoring import SetScorer
from raymoll.evaluation.sets import EvalSet, OfficialSource
from raymoll.metrics import MetricAccumulator

GPU_SHARE = 0.25

Scored = Iterator[tuple[EvalSet, MetricAccumulator, "MetricAccumulator | None"]]


def ray_attached() -> bool:
    """Whether this process belongs to a Ray cluster: RAY_ADDRESS, or a Ray initialised here."""
    running = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    return bool(os.environ.get("RAY_ADDRESS") or running)


def cluster_gpus() -> float:
    """GPUs of the attached (or, when none is, a newly started local) Ray cluster."""
    from raymoll.runtime import init_ray
    init_ray()
    import ray
    return ray.cluster_resources().get("GPU", 0.0)


class LocalRunner:
    """Scores every set in this process, in order, on one device."""

    name = "local"

    def __init__(self, scorer_kwargs: dict[str, Any], device: torch.device):
        self.scorer = SetScorer(**scorer_kwargs, device=device)
        self.description = f"local on {device}"

    def fit_temperature(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        return self.scorer.fit_temperature(images, labels)

    def score(self, sets: Sequence[EvalSet], official: OfficialSource,
              temperature: float | None) -> Scored:
        for spec in sets:
            yield (spec, *self.scorer(spec, temperature, official(spec)))

    def close(self) -> None:
        pass


class _ScorerActor:
    """A Ray actor around one SetScorer on the actor's device."""

    def __init__(self, scorer_kwargs: dict[str, Any]):
        # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU; on a CPU share the CPU scores.
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.scorer = SetScorer(**scorer_kwargs, device=device)

    def fit_temperature(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        return self.scorer.fit_temperature(images, labels)

    def score(self, spec: EvalSet, temperature: float | None,
              official: tuple[torch.Tensor, torch.Tensor] | None
              ) -> tuple[EvalSet, torch.Tensor, torch.Tensor | None]:
        raw, scaled = self.scorer(spec, temperature, official)
        return spec, raw.state().cpu(), None if scaled is None else scaled.state().cpu()


class RayRunner:
    """Scores the sets on a pool of actors: one per GPU share, or one per CPU without GPUs."""

    name = "ray"

    def __init__(self, scorer_kwargs: dict[str, Any], gpus: float, num_sets: int,
                 max_actors: int | None = None):
        import ray
        from ray.util import ActorPool

        if gpus:
            resources, count = {"num_gpus": GPU_SHARE}, int(gpus / GPU_SHARE)
            self.description = f"ray, {{n}} actors on {GPU_SHARE:g} GPU each"
        else:
            cpus = int(ray.cluster_resources().get("CPU", 1))
            resources, count = {"num_cpus": 1}, max(1, cpus)
            self.description = "ray, {n} actors on 1 CPU each (the cluster has no GPUs)"
        count = max(1, min(count, num_sets, max_actors or count))
        self.description = self.description.format(n=count)
        shared = ray.put(scorer_kwargs)  # shipped once, not once per actor
        actor = ray.remote(**resources)(_ScorerActor)
        self.actors = [actor.remote(shared) for _ in range(count)]
        self.pool = ActorPool(self.actors)

    def fit_temperature(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        import ray
        return ray.get(self.actors[0].fit_temperature.remote(images, labels))

    def score(self, sets: Sequence[EvalSet], official: OfficialSource,
              temperature: float | None) -> Scored:
        todo = list(sets)
        while todo or self.pool.has_next():
            while todo and self.pool.has_free():
                spec = todo.pop(0)
                block = official(spec)
                self.pool.submit(lambda a, args: a.score.remote(*args),
                                 (spec, temperature, block))
            spec, raw, scaled = self.pool.get_next_unordered()
            yield (spec, MetricAccumulator.from_state(raw),
                   None if scaled is None else MetricAccumulator.from_state(scaled))

    def close(self) -> None:
        import ray
        for actor in self.actors:
            ray.kill(actor)


def choose_runner(runner: str | None, device: torch.device | None) -> tuple[str, float]:
    """(runner name, cluster GPUs) for --runner `runner` (None: ray when a cluster with GPUs
    is attached and the CPU was not asked for, else local). Starts no Ray for `local`."""
    if runner == "local" or (runner is None and (not ray_attached() or (
            device is not None and device.type == "cpu"))):
        return "local", 0.0
    gpus = cluster_gpus()
    if runner is None and not gpus:
        return "local", 0.0
    return "ray", gpus
