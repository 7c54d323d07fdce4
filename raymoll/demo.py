"""`raymoll demo`: the whole story offline, on an embedded local Ray.

1. prepare Fashion-MNIST (offline, from the Debian package) as FFCV .beton files (train, a
   10% validation split carved from it, test);
2. train the small CNN three times with identical settings except the method: "plain",
   "label_smoothing" (plain label smoothing, eps = 0.1) and "mollified" (the paper's
   defaults), all at once as Ray tasks, each driving its own TorchTrainer;
3. evaluate each on clean + 15 x 5 corrupted (+ 4 x 5 validation) test sets into Parquet, raw
   and with post-hoc temperature scaling (T fitted on the validation split);
4. draw the report (PNGs + summary.md) and print the headline table (raw and TS columns).

Everything lands under `out` (default runs/demo/): data/, train/, results/*.parquet, report/.
"""
from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

from raymoll.config import Config, DataConfig, EvalConfig, ModelConfig, OptimConfig, RunConfig
from raymoll.config import MollifyConfig, validate

# The demo's size: under 10 minutes on 2 CPU cores end to end (see README, "The demo").
EPOCHS = 6
TRAIN_SUBSET = 20_000
LABEL_SMOOTHING = 0.1  # the "label_smoothing" baseline's eps
WIDTH = 32
EVAL_SUBSET = 1_000


def _say(step: str, started: float) -> None:
    print(f"[raymoll demo {time.perf_counter() - started:5.0f} s] {step}", flush=True)


def demo_configs(data: Path, out: Path, epochs: int, train_subset: int, width: int,
                 use_gpu: bool) -> list[Config]:
    """The three runs, identical but for the method: plain, plain label smoothing
    (eps = LABEL_SMOOTHING, no mollification) and mollification at the paper's defaults."""
    base = Config(
        data=DataConfig(path=str(data), batch_size=128, train_subset=train_subset),
        model=ModelConfig(name="smallcnn", width=width),
        optim=OptimConfig(epochs=epochs, lr=0.05),
        eval=EvalConfig(val_subset=500),
        run=RunConfig(storage_path=str(out / "train"), use_gpu=use_gpu))
    methods = (("plain", 0.0, False), ("label_smoothing", LABEL_SMOOTHING, False),
               ("mollified", 0.0, True))
    return [validate(replace(base, mollify=MollifyConfig(enabled=enabled),
                             optim=replace(base.optim, label_smoothing=eps),
                             run=replace(base.run, name=name)))
            for name, eps, enabled in methods]


def run_demo(out: str | Path = "runs/demo", epochs: int | None = None,
             dataset: str = "fashion-mnist", use_gpu: bool = False,
             train_subset: int | None = None, width: int | None = None) -> Path:
    """Run the demo; returns the report's summary.md."""
    import ray

    from raymoll.data import DataError, prepare, read_meta
    from raymoll.evaluate import evaluate
    from raymoll.report import format_table, headline, report
    from raymoll.results import read_results
    from raymoll.runtime import init_ray

    started, out = time.perf_counter(), Path(out).resolve()
    configs = demo_configs(out / "data" / dataset, out, EPOCHS if epochs is None else epochs,
                           TRAIN_SUBSET if train_subset is None else train_subset,
                           WIDTH if width is None else width, use_gpu)
    data = Path(configs[0].data.path)

    _say(f"1/4 preparing {dataset} in {data}", started)
    try:
        read_meta(data)
    except DataError:  # absent or unfinished: (re)write it
        prepare(dataset, data, progress=False)

    _say("2/4 training " + ", ".join(repr(cfg.run.name) for cfg in configs)
         + " side by side on an embedded Ray", started)
    # One logical CPU per run's worker, so the three runs train at once and share the cores
    # (a run left waiting for a CPU would hit Ray Train's worker start-up timeout).
    init_ray(num_cpus=max(os.cpu_count() or 1, len(configs)))
    from raymoll.train import fit
    fit_remote = ray.remote(num_cpus=0)(fit)  # a driver per run; its workers hold the CPUs
    results = ray.get([fit_remote.remote(cfg) for cfg in configs])

    _say("3/4 evaluating each on clean + 19 corruptions x 5 severities", started)
    evaluate_remote = ray.remote(num_cpus=1, num_gpus=0.5 if use_gpu else 0)(evaluate)
    tables = ray.get([evaluate_remote.remote(result.last_checkpoint, data, subset=EVAL_SUBSET,
                                             out=out / "results" / f"{cfg.run.name}.parquet",
                                             device="cuda" if use_gpu else "cpu", runner="local")
                      for cfg, result in zip(configs, results)])

    _say("4/4 writing the report", started)
    summary = report([str(t) for t in tables], out / "report")
    print()
    print(format_table(headline(read_results(tables))))
    print()
    _say(f"done: results in {out / 'results'}, plots and summary.md in {out / 'report'}",
         started)
    return summary
