"""Shared pytest fixtures."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Ray Train's controller polls its workers every 2 s by default; each run waits out a few polls
# (start, each state change, the end), ~5 s of a tiny test run's ~25 s. Set for the whole
# session (before any Ray starts), so the clusters and drivers the tests start inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Each run also starts a preemption watcher (an actor process polling for node drains, ~2 s
# of imports); no test drains a node.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def _free_port() -> int:
    """A free loopback port from the kernel's ephemeral range (above 32767 here, so outside
    Ray's worker ports 10002-19999)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# The S3 test server (moto, started by tests/test_s3.py) and its credentials, fixed when the
# session starts: the session's Ray (ray_local) is started with them in its environment, so
# every Ray worker reaches the same server, whichever test starts Ray first.
S3_ENV = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}",
          "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1"}
# The child exits 3 when Ray is initialised by the time the command returns.
_CLI = ("import sys; from raymoll.cli import main; rc = main(sys.argv[1:]); "
        "ray = sys.modules.get('ray'); sys.exit(3 if ray and ray.is_initialized() else rc)")


@pytest.fixture(scope="session")
def fashion_mnist_dir(tmp_path_factory):
    """Fashion-MNIST prepared once per test session (raw 32x32 .beton files + meta.json)."""
    from raymoll.data import prepare
    return prepare("fashion-mnist", tmp_path_factory.mktemp("data") / "fashion-mnist",
                   progress=False)


@pytest.fixture(scope="session")
def ray_local():
    """One embedded local Ray for the whole test session (each start costs ~10 s here).

    4 logical CPUs on 2 cores: lets 2-worker runs and concurrent Tune trials be scheduled.
    Ray's processes inherit this environment, S3_ENV included.
    """
    import ray
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    os.environ.pop("RAY_ADDRESS", None)  # never attach to a developer's cluster by accident
    os.environ.update(S3_ENV)
    ray.init(num_cpus=4)
    yield ray
    ray.shutdown()


@pytest.fixture
def cli_without_ray():
    """Run `raymoll ARGS` in a fresh interpreter and return (exit code, stderr); exit code 3
    means the command started Ray. A fresh process, because the session's own Ray (ray_local)
    would hide a Ray that the command started."""
    def run(args: list[str]) -> tuple[int, str]:
        proc = subprocess.run([sys.executable, "-c", _CLI, *args], cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        return proc.returncode, proc.stderr
    return run


@pytest.fixture(scope="session")
def s3_bucket():
    """A real S3-compatible server on loopback (moto's server mode, at S3_ENV's endpoint) with
    one empty bucket; returns the bucket's name. The AWS_* variables of S3_ENV point both
    pyarrow.fs (raymoll) and boto3 (the tests' own reads) at it."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    os.environ.update(S3_ENV)
    host, port = S3_ENV["AWS_ENDPOINT_URL"].removeprefix("http://").split(":")
    server = ThreadedMotoServer(ip_address=host, port=int(port), verbose=False)
    server.start()
    boto3.client("s3").create_bucket(Bucket="raymoll")
    yield "raymoll"
    server.stop()


# The 2-trial `raymoll tune` that two test files read: tests/test_s3.py its trials.parquet and
# best.yaml on S3, tests/test_tracking.py its MLflow runs (one search, both concerns: each search
# costs ~40 s of Ray Train start-ups here).
SEARCH_RATES = [0.05, 1e-5]
SEARCH_EPOCHS = 2


@pytest.fixture(scope="session")
def s3_tracked_search(ray_local, s3_bucket, fashion_mnist_dir, tmp_path_factory):
    """A 2-epoch grid search over SEARCH_RATES with run.storage_path on the S3 server and
    run.tracker=mlflow on a local sqlite store; returns (its s3:// folder, the MLflow URI)."""
    from raymoll.cli import main
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    storage = f"s3://{s3_bucket}/tune"
    assert main(["tune", "--config", str(REPO / "jobs" / "configs" / "fashion_tune.yaml"),
                 f"data.path={fashion_mnist_dir}", "data.train_subset=512", "data.batch_size=32",
                 "data.num_workers=1", "eval.val_subset=128", "model.width=8",
                 f"optim.epochs={SEARCH_EPOCHS}", f"run.storage_path={storage}",
                 "run.name=search", "run.tracker=mlflow", f"run.tracker_uri={uri}",
                 "run.num_workers=1", "run.cpus_per_worker=0.25", "tune.trial_cpus=0.5",
                 "tune.max_concurrent=2", "tune.num_samples=1",
                 f"tune.grace_period={SEARCH_EPOCHS}",
                 "tune.objective={val_accuracy: 1.0}",
                 f"tune.space={{optim.lr: {{type: grid, values: {SEARCH_RATES}}}}}"]) == 0
    return storage, uri
