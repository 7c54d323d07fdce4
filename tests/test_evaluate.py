import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raymoll.checkpoint import CheckpointError, load_model, save_checkpoint
from raymoll.config import Config, to_dict
from raymoll.corruptions import CORRUPTIONS, FAMILIES, VALIDATION_CORRUPTIONS, corrupt
from raymoll.data import load_split, normalizer, prepare, read_meta
from raymoll.evaluate import EvaluateError, evaluate, set_seed
from raymoll.metrics import (accuracy, brier_score, expected_calibration_error,
                             negative_log_likelihood)
from raymoll.models import build_model

N_TEST = 16  # clean test images
N_OFFICIAL = 8  # images per severity block of the fake -C files

# docs/protocol.md §6 "The results table", column by column.
DESIGN_COLUMNS = {
    "run": pa.string(), "checkpoint": pa.string(), "dataset": pa.string(),
    "model": pa.string(), "mollified": pa.bool_(), "corruption": pa.string(),
    "family": pa.string(), "severity": pa.int8(), "n": pa.int64(), "accuracy": pa.float64(),
    "nll": pa.float64(), "ece": pa.float64(), "brier": pa.float64(),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare("synthetic", tmp_path_factory.mktemp("data"), num_train=20, num_test=N_TEST,
                   progress=False)


def make_checkpoint(folder, meta, num_classes=None):
    """An untrained smallcnn saved in the training loop's checkpoint format."""
    torch.manual_seed(0)
    meta = dict(meta, num_classes=num_classes or meta["num_classes"])
    cfg = to_dict(Config())
    cfg["model"]["width"] = 4
    cfg["run"]["name"] = "tiny"
    weights = build_model("smallcnn", meta["num_classes"], width=4).state_dict()
    save_checkpoint(folder, {"model": weights, "config": cfg, "meta": meta, "epoch": 1,
                             "metrics": {}})
    return folder


@pytest.fixture(scope="module")
def checkpoint(data_dir, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), read_meta(data_dir))


@pytest.fixture(scope="module")
def generated(data_dir, checkpoint, tmp_path_factory):
    torch.set_num_threads(1)
    return evaluate(checkpoint, data_dir, out=tmp_path_factory.mktemp("out") / "r.parquet",
                    seed=7, batch_size=10, device="cpu")


def direct_metrics(checkpoint, data_dir, images, labels):
    """Metrics from the metric functions on the whole set at once (not the streaming path)."""
    model, _ = load_model(checkpoint)
    with torch.no_grad():
        probs = model(normalizer(read_meta(data_dir))(images)).softmax(1).double()
    return {"accuracy": accuracy(probs, labels), "nll": negative_log_likelihood(probs, labels),
            "ece": expected_calibration_error(probs, labels), "brier": brier_score(probs, labels)}


def row(frame, corruption, severity):
    match = frame[(frame["corruption"] == corruption) & (frame["severity"] == severity)]
    assert len(match) == 1
    return match.iloc[0]


def test_table_has_one_row_per_set_with_the_design_schema(generated):
    table = pq.read_table(generated)
    assert table.num_rows == 1 + 19 * 5
    for name, dtype in DESIGN_COLUMNS.items():
        assert table.schema.field(name).type == dtype, name
    frame = table.to_pandas()
    assert (frame["n"] == N_TEST).all()
    assert set(frame["run"]) == {"tiny"} and set(frame["model"]) == {"smallcnn"}
    assert frame["mollified"].all() and set(frame["dataset"]) == {"synthetic"}
    counts = frame.groupby("family").size().to_dict()
    assert counts == {"clean": 1, "noise": 15, "blur": 20, "weather": 20, "digital": 20,
                      "validation": 20}
    for _, r in frame[frame["severity"] > 0].iterrows():
        assert r["family"] == FAMILIES[r["corruption"]]
    assert sorted(frame[frame["corruption"] == "fog"]["severity"]) == [1, 2, 3, 4, 5]
    assert set(frame["corruption"]) == {"clean", *CORRUPTIONS, *VALIDATION_CORRUPTIONS}


def test_metadata_holds_the_run_settings(generated):
    settings = json.loads(pq.read_schema(generated).metadata[b"raymoll"])["tiny"]
    assert settings["seed"] == 7 and settings["corruptions"] == "generated"
    assert settings["mollify"] == to_dict(Config())["mollify"]
    assert settings["config"]["model"]["width"] == 4


@pytest.mark.parametrize("corruption,severity", [("clean", 0), ("gaussian_noise", 3),
                                                 ("spatter", 5)])
def test_metrics_equal_the_metric_functions_on_the_set(generated, checkpoint, data_dir,
                                                       corruption, severity):
    images, labels = load_split(data_dir, "test")
    if severity:  # each set is reproducible alone from (seed, corruption, severity)
        generator = torch.Generator().manual_seed(set_seed(7, corruption, severity))
        images = corrupt(images, corruption, severity, generator=generator)
    expected = direct_metrics(checkpoint, data_dir, images, labels)
    got = row(pd.read_parquet(generated), corruption, severity)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_bins_are_a_reliability_diagram_of_the_set(generated):
    for _, r in pd.read_parquet(generated).iterrows():
        count, conf, acc = (np.asarray(r[k], float) for k in
                            ("bin_count", "bin_confidence", "bin_accuracy"))
        assert len(count) == 15 and count.sum() == r["n"]
        assert np.isnan(conf[count == 0]).all() and np.isnan(acc[count == 0]).all()
        filled = count > 0
        assert (acc[filled] * count[filled]).sum() / r["n"] == pytest.approx(r["accuracy"])
        ece = (np.abs(acc - conf)[filled] * count[filled]).sum() / r["n"]
        assert ece == pytest.approx(r["ece"])


