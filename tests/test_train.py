"""Training on a real local Ray: 2 DDP workers on Fashion-MNIST, per-epoch metrics, checkpoints
that reproduce what was reported, and recovery from a worker that dies mid-epoch."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from raymoll.checkpoint import CheckpointError, load_checkpoint, load_model
from raymoll.cli import main
from raymoll.config import load_config
from raymoll.data import load_split, normalizer
from raymoll.inference import score

CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "fashion_small.yaml"
TINY = ["optim.epochs=2", "data.train_subset=4096", "data.test_subset=500",
        "eval.val_subset=200", "data.batch_size=64", "model.width=16"]


@pytest.fixture(scope="module")
def drilled_run(ray_local, fashion_mnist_dir, tmp_path_factory):
    """One 2-worker, 2-epoch run whose rank 0 is killed late in epoch 2 (step 25 of 32: well
    after epoch 1's checkpoint is registered, PLATFORM_NOTES.md)."""
    from raymoll.train import fit
    storage = tmp_path_factory.mktemp("train")
    cfg = load_config(CONFIG, TINY + [
        f"data.path={fashion_mnist_dir}", f"run.storage_path={storage}", "run.name=drill",
        "run.num_workers=2", "run.max_failures=1", "run.num_to_keep=10", "run.fault_epoch=2", "run.fault_step=25"])
    return cfg, fit(cfg)


@pytest.mark.ray
def test_every_epoch_reports_metrics_once(drilled_run):
    cfg, result = drilled_run
    checkpoint_epochs = sorted(load_checkpoint(p)["epoch"] for p in _checkpoints(result))
    assert checkpoint_epochs == [1, 2]  # epoch 1 was not redone after the restart
    assert result.metrics["epoch"] == 2
    for key in ("train_loss", "clean_accuracy", "clean_nll", "clean_ece", "val_accuracy",
                "val_nll", "val_ece", "val_score", "val_saturate_accuracy"):
        assert key in result.metrics
    assert result.metrics["clean_n"] == cfg.data.test_subset  # rank shards add up, no padding
    assert result.metrics["clean_accuracy"] > 0.3  # it learned (chance is 0.1)


@pytest.mark.ray
def test_worker_death_resumes_from_epoch_one(drilled_run):
    cfg, result = drilled_run
    assert (Path(result.path) / "fault_drill_done").exists()  # the drill really fired


@pytest.mark.ray
def test_checkpoint_reproduces_reported_accuracy(drilled_run, fashion_mnist_dir):
    cfg, result = drilled_run
    model, state = load_model(result.last_checkpoint)
    images, labels = load_split(fashion_mnist_dir, "test", subset=cfg.data.test_subset)
    metrics = score(model, images, labels, normalizer(state["meta"])).compute()
    assert metrics["n"] == cfg.data.test_subset
    assert metrics["accuracy"] == pytest.approx(result.metrics["clean_accuracy"], abs=1e-9)
    assert metrics["nll"] == pytest.approx(result.metrics["clean_nll"], rel=1e-4)
    weights = torch.load(Path(result.last_checkpoint) / "checkpoint.pt", weights_only=True)
    assert weights["config"]["run"]["name"] == "drill"


def _checkpoints(result) -> list[str]:
    return [str(p) for p in Path(result.path).glob("checkpoint_*") if p.is_dir()]


@pytest.mark.ray
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(ray_local, fashion_mnist_dir,
                                                                    tmp_path):
    import ray.train
    from raymoll.train import fit
    cfg = load_config(CONFIG, TINY + [
        f"data.path={fashion_mnist_dir}", f"run.storage_path={tmp_path}", "run.name=nan",
        "run.fault_epoch=2", "run.fault_step=3", "run.fault_kind=nan", "data.train_subset=1024"])
    with pytest.raises(ray.train.TrainingFailedError, match="non-finite at epoch 2, step 3"):
        fit(cfg)
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
    args = ["train", "--config", str(CONFIG), *TINY, "optim.epochs=3", "data.train_subset=1024",
            f"data.path={fashion_mnist_dir}", f"run.storage_path={tmp_path}", "run.name=killed",
            "run.num_to_keep=10"]
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
