"""The TorchTrainer around the per-worker loop, and `fit` for `raymoll train`."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import ray.train
from ray.train.torch import TorchTrainer

from raymoll.config import Config, to_dict
from raymoll.io import absolute, with_scheme
from raymoll.tracking import tracker_env
from raymoll.train.loop import FAULT_DRILL_ENV, train_loop_per_worker

SCORE = "val_score"  # what "best checkpoint" means: tune.objective on the validation split
# Worker-group start-ups that may time out (60 s each) before the run fails: about 10 minutes,
# time for an autoscaler to add a cloud node, yet bounded, so max_failures=-1 cannot wait forever
# for resources that never come.
SCHEDULING_RETRIES = 10


@dataclass
class TrainResult:
    """Where a finished run left its outputs."""
    path: str                      # the run folder (metrics in progress.csv / result.json); local
    last_checkpoint: str | None    # paths, or URIs (s3://...) for a URI run.storage_path
    best_checkpoint: str | None
    metrics: dict[str, Any]        # the last reported metrics


def worker_resources(cfg: Config) -> dict[str, float]:
    """What one training worker reserves: run.cpus_per_worker CPUs, and a GPU with run.use_gpu."""
    return {"CPU": cfg.run.cpus_per_worker} | ({"GPU": 1} if cfg.run.use_gpu else {})


def build_trainer(cfg: Config, name: str | None = None, callbacks: list | None = None) -> TorchTrainer:
    """A TorchTrainer for `cfg`: workers, failure handling and checkpoints from `cfg.run`.

    A relative data.path is made absolute here, against the driver's working directory. (On a
    multi-node cluster, data.path must name storage every node can read.)
    """
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=absolute(cfg.data.path)))
    worker = worker_resources(cfg)
    # The fault drill (tests) is set in the driver's environment: the workers get it too.
    drill = {FAULT_DRILL_ENV: os.environ[FAULT_DRILL_ENV]} if os.environ.get(FAULT_DRILL_ENV) \
        else {}
    env = drill | (tracker_env() if cfg.run.tracker != "none" else {})
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=to_dict(cfg),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.run.num_workers,
                                               use_gpu=cfg.run.use_gpu,
                                               resources_per_worker=worker),
        run_config=ray.train.RunConfig(
            name=name or cfg.run.name,
            storage_path=absolute(cfg.run.storage_path),
            # A worker group that cannot be scheduled is a controller failure, retried without
            # end by default: a few tries, then the run fails (run.max_failures is for crashes).
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures,
                                                   controller_failure_limit=SCHEDULING_RETRIES),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.num_to_keep,
                                                         checkpoint_score_attribute=SCORE,
                                                         checkpoint_score_order="max"),
            callbacks=callbacks or [],
            worker_runtime_env={"env_vars": env} if env else None),
    )


def fit(cfg: Config) -> TrainResult:
    """Run training to the end (Ray must be initialised); returns where things are."""
    result = build_trainer(cfg).fit()
    best = max(result.best_checkpoints or [], key=lambda cm: cm[1].get(SCORE, float("-inf")),
               default=(None, None))[0]
    storage = cfg.run.storage_path  # Ray's paths lie inside its file system: no s3:// of their own
    return TrainResult(path=with_scheme(result.path, storage),
                       last_checkpoint=with_scheme(result.checkpoint.path, storage)
                       if result.checkpoint else None,
                       best_checkpoint=with_scheme(best.path, storage) if best else None,
                       metrics=dict(result.metrics or {}))


def summary(result: TrainResult) -> str:
    """The closing lines `raymoll train` prints."""
    m = result.metrics
    lines = [f"run folder:       {result.path}",
             f"last checkpoint:  {result.last_checkpoint}",
             f"best checkpoint:  {result.best_checkpoint}  (by {SCORE})"]
    if m:
        lines.append(f"final epoch {m.get('epoch')} (validation split): clean acc "
                     f"{m.get('clean_accuracy', 0):.2%}, clean ECE {m.get('clean_ece', 0):.4f}, "
                     f"corrupted acc {m.get('val_accuracy', 0):.2%}")
    return "\n".join(lines)
