"""Live tracking with the real clients, offline: a 2-epoch `raymoll train` per tracker on a
real local Ray (the three at once), read back with TensorBoard's event reader, MlflowClient on
a sqlite store, and W&B's offline run folder; a 2-trial `raymoll tune` logged by Tune's MLflow callback (the
search of conftest.py, which tests/test_s3.py reads too)."""
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SEARCH_EPOCHS, SEARCH_RATES
from raymoll.checkpoint import load_checkpoint
from raymoll.config import ConfigError, load_config, to_dict
from raymoll.tracking import flat_params, log_evaluation

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "jobs" / "configs"
TINY = ["optim.epochs=2", "data.train_subset=1024", "eval.val_subset=128", "data.batch_size=64",
        "model.width=8", "data.num_workers=1"]
LOGGED = ("train_loss", "clean_accuracy", "val_score")


def wandb_history(path: Path) -> list[dict[str, str]]:
    """The history rows (key -> JSON text) of a W&B transaction log (run-*.wandb), whose
    Python reader wandb 0.31 no longer ships: the LevelDB log layout wandb writes (a 7-byte
    ":W&B" header, 32 KiB blocks, records with crc32 / length / type headers, type 1 full,
    2-4 first/middle/last) around protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2
    data, pos, chunk, rows = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # block trailer or padding
            pos += left
            continue
        chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): i.value_json
                             for i in record.history.item})
    return rows


TRACKED = {  # tracker -> its extra settings; run.tracker_uri is a path under the run's folder
    "tensorboard": [],
    "mlflow": ["run.tracker_project=exp", "optim.lr=0.02"],
    "wandb": [],
}


def _tracker_uri(tracker: str, folder: Path) -> str:
    return {"tensorboard": str(folder / "tb"), "mlflow": f"sqlite:///{folder}/mlflow.db",
            "wandb": str(folder / "wandb-runs")}[tracker]


@pytest.fixture(scope="module")
def tracked(ray_local, fashion_mnist_dir, tmp_path_factory):
    """A 2-epoch `raymoll train` per tracker, the three at once: each a CLI process attached to
    the session's Ray (each run's start-up is mostly waiting, so together they take little more
    than one). Returns {tracker: (its folder, {epoch: metrics} from its checkpoints)}."""
    env = os.environ | {"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
                        "RAY_AUTH_MODE": "token", "PYTHONPATH": str(ROOT),
                        "WANDB_MODE": "offline", "WANDB_SILENT": "true"}  # reach the workers
    runs = {}
    for tracker, extra in TRACKED.items():
        folder = tmp_path_factory.mktemp(tracker)
        args = TINY + [f"data.path={fashion_mnist_dir}", f"run.storage_path={folder}",
                       "run.name=tracked", "run.cpus_per_worker=0.5", f"run.tracker={tracker}",
                       f"run.tracker_uri={_tracker_uri(tracker, folder)}", *extra]
        log = (folder / "driver.log").open("w")
        runs[tracker] = folder, subprocess.Popen(
            [sys.executable, "-m", "raymoll.cli", "train", "--config",
             str(CONFIGS / "fashion_small.yaml"), *args], env=env, stdout=log,
            stderr=subprocess.STDOUT)
    out = {}
    for tracker, (folder, process) in runs.items():
        assert process.wait(timeout=600) == 0, (folder / "driver.log").read_text()[-3000:]
        states = [load_checkpoint(p) for p in (folder / "tracked").glob("checkpoint_*")
                  if p.is_dir()]
        out[tracker] = folder, {state["epoch"]: state["metrics"] for state in states}
        assert sorted(out[tracker][1]) == [1, 2]
    return out


def test_flat_params_and_an_unknown_tracker():
    assert flat_params({"optim": {"lr": 0.02}, "data": {"augment": ["fcr"]}}) == \
        {"optim.lr": 0.02, "data.augment": '["fcr"]'}
    with pytest.raises(ConfigError, match="run.tracker"):
        load_config(None, ["run.tracker=neptune"])


def test_final_evaluation_headline_is_logged(tmp_path):
    from mlflow.tracking import MlflowClient
    from raymoll.report import headline
    from raymoll.results import read_results, write_results
    from test_report import fake_rows
    results = write_results(fake_rows("best", True, 0), {}, tmp_path / "best.parquet")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = to_dict(load_config(None, ["run.tracker=mlflow", f"run.tracker_uri={uri}",
                                        "run.name=search"]))
    log_evaluation(config, str(results), "search-best-evaluation", str(tmp_path))
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("search").experiment_id])
    (expected,) = headline(read_results(results))
    assert run.info.run_name == "search-best-evaluation"
    for key in ("clean_accuracy", "corrupted_accuracy", "corrupted_ece", "corrupted_ece_ts"):
        assert run.data.metrics[key] == pytest.approx(expected[key])


@pytest.mark.ray
def test_tensorboard_event_files_hold_every_epoch(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    folder, metrics = tracked["tensorboard"]
    events = EventAccumulator(_tracker_uri("tensorboard", folder))
    events.Reload()
    for key in LOGGED:
        logged = {e.step: e.value for e in events.Scalars(key)}
        assert logged == pytest.approx({epoch: m[key] for epoch, m in metrics.items()}, rel=1e-6)
    assert "config" in events.Tags()["tensors"] or "config/text_summary" in events.Tags()["tensors"]


@pytest.mark.ray
def test_mlflow_run_holds_params_and_every_epoch(tracked):
    from mlflow.tracking import MlflowClient
    folder, metrics = tracked["mlflow"]
    client = MlflowClient(_tracker_uri("mlflow", folder))
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert run.data.params["optim.lr"] == "0.02" and run.data.params["run.tracker"] == "mlflow"
    for key in LOGGED:
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert history == pytest.approx({epoch: m[key] for epoch, m in metrics.items()})


@pytest.mark.ray
def test_wandb_offline_run_folder_holds_the_metrics(tracked):
    folder, metrics = tracked["wandb"]
    (run_file,) = Path(_tracker_uri("wandb", folder)).glob("wandb/offline-run-*/run-*.wandb")
    history = {int(h["_step"]): h for h in wandb_history(run_file)}
    for epoch, m in metrics.items():
        assert float(history[epoch]["clean_accuracy"]) == pytest.approx(m["clean_accuracy"])


@pytest.mark.ray
def test_mlflow_logs_every_tune_trial(s3_tracked_search):
    from mlflow.tracking import MlflowClient
    _, uri = s3_tracked_search  # the search of conftest.py (its storage on the S3 test server)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("search").experiment_id])
    assert sorted(float(r.data.params["optim.lr"]) for r in runs) == sorted(SEARCH_RATES)
    for run in runs:
        epochs = [m.value for m in client.get_metric_history(run.info.run_id, "epoch")]
        assert sorted(epochs) == list(map(float, range(1, SEARCH_EPOCHS + 1)))  # once per epoch
