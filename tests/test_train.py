"""Training on a real local Ray: 2 DDP workers on Fashion-MNIST, per-epoch metrics on the
validation split, checkpoints that reproduce what was reported, exact resume after a worker
dies mid-epoch, resume after a killed driver, and proof that the test split cannot influence
training or selection."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from raymoll.checkpoint import CheckpointError, load_checkpoint, load_model
from raymoll.cli import main
from raymoll.config import load_config
from raymoll.data import load_split, normalizer
from raymoll.data.prepare import _sha256, _write_split
from raymoll.data.sources import ArraySplit
from raymoll.inference import score
from raymoll.mollify import Mollifier, MollifyConfig
from raymoll.results import read_results, run_settings
from raymoll.train.loop import FAULT_DRILL_ENV, Trainee, smooth_labels, training_batch

CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "fashion_small.yaml"
# Augmentation (fcr + a policy) and MixUp on, so exact resume covers every random stream; EMA
# on, so it covers the averaged weights too.
TINY = ["optim.epochs=2", "data.train_subset=4096", "eval.val_subset=200",
        "data.batch_size=64", "model.width=16", "data.augment=[fcr,trivialaugment]",
        "data.mixup_alpha=0.2", "optim.ema_decay=0.9", "run.num_workers=2",
        "run.num_to_keep=10"]


def _fit(data_dir, storage, name: str, drill: str | None = None, extra=()):
    from raymoll.train import fit
    cfg = load_config(CONFIG, TINY + [f"data.path={data_dir}", f"run.storage_path={storage}",
                                      f"run.name={name}", *extra])
    if drill:
        os.environ[FAULT_DRILL_ENV] = drill
    try:
        return cfg, fit(cfg)
    finally:
        os.environ.pop(FAULT_DRILL_ENV, None)


def _permuted_test_copy(data_dir: Path, out: Path) -> Path:
    """A copy of a prepared folder whose test.beton has its labels permuted (meta.json
    consistent); train.beton and val.beton are hard links to the originals."""
    out.mkdir()
    for name in ("train.beton", "val.beton"):
        os.link(data_dir / name, out / name)
    meta = json.loads((data_dir / "meta.json").read_text())
    images, labels = load_split(data_dir, "test")
    permuted = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    assert (permuted != labels).float().mean() > 0.5
    _write_split(ArraySplit(images.permute(0, 2, 3, 1).numpy(), permuted.numpy()),
                 out / "test.beton", meta["fields"])
    meta["files"]["test"] |= {"bytes": (out / "test.beton").stat().st_size,
                              "sha256": _sha256(out / "test.beton"),
                              "ends_sha256": _sha256(out / "test.beton", ends_only=True)}
    (out / "meta.json").write_text(json.dumps(meta))
    return out


@pytest.fixture(scope="module")
def runs(ray_local, fashion_mnist_dir, tmp_path_factory):
    """Three 2-worker, 2-epoch runs with one seed: A uninterrupted; B whose rank 0 is killed
    late in epoch 2 (step 25 of 32: well after epoch 1's checkpoint is registered, docs/platform.md)
    and resumed; C on a copy of the data whose test labels are permuted."""
    storage = tmp_path_factory.mktemp("train")
    permuted = _permuted_test_copy(Path(fashion_mnist_dir), tmp_path_factory.mktemp("p") / "d")
    return {"A": _fit(fashion_mnist_dir, storage, "a"),
            "B": _fit(fashion_mnist_dir, storage, "b", drill="2:25:exit",
                      extra=["run.max_failures=1"]),
            "C": _fit(permuted, storage, "c")}


def _checkpoints(result) -> dict[int, dict]:
    states = [load_checkpoint(p) for p in Path(result.path).glob("checkpoint_*") if p.is_dir()]
    return {state["epoch"]: state for state in states}


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.ray
def test_every_epoch_reports_metrics_once(runs):
    cfg, result = runs["A"]
    assert sorted(_checkpoints(result)) == [1, 2]
    assert result.metrics["epoch"] == 2
    for key in ("train_loss", "clean_accuracy", "clean_nll", "clean_ece", "val_accuracy",
                "val_nll", "val_ece", "val_score", "val_saturate_accuracy"):
        assert key in result.metrics
    assert result.metrics["clean_n"] == cfg.eval.val_subset  # rank shards add up, no padding
    assert result.metrics["clean_accuracy"] > 0.3  # it learned (chance is 0.1)
    objective = cfg.tune.objective
    assert result.metrics["val_score"] == pytest.approx(
        sum(w * result.metrics[k] for k, w in objective.items()))


@pytest.mark.ray
def test_resumed_run_reaches_the_uninterrupted_weights_bitwise(runs):
    (_, a), (_, b) = runs["A"], runs["B"]
    assert (Path(b.path) / "fault_drill_done").exists()  # the drill really fired
    assert sorted(_checkpoints(b)) == [1, 2]  # epoch 1 was not redone after the restart
    final_a, final_b = _checkpoints(a)[2], _checkpoints(b)[2]
    assert _same_weights(final_a["model"], final_b["model"])
    assert _same_weights(final_a["ema"], final_b["ema"])  # a resumed run keeps its EMA
    assert final_a["metrics"]["train_loss"] == final_b["metrics"]["train_loss"]


@pytest.mark.ray
def test_test_split_cannot_influence_training_or_selection(runs):
    (_, a), (_, c) = runs["A"], runs["C"]
    ckpt_a, ckpt_c = _checkpoints(a), _checkpoints(c)
    assert sorted(ckpt_a) == sorted(ckpt_c)
    for epoch in ckpt_a:
        drop = lambda m: {k: v for k, v in m.items() if k != "epoch_seconds"}
        assert drop(ckpt_a[epoch]["metrics"]) == drop(ckpt_c[epoch]["metrics"])
    assert a.best_checkpoint is not None and c.best_checkpoint is not None
    assert _same_weights(load_checkpoint(a.best_checkpoint)["model"],
                         load_checkpoint(c.best_checkpoint)["model"])


@pytest.mark.ray
def test_checkpoint_reproduces_reported_accuracy(runs, fashion_mnist_dir):
    cfg, result = runs["A"]
    model, state = load_model(result.last_checkpoint, weights="raw")
    images, labels = load_split(fashion_mnist_dir, "val", subset=cfg.eval.val_subset)
    metrics = score(model, images, labels, normalizer(state["meta"])).compute()
    assert metrics["n"] == cfg.eval.val_subset
    assert metrics["accuracy"] == pytest.approx(result.metrics["clean_accuracy"], abs=1e-9)
    assert metrics["nll"] == pytest.approx(result.metrics["clean_nll"], rel=1e-4)
    assert state["config"]["run"]["name"] == "a"


@pytest.mark.ray
def test_ema_weights_are_checkpointed_selected_and_evaluated(runs, fashion_mnist_dir, tmp_path):
    cfg, result = runs["A"]
    metrics = result.metrics
    assert {"ema_clean_accuracy", "ema_val_score"} <= set(metrics)
    state = load_checkpoint(result.last_checkpoint)
    assert state["selected"] == ("ema" if metrics["ema_val_score"] >= metrics["val_score"]
                                 else "raw")
    # The checkpointed EMA weights are the ones whose validation metrics were reported.
    model, _ = load_model(result.last_checkpoint, weights="ema")
    images, labels = load_split(fashion_mnist_dir, "val", subset=cfg.eval.val_subset)
    assert score(model, images, labels, normalizer(state["meta"])).compute()["accuracy"] == \
        pytest.approx(metrics["ema_clean_accuracy"], abs=1e-9)

    out = tmp_path / "ema.parquet"
    assert main(["evaluate", "--checkpoint", result.last_checkpoint, "--data",
                 str(fashion_mnist_dir), "--out", str(out), "--subset", "200", "--severities",
                 "1", "--runner", "local", "--device", "cpu", "--weights", "ema"]) == 0
    assert run_settings(read_results(out))["a"]["weights"] == "ema"
    test_images, test_labels = load_split(fashion_mnist_dir, "test", subset=200)
    clean = pd.read_parquet(out).query("corruption == 'clean'")["accuracy"].item()
    assert clean == pytest.approx(score(model, test_images, test_labels,
                                        normalizer(state["meta"])).compute()["accuracy"])


@pytest.mark.ray
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(ray_local, fashion_mnist_dir,
                                                                    tmp_path):
    import ray.train
    with pytest.raises(ray.train.TrainingFailedError, match="non-finite at epoch 2, step 3"):
        _fit(fashion_mnist_dir, tmp_path, "nan", drill="2:3:nan",
             extra=["data.train_subset=1024", "run.num_workers=1"])
    checkpoints = [p for p in (tmp_path / "nan").glob("checkpoint_*") if p.is_dir()]
    assert [load_checkpoint(p)["epoch"] for p in checkpoints] == [1]


def _complete_epochs(folder: Path) -> list[int]:
    """The epochs of the complete checkpoints in a run folder (one still being written is not)."""
    epochs = []
    for path in folder.glob("checkpoint_*"):
        try:
            epochs.append(load_checkpoint(path)["epoch"])
        except CheckpointError:
            pass
    return sorted(epochs)


@pytest.mark.ray
def test_defect1_killed_driver_resumes_from_the_newest_checkpoint(ray_local, fashion_mnist_dir,
                                                                   tmp_path):
    """The driver is killed the moment epoch 2's checkpoint is in storage, before Ray's
    controller (which polls its workers) has registered it; the re-run continues from epoch 2."""
    # One worker: the defect is the driver's death (DDP is the A/B/C runs').
    args = ["train", "--config", str(CONFIG), *TINY, "optim.epochs=3", "data.train_subset=1024",
            f"data.path={fashion_mnist_dir}", f"run.storage_path={tmp_path}", "run.name=killed",
            "run.num_to_keep=10", "run.num_workers=1"]
    env = os.environ | {"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    driver = subprocess.Popen([sys.executable, "-m", "raymoll.cli", *args], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while _complete_epochs(tmp_path / "killed") != [1, 2]:
        assert driver.poll() is None and time.monotonic() < deadline, "the run ended unkilled"
        time.sleep(0.05)
    driver.kill()
    driver.wait()
    assert main(args) == 0
    # Each epoch once: epoch 2 was not redone, and its checkpoint is not left beside a redo.
    assert _complete_epochs(tmp_path / "killed") == [1, 2, 3]


@pytest.mark.ray
def test_defect3_gpu_run_on_a_cpu_cluster_fails_before_submitting(ray_local, fashion_mnist_dir,
                                                                   tmp_path):
    from raymoll.runtime import InsufficientResources, check_resources
    check_resources({"CPU": 1}, 4)  # the session's Ray has 4 CPUs and no autoscaler
    with pytest.raises(InsufficientResources):
        check_resources({"CPU": 1}, 5)
    with pytest.raises(InsufficientResources):
        check_resources({"CPU": 1, "GPU": 1}, 1)
    # max_failures=-1 would retry a worker group that can never start without end.
    assert main(["train", "--config", str(CONFIG), *TINY, f"data.path={fashion_mnist_dir}",
                 f"run.storage_path={tmp_path}", "run.name=gpu", "run.use_gpu=true",
                 "run.max_failures=-1"]) == 2
    assert not list((tmp_path / "gpu").glob("checkpoint_*"))


# ---------------------------------------------------------------------------------------------
# The training targets (no Ray)


def _trainee(mollify: MollifyConfig, eps: float, k: int = 5) -> Trainee:
    streams = {"mollify": torch.Generator().manual_seed(3)}
    return Trainee(None, None, None, None, Mollifier(mollify, image_size=8, num_classes=k),
                   None, eps, streams)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.35])
def test_label_smoothing_targets_equal_the_definition(eps):
    k, y = 5, torch.tensor([0, 3, 4, 1])
    x = torch.randn(4, 3, 8, 8)
    _, targets = training_batch(_trainee(MollifyConfig(enabled=False), eps, k), x, y)
    expected = (1 - eps) * torch.nn.functional.one_hot(y, k).float() + eps / k
    torch.testing.assert_close(targets, expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(smooth_labels(expected, k, 0.2), 0.8 * expected + 0.2 / k)


def test_label_smoothing_composes_with_the_mollifier():
    """(1 - eps)(1 - gamma) onehot + (1 - (1 - eps)(1 - gamma)) / K, gamma the mollifier's."""
    k, eps, y = 5, 0.1, torch.arange(8) % 5
    x = torch.randn(8, 3, 8, 8)
    _, mollified_only = training_batch(_trainee(MollifyConfig(), 0.0, k), x, y)
    _, both = training_batch(_trainee(MollifyConfig(), eps, k), x, y)
    onehot = torch.nn.functional.one_hot(y, k).float()
    # mollified_only = (1 - gamma) onehot + gamma / K: recover gamma per sample
    gamma = (1 - mollified_only[torch.arange(8), y]) * k / (k - 1)
    keep = ((1 - eps) * (1 - gamma))[:, None]
    torch.testing.assert_close(both, keep * onehot + (1 - keep) / k, rtol=0, atol=1e-6)
    assert (gamma > 0).any()  # some samples were mollified
