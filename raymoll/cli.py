"""The `raymoll` command: one verb per step of a robustness experiment.

Each verb checks its inputs first (config, paths) and only then imports Ray, FFCV or torch-heavy
modules, so a typo fails in a second rather than after a cluster start-up.
"""
from __future__ import annotations

import argparse
import os
import sys

from raymoll.config import Config, help_text, load_config
from raymoll.errors import RaymollError
from raymoll.io import check_writable_folder
from raymoll.preflight import (EVALUATION_RUNNERS, check_evaluate, check_study, check_train,
                               check_tune)


class TrainingFailed(RaymollError):
    """A run that started but failed (a worker error, NaN loss, ...): exit 1, no traceback."""


def _prepare(args: argparse.Namespace) -> None:
    from raymoll.data.sources import check_dataset  # light: no FFCV
    check_dataset(args.dataset)
    check_writable_folder(args.out)  # before FFCV and numba load (seconds)
    from raymoll.data import prepare
    out = prepare(args.dataset, args.out, root=args.root, image_format=args.format,
                  max_side=args.max_side, jpeg_quality=args.jpeg_quality,
                  val_fraction=args.val_fraction, val_seed=args.val_seed)
    print(f"wrote {out}")


def _check_data_files(cfg: Config) -> None:
    """The .beton files against meta.json (FFCV's reader, hashes): after the fast checks of
    raymoll.preflight, still before Ray starts."""
    from raymoll.data import read_meta
    read_meta(cfg.data.path)


def _train(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)  # fails here, before Ray, on a bad value
    check_train(cfg)
    _check_data_files(cfg)
    from raymoll.run_folder import claim_run_folder
    claim_run_folder(cfg, restart=args.restart)  # same name, other settings: refused here
    import ray.train
    from raymoll.runtime import check_resources, init_ray
    from raymoll.train import fit, summary
    from raymoll.train.trainer import worker_resources
    init_ray()
    check_resources(worker_resources(cfg), cfg.run.num_workers)
    try:
        result = fit(cfg)
    except ray.train.TrainingFailedError as err:
        raise TrainingFailed(f"training failed: {err}") from None
    print(summary(result))


def _evaluate(args: argparse.Namespace) -> None:
    check_evaluate(args.data, args.severities, args.device, args.batch_size, args.subset,
                   args.runner, args.checkpoint, args.model)  # before torch loads (seconds)
    from raymoll.evaluate import evaluate
    out = evaluate(args.checkpoint, args.data, corruptions_dir=args.corruptions, out=args.out,
                   severities=args.severities, seed=args.seed, batch_size=args.batch_size,
                   device=args.device, run=args.run, subset=args.subset, runner=args.runner,
                   weights=args.weights, model=args.model, input=args.input)
    print(f"wrote {out}")


