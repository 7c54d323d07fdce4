"""S3 end to end against a real S3-compatible server on loopback (moto's server mode, the
session fixture `s3_bucket`): raymoll.io's reads and atomic writes, then, marked `ray`, one
`raymoll train` whose worker is killed mid-epoch and resumes from S3, `raymoll evaluate` and
`raymoll report` on its S3 checkpoint and Parquet, and a tiny `raymoll tune`. Every check reads
the objects back from the server (boto3), not just their names."""
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from conftest import SEARCH_EPOCHS, SEARCH_RATES
from raymoll.cli import main
from raymoll.io import (StorageError, WriteError, atomic_path, atomic_write, check_writable,
                        check_writable_folder, exists, is_file, read_parquet, read_text,
                        write_parquet)
from raymoll.train.loop import FAULT_DRILL_ENV

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


def _objects(bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object under `prefix` on the server, key -> content (directory markers left out)."""
    s3 = boto3.client("s3")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix) for o in page.get("Contents", [])]
    return {key: s3.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys
            if not key.endswith("/")}


# --- raymoll.io on S3 (no Ray) -----------------------------------------------------------------


def test_io_reads_and_writes_objects(s3_bucket):
    uri = f"s3://{s3_bucket}/io/notes/a.txt"
    assert atomic_write(uri, "first") == uri
    atomic_write(uri, "second")
    assert _objects(s3_bucket, "io/notes/") == {"io/notes/a.txt": b"second"}  # no temporary
    assert read_text(uri) == "second" and is_file(uri)
    assert exists(f"s3://{s3_bucket}/io/notes") and not is_file(f"s3://{s3_bucket}/io/notes")
    assert not exists(f"s3://{s3_bucket}/io/missing.txt")
    with pytest.raises(StorageError, match="missing.txt"):
        read_text(f"s3://{s3_bucket}/io/missing.txt")
    import pandas as pd
    frame = pd.DataFrame({"trial": ["a", "b"], "score": [0.5, 0.25]})
    write_parquet(f"s3://{s3_bucket}/io/t.parquet", frame)
    back = pq.read_table(io.BytesIO(_objects(s3_bucket, "io/t.parquet")["io/t.parquet"]))
    assert back.to_pandas().equals(frame)
    assert read_parquet(f"s3://{s3_bucket}/io/t.parquet").equals(back)


def test_unwritable_s3_targets_are_refused_up_front(s3_bucket):
    with pytest.raises(WriteError, match="no-such-bucket"):
        check_writable_folder("s3://no-such-bucket/runs")
    atomic_write(f"s3://{s3_bucket}/io/prefix/x.txt", "x")
    with pytest.raises(WriteError, match="folder"):
        check_writable(f"s3://{s3_bucket}/io/prefix")  # a prefix, not a key
    assert _objects(s3_bucket, "io/prefix") == {"io/prefix/x.txt": b"x"}  # probes are gone


def test_checkpoints_load_from_s3_folders_and_files(s3_bucket):
    from raymoll.checkpoint import CheckpointError, load_checkpoint
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "config": {}, "meta": {}, "epoch": 3}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    folder = f"s3://{s3_bucket}/ckpt/run/checkpoint_000"
    atomic_write(f"{folder}/checkpoint.pt", buffer.getvalue())
    for path in (folder, f"{folder}/checkpoint.pt"):
        loaded = load_checkpoint(path)
        assert loaded["epoch"] == 3 and torch.equal(loaded["model"]["w"], state["model"]["w"])
    with pytest.raises(CheckpointError, match="no raymoll checkpoint"):
        load_checkpoint(f"s3://{s3_bucket}/ckpt/run/checkpoint_001")
    atomic_write(f"s3://{s3_bucket}/ckpt/bad/checkpoint.pt", b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(f"s3://{s3_bucket}/ckpt/bad")


def test_exception_mid_write_leaves_the_final_key_unchanged(s3_bucket):
    uri = f"s3://{s3_bucket}/atomic/exception.bin"
    atomic_write(uri, b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(uri) as temporary:
            temporary.write_bytes(b"half of the new")
            raise RuntimeError("boom")
    assert _objects(s3_bucket, "atomic/") == {"atomic/exception.bin": b"old"}


def test_writer_killed_mid_upload_leaves_the_final_key_unchanged(s3_bucket):
    """A process uploading 48 MiB (a multipart upload) is SIGKILLed once its upload has begun:
    the final key keeps the old object, and no object at all holds part of the new one."""
    key = "killed/big.bin"
    atomic_write(f"s3://{s3_bucket}/{key}", b"old")
    code = ("import sys; from raymoll.io import atomic_write\n"
            "atomic_write(sys.argv[1], b'n' * (48 << 20))\n")
    writer = subprocess.Popen([sys.executable, "-c", code, f"s3://{s3_bucket}/{key}"])
    s3 = boto3.client("s3")
    deadline = time.monotonic() + 60
    while not s3.list_multipart_uploads(Bucket=s3_bucket, Prefix="killed/").get("Uploads"):
        assert writer.poll() is None and time.monotonic() < deadline, "the upload never began"
        time.sleep(0.01)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    uploads = s3.list_multipart_uploads(Bucket=s3_bucket, Prefix="killed/")["Uploads"]
    assert all(u["Key"] != key for u in uploads)  # the upload went to a temporary key
    assert _objects(s3_bucket, "killed/") == {key: b"old"}


# --- the verbs on S3 (Ray) ---------------------------------------------------------------------

# One worker, 16 steps per epoch; the drill kills it at step 8 of epoch 2.
TINY = ["optim.epochs=2", "data.train_subset=1024", "eval.val_subset=200", "data.batch_size=64",
        "model.width=8", "run.num_workers=1", "run.num_to_keep=10", "run.max_failures=1"]


def _checkpoint_epochs(objects: dict[str, bytes]) -> list[int]:
    """The epochs of the complete checkpoint.pt objects among `objects` (one per folder)."""
    states = [torch.load(io.BytesIO(data), weights_only=True)
              for key, data in objects.items() if key.endswith("/checkpoint.pt")]
    return sorted(state["epoch"] for state in states)


@pytest.fixture(scope="module")
def s3_train(ray_local, s3_bucket, fashion_mnist_dir):
    """`raymoll train` into s3://<bucket>/train/s3run, its worker killed in epoch 2."""
    args = ["train", "--config", str(CONFIGS / "fashion_small.yaml"), *TINY,
            f"data.path={fashion_mnist_dir}", f"run.storage_path=s3://{s3_bucket}/train",
            "run.name=s3run"]
    os.environ[FAULT_DRILL_ENV] = "2:8:exit"
    try:
        assert main(args) == 0
    finally:
        os.environ.pop(FAULT_DRILL_ENV)
    return _objects(s3_bucket, "train/s3run/")


@pytest.mark.ray
def test_train_checkpoints_to_s3_and_resumes_from_it_after_a_worker_is_killed(s3_train,
                                                                             fashion_mnist_dir):
    assert "train/s3run/fault_drill_done" in s3_train  # the drill killed the worker
    # Each epoch once: the restarted worker resumed from epoch 1's checkpoint on S3 (a fresh
    # start would have redone epoch 1, and num_to_keep=10 would have kept both).
    assert _checkpoint_epochs(s3_train) == [1, 2]
    record = json.loads(s3_train["train/s3run/raymoll_run.json"])["settings"]
    assert record["optim.epochs"] == 2 and record["data.path"] == str(fashion_mnist_dir)


@pytest.mark.ray
def test_evaluate_and_report_read_and_write_s3(s3_train, s3_bucket, fashion_mnist_dir):
    newest = max((key for key in s3_train if key.endswith("/checkpoint.pt")),
                 key=lambda k: torch.load(io.BytesIO(s3_train[k]), weights_only=True)["epoch"])
    checkpoint = f"s3://{s3_bucket}/{newest.removesuffix('/checkpoint.pt')}"
    results = f"s3://{s3_bucket}/results/s3run.parquet"
    assert main(["evaluate", "--checkpoint", checkpoint, "--data", str(fashion_mnist_dir),
                 "--subset", "50", "--severities", "1", "--runner", "local", "--device", "cpu",
                 "--out", results]) == 0
    table = pq.read_table(io.BytesIO(_objects(s3_bucket, "results/")["results/s3run.parquet"]))
    assert table.num_rows == 1 + 19  # clean + 15 test and 4 validation corruptions, severity 1
    assert set(table["checkpoint"].to_pylist()) == {checkpoint}
    assert set(table["run"].to_pylist()) == {"s3run"} and set(table["n"].to_pylist()) == {50}

    assert main(["report", results, "--out", f"s3://{s3_bucket}/report"]) == 0
    report = _objects(s3_bucket, "report/")
    pngs = [key for key in report if key.endswith(".png")]
    assert len(pngs) == 4 and all(report[k].startswith(b"\x89PNG\r\n\x1a\n") for k in pngs)
    summary = report["report/summary.md"].decode()
    assert results in summary and f"checkpoint `{checkpoint}` (epoch 2)" in summary


@pytest.mark.ray
def test_tune_writes_trials_and_best_config_to_s3(s3_tracked_search, s3_bucket):
    storage, _ = s3_tracked_search  # the search of conftest.py, on s3://<bucket>/tune
    found = _objects(s3_bucket, "tune/search/")
    trials = pq.read_table(io.BytesIO(found["tune/search/trials.parquet"])).to_pandas()
    last = trials.sort_values("epoch").groupby("trial_id").tail(1)
    assert sorted(last["config/optim.lr"]) == sorted(SEARCH_RATES)
    assert set(last["trial_status"]) == {"completed"} and set(last["epoch"]) == {SEARCH_EPOCHS}
    best = last.loc[last["val_score"].idxmax()]
    best_yaml = yaml.safe_load(found["tune/search/best.yaml"])
    assert best_yaml["optim"]["lr"] == best["config/optim.lr"]
    assert best_yaml["run"]["name"] == "search-best"
    assert best_yaml["run"]["storage_path"] == storage
