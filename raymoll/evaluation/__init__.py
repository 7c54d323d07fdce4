"""`raymoll evaluate`: one checkpoint on the clean test set and on every corruption x severity,
raw and after post-hoc temperature scaling.

- `raymoll.evaluation.sets`: the 96 sets and where their images come from;
- `raymoll.evaluation.scoring`: one set scored raw and temperature-scaled, the temperature fit;
- `raymoll.evaluation.runners`: this process (`local`) or a Ray actor pool (`ray`).

Every set is scored through `raymoll.inference.batch_logits`, the path training's validation
uses. The temperature is fitted on the clean validation split (never on test).
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from raymoll.checkpoint import CheckpointError, load_model
from raymoll.data import load_split, normalizer, read_meta
from raymoll.evaluation.external import (check_output, check_spec, input_normalizer,
                                        load_external)
from raymoll.evaluation.runners import LocalRunner, RayRunner, choose_runner
from raymoll.evaluation.sets import EvalSet, eval_sets, official_source, set_seed
from raymoll.metrics import MetricAccumulator
from raymoll.io import check_writable, exists, is_file, is_uri, join
from raymoll.preflight import EVALUATION_RUNNERS as RUNNERS
from raymoll.preflight import SEVERITIES, EvaluateError, check_evaluate
from raymoll.results import write_results

__all__ = ["EvaluateError", "EvalSet", "RUNNERS", "SEVERITIES", "eval_sets", "evaluate",
           "set_seed"]


def _local_device(device: torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvaluateError(f"device {str(device)!r} was asked for but CUDA is not available "
                            f"here; use --device cpu.")
    return device


def resolve_paths(checkpoint: str | Path, data_dir: str | Path, out: str | Path | None,
                  run: str) -> tuple[Path | str, Path | str]:
    """The one place where the checkpoint and output paths are resolved: (checkpoint, out),
    local paths as absolute Paths, URIs (s3://...) as given; out defaults to
    <data_dir>/../results/<run>.parquet."""
    if out is None:
        out = Path(data_dir).resolve().parent / "results" / f"{run}.parquet"
    out = str(out) if is_uri(out) else Path(out)
    if exists(out) and not is_file(out):
        raise EvaluateError(f"--out {str(out)!r} is a folder; give a file name such as "
                            f"{join(out, 'results.parquet')!r}.")
    return (str(checkpoint) if is_uri(checkpoint) else Path(checkpoint).resolve()), out


def _row(spec: EvalSet, raw: MetricAccumulator, scaled: MetricAccumulator | None,
         temperature: float | None, common: dict[str, Any]) -> dict[str, Any]:
    metrics, bins = raw.compute(), raw.bins()
    row = {**common, "corruption": spec.corruption, "family": spec.family,
           "severity": spec.severity, "n": metrics["n"],
           **{key: metrics[key] for key in ("accuracy", "nll", "ece", "brier")},
           "bin_count": bins["count"].long().tolist(),
           "bin_confidence": bins["confidence"].tolist(),
           "bin_accuracy": bins["accuracy"].tolist(),
           "temperature": math.nan if temperature is None else temperature}
    ts = scaled.compute() if scaled is not None else dict.fromkeys(("nll", "ece", "brier"),
                                                                      math.nan)
    ts_bins = scaled.bins() if scaled is not None else None
    row.update({f"{key}_ts": ts[key] for key in ("nll", "ece", "brier")})
    row["bin_count_ts"] = ts_bins["count"].long().tolist() if ts_bins else [0] * len(bins["count"])
    for key in ("confidence", "accuracy"):
        row[f"bin_{key}_ts"] = ts_bins[key].tolist() if ts_bins else [math.nan] * len(bins[key])
    return row


def _progress(done: int, total: int, spec: EvalSet, metrics: dict[str, float],
              started: float) -> None:
    elapsed = time.perf_counter() - started
    eta = elapsed / done * (total - done)
    name = spec.corruption if spec.severity == 0 else f"{spec.corruption} s{spec.severity}"
    print(f"[raymoll] evaluate {done:3d}/{total}  {name:<22s} acc {metrics['accuracy']:7.2%}  "
          f"ece {metrics['ece']:.4f}  ({elapsed:.0f} s elapsed, ETA {eta:.0f} s)",
          file=sys.stderr, flush=True)


def evaluate(checkpoint: str | Path, data_dir: str | Path,
             corruptions_dir: str | Path | None = None, out: str | Path | None = None,
             severities: Sequence[int] = SEVERITIES, seed: int = 0, batch_size: int = 500,
             device: str | None = None, run: str | None = None, subset: int = 0,
             runner: str | None = None, weights: str | Path | None = "selected",
             model: str | None = None, input: str = "normalized") -> Path | str:
    """Score `checkpoint` on the test split of the prepared folder `data_dir`, clean and
    corrupted, raw and temperature-scaled (T fitted on the validation split), and write the
    results table (raymoll.results) to `out` (a local path or a URI); returns its path.

    out defaults to <data_dir>/../results/<run>.parquet; run defaults to the checkpoint's
    run.name. subset > 0 scores only the first `subset` test images of every set (quick looks,
    the demo). runner: "local", "ray" or None (ray when a cluster with GPUs is attached).
    weights: "raw", "ema" or "selected" (what the checkpoint's selection chose). Instead of a
    checkpoint, `model` names any classifier (raymoll.evaluation.external: torchvision:NAME,
    timm:NAME, python:FILE.py:FN) with `weights` a state-dict file (None: as built) and
    `input` what it expects (normalized, unit, imagenet); run and model name the SPEC.
    Everything is
    checked before the model runs: a bad argument, data folder, checkpoint (class count, image
    size, weights) or -C folder, or an unwritable `out`, raises and leaves `out` untouched.
    """
    severities = list(severities)
    check_evaluate(data_dir, severities, device, batch_size, subset, runner, checkpoint, model)
    meta = read_meta(data_dir)  # the .beton files too
    device = torch.device(device) if device else None
    if model is not None:
        check_spec(model, input)
        model_spec, net = model, None
        weights = None if weights == "selected" else weights  # a file, or the model as built
        run = run or model_spec
        _, out = resolve_paths(model_spec, data_dir, out, run)
        checkpoint = None
    else:
        net, state = load_model(checkpoint, "cpu", num_classes=meta["num_classes"],
                                weights=weights)
        if list(state["meta"]["image_size"]) != list(meta["image_size"]):
            raise CheckpointError(f"checkpoint {str(checkpoint)!r} was trained on "
                                  f"{state['meta']['image_size']} px images but "
                                  f"{str(data_dir)!r} holds {meta['image_size']} px images.")
        run = run or state["config"]["run"]["name"]
        checkpoint, out = resolve_paths(checkpoint, data_dir, out, run)
    check_writable(out)
    if net is None:  # built only after the cheap checks; the weights file is checked here
        net = load_external(model_spec, weights, meta["num_classes"])
        state = {"config": {"model": {"name": model_spec, "channels_last": False},
                            "optim": {"bf16": True}, "mollify": {"enabled": False}},
                 "weights": str(weights) if weights else "initial"}
        normalize = input_normalizer(input, meta)
    else:
        normalize = normalizer(meta)
    cfg = state["config"]
    official, official_names = official_source(corruptions_dir, meta, subset)

    chosen, gpus = choose_runner(runner, device)
    if device is not None and device.type == "cpu":
        gpus = 0.0  # the Ray runner then uses CPU shares
    if chosen == "local":
        device = _local_device(device)
    images, labels = load_split(data_dir, "test", subset=subset)
    if checkpoint is None:
        check_output(net, normalize, images, meta["num_classes"], model_spec)
    model = net
    if (gpus or (chosen == "local" and device.type == "cuda")) and cfg["model"]["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    scorer_kwargs = {"model": model, "normalize": normalize, "images": images,
                     "labels": labels, "batch_size": batch_size, "bf16": cfg["optim"]["bf16"],
                     "seed": seed}
    sets = eval_sets(severities)
    pool = (LocalRunner(scorer_kwargs, device) if chosen == "local"
            else RayRunner(scorer_kwargs, gpus, len(sets)))
    print(f"[raymoll] evaluate: runner {pool.description}", file=sys.stderr, flush=True)
    try:
        temperature = None
        if "val" in meta["counts"]:
            temperature = pool.fit_temperature(*load_split(data_dir, "val"))
            print(f"[raymoll] evaluate: temperature {temperature:.4f} (fitted on the "
                  f"validation split)", file=sys.stderr, flush=True)
        else:
            print("[raymoll] evaluate: the data folder has no validation split, so no "
                  "temperature scaling (the _ts columns are NaN); re-prepare it to add one",
                  file=sys.stderr, flush=True)
        started, scored = time.perf_counter(), {}
        for done, (spec, raw, scaled) in enumerate(pool.score(sets, official, temperature), 1):
            scored[spec] = raw, scaled
            _progress(done, len(sets), spec, raw.compute(), started)
    finally:
        with contextlib.suppress(Exception):  # never hide the real error behind clean-up
            pool.close()

    common = {"run": run, "checkpoint": str(checkpoint) if checkpoint else model_spec,
              "dataset": meta["dataset"], "model": cfg["model"]["name"], "mollified": cfg["mollify"]["enabled"]}
    settings = {"checkpoint": common["checkpoint"], "data": str(Path(data_dir).resolve()),
                "seed": seed, "severities": severities, "subset": subset,
                "corruptions": str(Path(corruptions_dir).resolve()) if corruptions_dir
                else "generated", "official_corruptions": official_names,
                "epoch": state.get("epoch"), "mollify": cfg["mollify"], "config": cfg,
                "temperature": temperature, "weights": state.get("weights", "raw"),
                "runner": chosen, "input": input if checkpoint is None else "normalized"}
    rows = [_row(spec, *scored[spec], temperature, common) for spec in sets]
    return write_results(rows, settings, out)
