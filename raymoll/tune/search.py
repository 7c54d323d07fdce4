"""The Ray Tune search: each trial fits its own TorchTrainer at one point of the space, ASHA
stops weak trials at epoch milestones, and a finished search leaves, in the experiment folder
`<run.storage_path>/<run.name>`:

    trials.parquet   one row per trial and epoch: trial_id, trial_status, config/<key>, metrics
    best.yaml        the best trial's complete config, ready for `raymoll train --config`
    train-<trial>/   each trial's Ray Train run (checkpoints)

The objective (val_score, tune.objective) is measured on the validation split only (val.beton,
carved from the training data by `raymoll prepare`: clean_* on its clean images, val_* under the
4 validation corruptions); no trial, ASHA decision or "best" ever reads the test split.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import reduce
from typing import Any, Callable

import pandas as pd
import ray
import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from raymoll.config import Config, from_dict, to_dict
from raymoll.io import absolute, atomic_write, join, with_scheme, write_parquet
from raymoll.preflight import check_search_state
from raymoll.tracking import log_evaluation, tune_callbacks
from raymoll.train.trainer import build_trainer, worker_resources
from raymoll.tune.space import (DERIVED, apply_point, check_space, expected_trials, metric_mode,
                                searched_keys)

DOMAINS = {"uniform": lambda s: tune.uniform(s["low"], s["high"]),
           "loguniform": lambda s: tune.loguniform(s["low"], s["high"]),
           "quniform": lambda s: tune.quniform(s["low"], s["high"], s["q"]),
           "randint": lambda s: tune.randint(s["low"], s["high"]),
           "choice": lambda s: tune.choice(s["values"]),
           "grid": lambda s: tune.grid_search(s["values"])}
DONE = {"TERMINATED", "ERROR"}  # Tune trial statuses that --resume leaves alone


@dataclass
class SearchResult:
    """Where a search left its outputs."""
    path: str                     # the experiment folder
    finished: bool                # False when interrupted: `raymoll tune --resume` continues it
    trials: str                   # trials.parquet
    best_config: str | None       # best.yaml (None until the search has finished)
    best_checkpoint: str | None   # the best trial's last checkpoint
    evaluation: str | None        # Parquet of the final evaluation (tune.final_evaluate)


def experiment_path(cfg: Config) -> str:
    """<run.storage_path>/<run.name>, absolute (or a URI)."""
    return join(absolute(cfg.run.storage_path), cfg.run.name)


def run_trial(point: dict[str, Any], base: dict) -> None:
    """One trial: fit a TorchTrainer at `point`; TuneReportCallback hands Tune rank 0's
    per-epoch metrics (plus checkpoint_path)."""
    cfg = apply_point(from_dict(base), point)
    trial_id = tune.get_context().get_trial_id()
    build_trainer(cfg, name=f"train-{trial_id}", callbacks=[TuneReportCallback()]).fit()


def trial_dirname(trial) -> str:
    return f"trial-{trial.trial_id}"


def trainable(cfg: Config, path: str, trial=run_trial):
    """`trial` (run_trial, or a study's run_cell) bound to the base config; its Train runs go
    under the experiment folder, and data.path is made absolute because Tune and Train start
    each process in its own folder."""
    base = to_dict(cfg)
    base["run"]["storage_path"] = path
    base["data"]["path"] = absolute(cfg.data.path)
    base["run"]["tracker"] = "none"  # Tune's logger callback logs each trial (tracking.py)
    return tune.with_resources(tune.with_parameters(trial, base=base),
                               {"CPU": cfg.tune.trial_cpus})


def max_concurrent(cfg: Config) -> int:
    """tune.max_concurrent, or (when 0) as many trials as the cluster's resources hold now:
    each needs its driver's CPUs plus its workers' CPUs and GPUs."""
    if cfg.tune.max_concurrent:
        return cfg.tune.max_concurrent
    need = {key: cfg.run.num_workers * amount for key, amount in worker_resources(cfg).items()}
    need["CPU"] = need.get("CPU", 0) + cfg.tune.trial_cpus
    have = ray.cluster_resources()
    return max(1, min(int(have.get(key, 0) // amount) for key, amount in need.items() if amount))


def _new_tuner(cfg: Config, path: str, callbacks: list) -> tune.Tuner:
    t = cfg.tune
    concurrent = max_concurrent(cfg)
    if t.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch
        searcher = ConcurrencyLimiter(OptunaSearch(seed=cfg.run.seed), concurrent)  # TPE
    else:  # Tune's max_concurrent_trials ignores a BasicVariantGenerator passed in
        from ray.tune.search import BasicVariantGenerator
        searcher = BasicVariantGenerator(max_concurrent=concurrent, random_state=cfg.run.seed)
    scheduler = ASHAScheduler(time_attr="epoch", max_t=cfg.optim.epochs,
                              grace_period=t.grace_period, reduction_factor=t.reduction_factor)
    return tune.Tuner(
        trainable(cfg, path),
        param_space={key: DOMAINS[spec["type"]](spec) for key, spec in t.space.items()},
        tune_config=tune.TuneConfig(metric=t.metric, mode=metric_mode(t.metric),
                                    search_alg=searcher, scheduler=scheduler,
                                    num_samples=t.num_samples,
                                    trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name=cfg.run.name, storage_path=os.path.dirname(path),
                                  callbacks=callbacks))


def experiment_tuner(cfg: Config, path: str, resume: bool, what: str,
                     new: Callable[[], tune.Tuner], trial: Callable = run_trial) -> tune.Tuner:
    """The Tuner of the experiment at `path`: `new()`, or with `resume` the saved one, whose
    finished trials stay finished and unfinished ones go on from their checkpoints. Raises
    ConfigError when `resume` does not match whether the experiment (a `what`) exists."""
    check_search_state(path, resume, what)
    if not resume:
        return new()
    return tune.Tuner.restore(path, trainable(cfg, path, trial), resume_unfinished=True,
                              restart_errored=True)


def run_search(cfg: Config, resume: bool = False, callbacks: list | None = None) -> SearchResult:
    """Run (or with `resume`, continue) the search of `cfg`; Ray must be initialised.

    `callbacks` are extra `ray.tune.Callback`s; a resumed search keeps those it started with.
    """
    check_space(cfg)
    path = experiment_path(cfg)
    tuner = experiment_tuner(cfg, path, resume, "search",
                             lambda: _new_tuner(cfg, path, (callbacks or [])
                                                  + tune_callbacks(to_dict(cfg))))
    grid = tuner.fit()
    # The state a --resume would continue; the ResultGrid cannot tell an interrupted search,
    # whose stopped trials it reports TERMINATED.
    saved = {trial.trial_id: trial.status for trial in tune.ExperimentAnalysis(path).trials}
    finished = len(saved) == expected_trials(cfg.tune) and set(saved.values()) <= DONE

    table = trials_table(cfg, grid, saved)
    trials = write_parquet(join(path, "trials.parquet"), table)
    print(ranking(cfg, table))
    if not finished:
        print(f"the search was interrupted; continue it with: raymoll tune --config <this "
              f"config> --resume   ({path})")
        return SearchResult(path, False, trials, None, None, None)

    best = grid.get_best_result(metric=cfg.tune.metric, mode=metric_mode(cfg.tune.metric))
    best_cfg = apply_point(cfg, best.config)
    best_yaml = atomic_write(join(path, "best.yaml"), best_yaml_text(cfg, best_cfg, best))
    checkpoint = best.metrics.get("checkpoint_path")
    checkpoint = with_scheme(checkpoint, path) if checkpoint else None  # Ray's paths lack it
    print(f"best trial {best.metrics['trial_id']}: {cfg.tune.metric} = "
          f"{best.metrics[cfg.tune.metric]:.4f}\nbest config: {best_yaml}\n"
          f"best checkpoint: {checkpoint}\ntrials: {trials}")
    evaluation = None
    if cfg.tune.final_evaluate and checkpoint:
        evaluation = final_evaluate(checkpoint, best_cfg, path)
        print(f"evaluation of the best checkpoint: {evaluation}")
        if cfg.run.tracker != "none":
            log_evaluation(to_dict(cfg), evaluation, f"{cfg.run.name}-best-evaluation", path)
    return SearchResult(path, True, trials, best_yaml, checkpoint, evaluation)


def trials_table(cfg: Config, grid, saved: dict[str, str]) -> pd.DataFrame:
    """One row per trial and reported epoch: trial_id, trial_status (completed; stopped by
    ASHA before optim.epochs; error; unfinished in an interrupted search), the searched values
    as config/<key>, and the metrics. `saved`: trial id -> Tune status."""
    keys = list(cfg.tune.space) + [k for k in searched_keys(cfg.tune.space)
                                   if k not in cfg.tune.space]
    frames = []
    for result in grid:
        rows = result.metrics_dataframe
        trial_id = os.path.basename(result.path).removeprefix("trial-")  # see trial_dirname
        if rows is None or rows.empty:  # started, nothing reported yet
            rows = pd.DataFrame([{"trial_id": trial_id}])
        rows = rows.drop(columns=[c for c in rows if c.startswith("config/")])
        resolved = apply_point(cfg, result.config)  # typed values (YAML may give '1e-5')
        values = {key: result.config[key] if key in DERIVED else
                  reduce(getattr, key.split("."), resolved) for key in keys}
        last_epoch = rows["epoch"].max() if "epoch" in rows else 0
        status = ("error" if saved.get(trial_id) == "ERROR" else
                  "unfinished" if saved.get(trial_id) not in DONE else
                  "completed" if last_epoch >= cfg.optim.epochs else "stopped")
        frames.append(rows.assign(trial_status=status,
                                  **{f"config/{k}": values[k] for k in keys}))
    table = pd.concat(frames, ignore_index=True)
    front = ["trial_id", "trial_status", "epoch"]
    return table[[c for c in front if c in table] + [c for c in table if c not in front]]


def ranking(cfg: Config, table: pd.DataFrame, top: int = 10) -> str:
    """The best `top` trials by their last reported metric, as a text table."""
    metric = cfg.tune.metric
    last = table.sort_values("epoch").groupby("trial_id").tail(1)
    last = last.sort_values(metric, ascending=metric_mode(metric) == "min").head(top)
    columns = ["trial_id", "trial_status", "epoch", metric, "val_accuracy", "clean_accuracy"]
    columns += [f"config/{k}" for k in cfg.tune.space]
    return last[[c for c in columns if c in last]].to_string(index=False, float_format="%.4g")


def best_yaml_text(cfg: Config, best_cfg: Config, best) -> str:
    data = to_dict(best_cfg)
    data["run"]["name"] = f"{cfg.run.name}-best"
    header = (f"# Best of {cfg.tune.num_samples} trials of the search '{cfg.run.name}': trial "
              f"{best.metrics['trial_id']}, {cfg.tune.metric} = {best.metrics[cfg.tune.metric]:.4f}"
              f" at epoch {best.metrics.get('epoch')}.\n# Train it: raymoll train --config "
              f"best.yaml\n")
    return header + yaml.safe_dump(data, sort_keys=False)


def final_evaluate(checkpoint: str, cfg: Config, path: str) -> str:
    """`raymoll evaluate` of the best checkpoint on the 15 test corruptions."""
    from raymoll.evaluate import evaluate  # the evaluation stack loads only when asked for
    out = join(path, "best_evaluation.parquet")
    return str(evaluate(checkpoint, cfg.data.path, out=out, run=f"{cfg.run.name}-best"))


