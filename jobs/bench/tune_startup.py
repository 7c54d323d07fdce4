"""Where the wall time of a small Tune search goes: Ray start-up versus training.

Runs the search of jobs/configs/fashion_tune.yaml shrunk to tiny data (4 trials x 3 epochs by
default) on an embedded local Ray. Each trial's time from its launch to its first reported epoch
splits into start-up (trial process, imports, the Ray Train controller and worker group, the
loaders) and the first epoch itself (`epoch_seconds`: training + evaluation, measured in the loop).

    PYTHONPATH=. python jobs/bench/tune_startup.py --data runs/data/fashion-mnist
Target: start-up <= 50% of the trials' time (start-up + epochs).
"""
from __future__ import annotations

import argparse
import tempfile
import time

import pandas as pd
from ray import tune

from common import report_result
from raymoll.config import load_config
from raymoll.runtime import init_ray
from raymoll.tune import run_search

TARGET_SHARE = 0.5


class LaunchTimes(tune.Callback):
    """Unix time at which Tune launched each trial (the driver's clock, like `timestamp`)."""

    def __init__(self):
        self.launched: dict[str, float] = {}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.launched[trial.trial_id] = time.time()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="runs/data/fashion-mnist", help="prepared Fashion-MNIST")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray")
    args = parser.parse_args()

    out = tempfile.mkdtemp(prefix="tune-bench-")
    cfg = load_config("jobs/configs/fashion_tune.yaml", [
        f"data.path={args.data}", "data.train_subset=1024",
        "data.batch_size=32", "data.num_workers=1", "eval.val_subset=128", "model.width=8",
        f"optim.epochs={args.epochs}", f"tune.num_samples={args.trials}",
        "tune.max_concurrent=2", "run.cpus_per_worker=0.5", f"run.storage_path={out}",
        "run.name=bench"])
    started = time.perf_counter()
    init_ray(num_cpus=args.cpus)
    ray_init = time.perf_counter() - started
    launches = LaunchTimes()
    result = run_search(cfg, callbacks=[launches])
    wall = time.perf_counter() - started

    table = pd.read_parquet(result.trials).sort_values(["trial_id", "epoch"])
    first = table.groupby("trial_id").head(1).set_index("trial_id")
    startup = first["timestamp"] - pd.Series(launches.launched) - first["epoch_seconds"]
    training = table.groupby("trial_id")["epoch_seconds"].sum()
    per_trial = pd.DataFrame({"startup_s": startup, "epochs": table.groupby("trial_id").size(),
                              "training_s": training})
    share = startup.sum() / (startup.sum() + training.sum())
    print(per_trial.to_string(float_format="%.1f"))
    print(f"\nsearch of {len(per_trial)} trials: {wall:.1f} s wall, of it ray.init "
          f"{ray_init:.1f} s; per trial start-up {startup.mean():.1f} s vs training "
          f"{training.mean():.1f} s (epoch {table['epoch_seconds'].mean():.1f} s)")
    passed = share <= TARGET_SHARE
    print(f"start-up share of trial time: {share:.0%}  (target <= {TARGET_SHARE:.0%})")
    report_result("tune_startup", f"trial start-up / (start-up + training), {len(per_trial)} "
                  f"trials x {args.epochs} epochs", share, "share", f"<= {TARGET_SHARE:.0%}",
                  passed, "cuda" if cfg.run.use_gpu else "cpu",
                  f"{wall:.0f} s wall, ray.init {ray_init:.1f} s, per trial start-up "
                  f"{startup.mean():.1f} s vs training {training.mean():.1f} s")


if __name__ == "__main__":
    main()
