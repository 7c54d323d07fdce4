"""Running a study: the cells as one Ray Tune grid experiment (each trial fits a TorchTrainer,
no early stopping), then every trained cell's selected checkpoint evaluated, fanned out over
the cluster, and the results merged. In `<run.storage_path>/<run.name>/`:

    study.parquet        every cell's results rows (raymoll.results) + method, axis, seed columns
    cells.parquet        one row per cell: axis values, seed, status, checkpoint, training time
    evaluations/<cell>.parquet   each cell's results table (what --resume keeps)
    timing.json          where the driver's wall time went (see `driver_share`)
    report/              summary.md and the figures (raymoll.study.report)
    train-<trial>/       each cell's Ray Train run (checkpoints)

A resumed study trains only cells Tune has not finished and evaluates only cells without an
evaluation file.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa
import ray
from ray import tune

from raymoll.config import Config, to_dict
from raymoll.io import (atomic_write, filesystem, is_file, read_parquet, with_scheme,
                        write_parquet)
from raymoll.results import METADATA_KEY
from raymoll.study.cells import METHOD, Cell, cell_config, expand, label
from raymoll.tracking import tune_callbacks
from raymoll.train.trainer import SCORE
from raymoll.study.report import STUDY_KEY, study_report
from raymoll.tune.search import (experiment_path, experiment_tuner, max_concurrent, run_trial,
                                 trainable)


@dataclass
class StudyResult:
    """Where a study left its outputs."""
    path: str               # the experiment folder
    finished: bool          # every cell trained and evaluated
    study: str | None       # study.parquet (None while no cell is evaluated)
    cells: str              # cells.parquet
    report: str | None      # report/summary.md


def run_cell(config: dict, base: dict) -> None:
    """The trial of one cell: run_trial at the cell's config keys (Tune's grid hands each trial
    one cell as config['cell'])."""
    run_trial(config["cell"]["point"], base)


def _trial_dirname(trial) -> str:
    return f"trial-{trial.config['cell']['name']}"


def _new_tuner(cfg: Config, path: str, cells: list[Cell], callbacks: list) -> tune.Tuner:
    from ray.tune.search import BasicVariantGenerator
    return tune.Tuner(
        trainable(cfg, path, run_cell),
        param_space={"cell": tune.grid_search([dataclasses.asdict(c) for c in cells])},
        tune_config=tune.TuneConfig(
            num_samples=1, trial_dirname_creator=_trial_dirname,
            search_alg=BasicVariantGenerator(max_concurrent=max_concurrent(cfg))),
        run_config=tune.RunConfig(name=cfg.run.name, storage_path=os.path.dirname(path),
                                  callbacks=callbacks))


def _trained(cfg: Config, grid, path: str) -> dict[str, dict[str, Any]]:
    """Cell name -> status, selected checkpoint (best by SCORE among those kept) and training
    time, for every trial of the experiment at `path`."""
    out = {}
    for result in grid:
        cell = Cell(**result.config["cell"])
        name = cell.name
        rows = result.metrics_dataframe
        entry = {"status": "error" if result.error else "unfinished", "checkpoint": None,
                 "epochs": 0, "training_s": float("nan"), "started": float("nan")}
        if rows is not None and not rows.empty:
            last = rows.iloc[-1]
            entry.update(epochs=int(last["epoch"]), training_s=float(last["time_total_s"]),
                         started=float(last["timestamp"] - last["time_total_s"]))
            kept = rows[rows["checkpoint_path"].notna()] if "checkpoint_path" in rows else rows[:0]
            if not kept.empty:
                best = kept.loc[kept[SCORE].idxmax(), "checkpoint_path"]
                entry["checkpoint"] = with_scheme(best, path)  # Ray's paths lack it
            if not result.error and entry["epochs"] >= cell_config(cfg, cell).optim.epochs:
                entry["status"] = "trained"
        out[name] = entry
    return out


def _evaluate_one(checkpoint: str, data: str, subset: int, name: str,
                  device: str) -> tuple[bytes, float, float]:
    """Ray task: the results table (raw and temperature-scaled) of one cell's checkpoint as
    Parquet bytes, and when it ran (Unix seconds). The cells are the fan-out: each task scores
    its 96 sets with the local runner on its own device share."""
    from raymoll.evaluation import evaluate
    started = time.time()
    with ray.train.Checkpoint(checkpoint).as_directory() as folder, \
            tempfile.TemporaryDirectory() as tmp:
        out = evaluate(folder, data, out=os.path.join(tmp, f"{name}.parquet"), run=name,
                       subset=subset, device=device, runner="local")
        return out.read_bytes(), started, time.time()


def evaluate_cells(cfg: Config, todo: dict[str, str], folder: str) -> list[tuple[float, float]]:
    """Evaluate each cell's checkpoint (`todo`: name -> checkpoint) as a Ray task, as many at
    once as the cluster holds, writing `folder`/<name>.parquet as each finishes; returns the
    (start, end) times of the tasks."""
    from raymoll.evaluation.runners import GPU_SHARE
    fs, where = filesystem(folder)
    fs.create_dir(where, recursive=True)
    task = ray.remote(num_cpus=1, num_gpus=GPU_SHARE if cfg.run.use_gpu else 0)(_evaluate_one)
    device = "cuda" if cfg.run.use_gpu else "cpu"
    pending = {task.remote(checkpoint, cfg.data.path, cfg.study.eval_subset, name, device): name
               for name, checkpoint in todo.items()}
    spans = []
    while pending:
        (done,), _ = ray.wait(list(pending), num_returns=1)
        data, started, ended = ray.get(done)
        atomic_write(os.path.join(folder, f"{pending.pop(done)}.parquet"), data)
        spans.append((started, ended))
    return spans


def _axis_columns(cfg: Config, cell: Cell) -> dict[str, Any]:
    return {key: label(value) for key, value in cell.values.items()} | {"seed": cell.seed}


def merge(cfg: Config, cells: list[Cell], folder: str) -> pa.Table | None:
    """The evaluated cells' results tables, concatenated, with the axis columns (method, one
    per axis key, seed) appended; schema metadata: the cells' settings and the study."""
    tables, settings = [], {}
    for cell in cells:
        path = os.path.join(folder, f"{cell.name}.parquet")
        if not is_file(path):
            continue
        table = read_parquet(path)
        settings |= json.loads(table.schema.metadata[METADATA_KEY])
        table = table.replace_schema_metadata(None)
        for key, value in _axis_columns(cfg, cell).items():
            table = table.append_column(key, pa.array([value] * len(table)))
        tables.append(table)
    if not tables:
        return None
    study = {"study": to_dict(cfg.study), "axes": [METHOD] + [k for k in cfg.study.axes
                                                               if k != METHOD]}
    return pa.concat_tables(tables).replace_schema_metadata(
        {METADATA_KEY: json.dumps(settings), STUDY_KEY: json.dumps(study)})