def fake_c_folder(root, names, image_size):
    """The official layout: <name>.npy uint8 (5 * N_OFFICIAL, H, W, 3), severities stacked in
    blocks 1..5, plus labels.npy. Block s has its own brightness so every block scores apart."""
    root.mkdir()
    rng = np.random.default_rng(0)
    labels = np.tile(rng.integers(0, 10, N_OFFICIAL), 5).astype(np.int64)
    np.save(root / "labels.npy", labels)
    for name in names:
        blocks = [rng.integers(0, 40 * s + 16, (N_OFFICIAL, image_size, image_size, 3))
                  for s in range(1, 6)]
        np.save(root / f"{name}.npy", np.concatenate(blocks).astype(np.uint8))
    return root


def test_official_corruptions_are_read_block_by_block(tmp_path, data_dir, checkpoint):
    with_files = list(CORRUPTIONS) + ["speckle_noise", "saturate"]
    root = fake_c_folder(tmp_path / "c", with_files, 32)
    torch.set_num_threads(1)
    out = evaluate(checkpoint, data_dir, corruptions_dir=root, out=tmp_path / "r.parquet",
                   severities=[2, 5], device="cpu")
    frame = pd.read_parquet(out)
    assert len(frame) == 1 + 19 * 2
    from_files = frame["corruption"].isin(with_files)
    assert (frame[from_files]["n"] == N_OFFICIAL).all()
    assert (frame[~from_files]["n"] == N_TEST).all()  # clean, gaussian_blur, spatter: generated
    stored = np.load(root / "motion_blur.npy")
    labels = torch.from_numpy(np.load(root / "labels.npy"))
    for severity in (2, 5):
        block = slice((severity - 1) * N_OFFICIAL, severity * N_OFFICIAL)
        images = torch.from_numpy(stored[block]).permute(0, 3, 1, 2).contiguous()
        expected = direct_metrics(checkpoint, data_dir, images, labels[block])
        got = row(frame, "motion_blur", severity)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (severity, key)
    settings = json.loads(pq.read_schema(out).metadata[b"raymoll"])["tiny"]
    assert sorted(settings["official_corruptions"]) == sorted(with_files)


def test_subset_scores_the_first_images_of_every_set(tmp_path, data_dir, checkpoint):
    torch.set_num_threads(1)
    out = evaluate(checkpoint, data_dir, out=tmp_path / "r.parquet", severities=[3],
                   subset=5, seed=7, device="cpu")
    frame = pd.read_parquet(out)
    assert len(frame) == 1 + 19 and (frame["n"] == 5).all()
    images, labels = load_split(data_dir, "test", subset=5)
    expected = direct_metrics(checkpoint, data_dir, images, labels)
    assert row(frame, "clean", 0)["nll"] == pytest.approx(expected["nll"], rel=1e-5)


def test_incomplete_c_folder_fails_before_work_and_keeps_the_old_output(tmp_path, data_dir,
                                                                        checkpoint):
    root = fake_c_folder(tmp_path / "c", [n for n in CORRUPTIONS if n != "frost"], 32)
    out = tmp_path / "r.parquet"
    out.write_bytes(b"an earlier result")
    with pytest.raises(ValueError, match="frost"):
        evaluate(checkpoint, data_dir, corruptions_dir=root, out=out, device="cpu")
    assert out.read_bytes() == b"an earlier result"
    assert sorted(tmp_path.iterdir()) == sorted([root, out])  # no temporary left behind


def test_c_files_of_another_image_size_are_refused(tmp_path, data_dir, checkpoint):
    root = fake_c_folder(tmp_path / "c", CORRUPTIONS, 16)
    with pytest.raises(EvaluateError, match="16x16"):
        evaluate(checkpoint, data_dir, corruptions_dir=root, out=tmp_path / "r.parquet",
                 device="cpu")
    assert not (tmp_path / "r.parquet").exists()


def test_checkpoint_for_another_class_count_is_refused(tmp_path, data_dir):
    ckpt = make_checkpoint(tmp_path / "ckpt", read_meta(data_dir), num_classes=7)
    with pytest.raises(CheckpointError, match="7 classes"):
        evaluate(ckpt, data_dir, out=tmp_path / "r.parquet", device="cpu")
    assert not (tmp_path / "r.parquet").exists()


@pytest.mark.parametrize("kwargs,message", [({"severities": [0, 1]}, "severities"),
                                            ({"severities": [2, 2]}, "severities"),
                                            ({"device": "gpu"}, "device")])
def test_bad_arguments_are_refused(tmp_path, data_dir, checkpoint, kwargs, message):
    with pytest.raises(EvaluateError, match=message):
        evaluate(checkpoint, data_dir, out=tmp_path / "r.parquet", **kwargs)
    assert not (tmp_path / "r.parquet").exists()