def _tune(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    check_tune(cfg, resume=args.resume)
    _check_data_files(cfg)
    from raymoll.tune import run_search
    from raymoll.runtime import check_resources, init_ray
    from raymoll.train.trainer import worker_resources
    init_ray()
    check_resources(worker_resources(cfg), cfg.run.num_workers)  # one trial's workers
    run_search(cfg, resume=args.resume)


def _study(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    check_study(cfg, resume=args.resume)  # every cell, the data, the storage: before Ray
    _check_data_files(cfg)
    from raymoll.study import run_study
    from raymoll.runtime import init_ray
    init_ray()
    run_study(cfg, resume=args.resume)


def _report(args: argparse.Namespace) -> None:
    check_writable_folder(args.out)  # before matplotlib loads
    from raymoll.report import report
    out = report(args.results, args.out, reliability=args.reliability)
    print(f"wrote {out}")


def _export(args: argparse.Namespace) -> None:
    from raymoll.export import export_robustbench
    json_path, csv_path = export_robustbench(args.results, args.out, run=args.run, name=args.name)
    print(f"wrote {json_path} and {csv_path}")


def _demo(args: argparse.Namespace) -> None:
    from raymoll.demo import run_demo
    run_demo(out=args.out, epochs=args.epochs, dataset=args.dataset, use_gpu=args.gpu,
             train_subset=args.train_subset, width=args.width)


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (0 would otherwise silently mean "the default")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raymoll", description="Robust, calibrated classifiers by data mollification "
        "coupled with label smoothing, on Ray and FFCV. Runs on the cluster in RAY_ADDRESS, or "
        "on an embedded local Ray when it is unset.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("prepare", help="write a dataset as FFCV .beton files + meta.json")
    p.add_argument("--dataset", required=True,
                   help="cifar10, cifar100, tinyimagenet, imagefolder, fashion-mnist, synthetic")
    p.add_argument("--root", help="where the source dataset is (or is downloaded to)")
    p.add_argument("--out", required=True,
                   help="folder for train.beton, val.beton, test.beton, meta.json")
    p.add_argument("--format", default="auto", choices=("auto", "raw", "jpeg"),
                   help="raw pixels (exact) or JPEG; auto = raw up to 64 px")
    p.add_argument("--max-side", type=int, default=256, help="JPEG: longest side in pixels")
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality (1-100)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the training images held out as val.beton, class-stratified; "
                        "training selects on it, never on the test split (default 0.1)")
    p.add_argument("--val-seed", type=int, default=0,
                   help="seed of the validation split: the same seed, the same split (default 0)")
    p.set_defaults(func=_prepare)

    for name, func, text in (("train", _train, "train with Ray Train (DDP workers)"),
                             ("tune", _tune, "search mollification settings with Ray Tune"),
                             ("study", _study, "a grid of methods x axes x seeds as one Ray Tune "
                              "experiment, evaluated and reported with confidence intervals")):
        p = verbs.add_parser(name, help=text, epilog="config keys:\n  " + "\n  ".join(help_text()),
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", help="YAML config (see jobs/configs/); keys not given take "
                       "the defaults listed below")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="override config keys, e.g. optim.epochs=2 mollify.enabled=false")
        p.set_defaults(func=func)
        if name in ("tune", "study"):
            p.add_argument("--resume", action="store_true",
                           help=f"continue the interrupted {'search' if name == 'tune' else name}"
                           " of this config (finished trials or cells are kept)")
        else:
            p.add_argument("--restart", action="store_true",
                           help="start run.name afresh: move its existing folder aside to "
                           "<name>.replaced-<UTC time> (without it, an existing run continues "
                           "only with the same settings)")

    p = verbs.add_parser("evaluate", help="clean + 15x5 corrupted (+4 validation) sets -> Parquet")
    p.add_argument("--checkpoint", help="raymoll checkpoint folder or checkpoint.pt")
    p.add_argument("--model", metavar="SPEC",
                   help="instead of --checkpoint, any classifier: torchvision:NAME (e.g. "
                   "torchvision:resnet18), timm:NAME (pip install 'raymoll[timm]') or "
                   "python:FILE.py:FN (FN(num_classes) returns an nn.Module)")
    p.add_argument("--input", default="normalized", choices=("normalized", "unit", "imagenet"),
                   help="with --model: what it expects: the data's mean/std (normalized), "
                   "[0, 1] floats (unit, RobustBench's convention) or ImageNet's mean/std")
    p.add_argument("--data", required=True, help="prepared data folder (its test split is used)")
    p.add_argument("--corruptions", help="folder of official -C files; default: generate them")
    p.add_argument("--out", help="Parquet file (default: results/<run>.parquet beside the data)")
    p.add_argument("--severities", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--seed", type=int, default=0, help="seed of the generated corruptions")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--run", default=None, help="run name in the table (default: from checkpoint)")
    p.add_argument("--subset", type=int, default=0,
                   help="score only the first N test images of each set (0 = all)")
    p.add_argument("--runner", choices=EVALUATION_RUNNERS, default=None,
                   help="score the sets in this process (local) or on a Ray actor pool (ray); "
                   "default: ray when a Ray cluster with GPUs is attached, else local")
    p.add_argument("--weights", default="selected",
                   help="with --checkpoint: raw, ema (needs optim.ema_decay > 0) or selected "
                   "(what selection chose; default); with --model: a state-dict file "
                   "(loaded with weights_only=True; default: the model as built)")
    p.set_defaults(func=_evaluate)

    p = verbs.add_parser("report", help="plots + summary.md from results Parquet files")
    p.add_argument("results", nargs="+", help="Parquet files written by `raymoll evaluate`, or "
                   "one study.parquet of `raymoll study` (the study report)")
    p.add_argument("--out", required=True, help="folder for the PNGs and summary.md")
    p.add_argument("--reliability", choices=("raw", "ts"), default="raw",
                   help="draw the reliability diagrams of the raw or the temperature-scaled "
                   "predictions")
    p.set_defaults(func=_report)

    p = verbs.add_parser("export", help="results in another tool's format (robustbench)")
    p.add_argument("format", choices=("robustbench",),
                   help="robustbench: model_info/<dataset>/corruptions/<name>.json + "
                   "unaggregated_results.csv, over the 15 x 5 test sets")
    p.add_argument("results", help="Parquet file written by `raymoll evaluate` (or a study)")
    p.add_argument("--out", required=True, help="folder to write model_info/ under")
    p.add_argument("--run", default=None, help="the run to export when the file holds several")
    p.add_argument("--name", default=None, help="RobustBench model name (default: the run)")
    p.set_defaults(func=_export)

    p = verbs.add_parser("demo", help="the whole story offline: prepare, train plain, label "
                         "smoothing and mollified models, evaluate, report (Fashion-MNIST, "
                         "under 10 min on 2 CPU cores)")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--epochs", type=_positive_int, default=None, help="training epochs per model")
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist (offline) or cifar10")
    p.add_argument("--train-subset", type=_positive_int, default=None,
                   help="training images used")
    p.add_argument("--width", type=_positive_int, default=None, help="smallcnn width")
    p.add_argument("--gpu", action="store_true", help="train and evaluate on a GPU")
    p.set_defaults(func=_demo)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except TrainingFailed as err:
        print(f"raymoll {args.verb}: {err}", file=sys.stderr)
        return 1
    except RaymollError as err:
        # A user mistake: one clear paragraph, no traceback (RAYMOLL_DEBUG=1 shows it). Any
        # other exception is a bug and keeps its traceback.
        if os.environ.get("RAYMOLL_DEBUG"):
            raise
        print(f"raymoll {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"raymoll {args.verb}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
