"""Live experiment tracking (run.tracker): TensorBoard, MLflow or Weights & Biases.

`raymoll train` logs from rank 0 of its workers (`Tracker`: the run's config as parameters,
every epoch's metrics at step = epoch), through Ray's own set-up helpers
(ray.air.integrations.mlflow.setup_mlflow, ray.air.integrations.wandb.setup_wandb) and
torch.utils.tensorboard. `raymoll tune` logs every trial with Tune's logger callbacks
(`tune_callbacks`: MLflowLoggerCallback, WandbLoggerCallback, TBXLoggerCallback); its trials'
own workers then log nothing, so no trial is logged twice. run.tracker = none (the default)
sends nothing anywhere.
"""
from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

from raymoll.errors import RaymollError

TRACKERS = ("none", "tensorboard", "mlflow", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
# Client settings (WANDB_MODE=offline, MLFLOW_TRACKING_URI, ...) the workers must see too.
ENV_PREFIXES = ("WANDB_", "MLFLOW_")


class TrackerError(RaymollError):
    """A tracker that is asked for but cannot be used."""


def check_tracker(tracker: str) -> None:
    """Raise TrackerError unless `tracker`'s client is installed (call it before Ray starts)."""
    if tracker != "none" and importlib.util.find_spec(PACKAGES[tracker]) is None:
        raise TrackerError(f"run.tracker={tracker} needs the {PACKAGES[tracker]} package: "
                           f"pip install 'raymoll[tracking]', or set run.tracker=none.")


def tracker_env() -> dict[str, str]:
    """The tracking clients' environment variables of this process, for the workers."""
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim.lr": 0.01, ...}: a nested config as one level; lists and dicts as JSON text."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value and prefix == "":
            flat |= flat_params(value, f"{key}.")
        else:
            flat[prefix + key] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return flat


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracker:
    """One tracked run: `log(metrics, step)` per epoch, then `close()`.

    run: the run's config as a dict (to_dict(Config)), logged as parameters; name: the run's
    name in the tracker; folder: where TensorBoard and W&B write when run.tracker_uri is empty.
    """

    def __init__(self, config: dict[str, Any], name: str, folder: str):
        run = config["run"]
        self.kind, uri, project = run["tracker"], run["tracker_uri"], run["tracker_project"]
        params = flat_params(config)
        if self.kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self._client = SummaryWriter(uri or os.path.join(folder, "tensorboard"))
            self._client.add_text("config", json.dumps(params, indent=1))
        elif self.kind == "mlflow":
            from ray.air.integrations.mlflow import setup_mlflow
            self._client = setup_mlflow(config=params, tracking_uri=uri or None,
                                        experiment_name=project or run["name"], run_name=name,
                                        create_experiment_if_not_exists=True)
        elif self.kind == "wandb":
            from ray.air.integrations.wandb import setup_wandb
            os.makedirs(uri or folder, exist_ok=True)  # wandb.init does not create it
            self._client = setup_wandb(config=params, project=project or "raymoll", name=name,
                                       dir=uri or folder)
        else:
            raise TrackerError(f"run.tracker must be one of {', '.join(TRACKERS[1:])} here, "
                               f"got {self.kind!r}.")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Log the numeric entries of `metrics` at `step` (the epoch)."""
        numbers = _numbers(metrics)
        if self.kind == "tensorboard":
            for key, value in numbers.items():
                self._client.add_scalar(key, value, step)
            self._client.flush()
        elif self.kind == "mlflow":
            self._client.log_metrics(numbers, step=step)
        else:
            self._client.log(numbers, step=step)

    def close(self) -> None:
        if self.kind == "mlflow":
            self._client.end_run()
        elif self.kind == "tensorboard":
            self._client.close()
        else:
            self._client.finish()


def log_evaluation(config: dict[str, Any], results: str, name: str, folder: str) -> None:
    """Log the headline of an evaluation table (raymoll.report.headline: clean and corrupted
    accuracy, NLL, ECE, raw and temperature-scaled, per family) as one tracked run, step 0."""
    from raymoll.report import headline
    from raymoll.results import read_results
    (numbers,) = headline(read_results(results))
    tracker = Tracker(config, name, folder)
    try:
        tracker.log(numbers, step=0)
    finally:
        tracker.close()


def tune_callbacks(config: dict[str, Any]) -> list:
    """Tune's logger callback for run.tracker (one run per trial), or none."""
    run = config["run"]
    kind, uri, project = run["tracker"], run["tracker_uri"] or None, run["tracker_project"]
    if kind == "tensorboard":  # event files in each trial's folder
        from ray.tune.logger import TBXLoggerCallback
        return [TBXLoggerCallback()]
    if kind == "mlflow":
        from ray.air.integrations.mlflow import MLflowLoggerCallback
        return [MLflowLoggerCallback(tracking_uri=uri, experiment_name=project or run["name"])]
    if kind == "wandb":
        from ray.air.integrations.wandb import WandbLoggerCallback
        if uri:
            os.makedirs(uri, exist_ok=True)
        return [WandbLoggerCallback(project=project or "raymoll", dir=uri)]
    return []