def cells_table(cfg: Config, cells: list[Cell], trained: dict[str, dict],
                evaluated: set[str]) -> pd.DataFrame:
    """One row per cell: name, axis values, seed, status (evaluated / trained / error /
    unfinished), checkpoint, epochs, training time (s)."""
    rows = []
    for cell in cells:
        entry = trained.get(cell.name, {"status": "unfinished", "checkpoint": None, "epochs": 0,
                                        "training_s": float("nan")})
        status = "evaluated" if cell.name in evaluated else entry["status"]
        rows.append({"cell": cell.name, **_axis_columns(cfg, cell), "status": status,
                     "checkpoint": entry["checkpoint"], "epochs": entry["epochs"],
                     "training_s": entry["training_s"]})
    return pd.DataFrame(rows)


def busy_seconds(spans: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals (s)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def driver_timing(started: float, trained_at: float, evaluated_at: float, ended: float,
                  trained: dict[str, dict], eval_spans: list[tuple[float, float]]) -> dict:
    """Where this driver run's wall time went (s, Unix times in): the Tune phase, the
    evaluation phase and merging + report, and within the first two the time some cell was
    training or being evaluated. The rest (`driver_s`) is the study's own cost: trial
    scheduling and start-up gaps, the evaluation fan-out and the merge."""
    train_spans = [(e["started"], e["started"] + e["training_s"]) for e in trained.values()
                   if e["training_s"] == e["training_s"] and e["started"] >= started]
    timing = {"wall_s": ended - started, "tune_s": trained_at - started,
              "train_busy_s": busy_seconds(train_spans), "evaluate_s": evaluated_at - trained_at,
              "evaluate_busy_s": busy_seconds(eval_spans), "merge_report_s": ended - evaluated_at,
              "cells_trained_now": len(train_spans), "cells_evaluated_now": len(eval_spans)}
    timing["driver_s"] = (timing["tune_s"] - timing["train_busy_s"] + timing["evaluate_s"]
                          - timing["evaluate_busy_s"] + timing["merge_report_s"])
    timing["driver_share"] = timing["driver_s"] / timing["wall_s"]
    return timing


def run_study(cfg: Config, resume: bool = False, callbacks: list | None = None) -> StudyResult:
    """Run (or with `resume`, continue) the study of `cfg`; Ray must be initialised."""
    started = time.time()
    cells = expand(cfg)
    path = experiment_path(cfg)
    tuner = experiment_tuner(cfg, path, resume, "study",
                             lambda: _new_tuner(cfg, path, cells, (callbacks or [])
                                                + tune_callbacks(to_dict(cfg))), run_cell)
    grid = tuner.fit()
    trained_at = time.time()
    trained = _trained(cfg, grid, path)

    folder = os.path.join(path, "evaluations")
    todo = {c.name: trained[c.name]["checkpoint"] for c in cells
            if trained.get(c.name, {}).get("status") == "trained"
            and not is_file(os.path.join(folder, f"{c.name}.parquet"))}
    eval_spans = evaluate_cells(cfg, todo, folder)
    evaluated_at = time.time()

    evaluated = {c.name for c in cells if is_file(os.path.join(folder, f"{c.name}.parquet"))}
    table = cells_table(cfg, cells, trained, evaluated)
    cells_path = write_parquet(os.path.join(path, "cells.parquet"), table)
    merged = merge(cfg, cells, folder)
    study_path = report_path = None
    if merged is not None:
        study_path = write_parquet(os.path.join(path, "study.parquet"), merged)
        if "://" not in path:
            report_path = str(study_report(study_path, os.path.join(path, "report")))

    timing = driver_timing(started, trained_at, evaluated_at, time.time(), trained, eval_spans)
    atomic_write(os.path.join(path, "timing.json"), json.dumps(timing, indent=1))
    finished = len(evaluated) == len(cells)
    print(table.to_string(index=False, float_format="%.4g"))
    print(f"study: {study_path}\ncells: {cells_path}\nreport: {report_path}\n"
          f"driver-side cost: {timing['driver_s']:.0f} s of {timing['wall_s']:.0f} s wall "
          f"({timing['driver_share']:.1%}; timing.json)")
    if not finished:
        print(f"{len(cells) - len(evaluated)} of {len(cells)} cells are not evaluated; continue "
              f"with: raymoll study --config <this config> --resume   ({path})")
    return StudyResult(path, finished, study_path, cells_path, report_path)
