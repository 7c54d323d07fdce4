import json
from pathlib import Path

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
from raymoll.corruptions.official import CorruptionFilesError
from raymoll.evaluate import EvaluateError, evaluate, set_seed
from raymoll.evaluation.scoring import SetScorer, fit_temperature
from raymoll.io import WriteError
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
    with pytest.raises(CorruptionFilesError, match="16x16"):
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


# ---------------------------------------------------------------------------------------------
# Temperature scaling


def calibrated_logits(n, k=10, seed=0):
    """Logits whose softmax is the true label distribution: labels drawn from it."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * 2
    labels = torch.multinomial(logits.softmax(1), 1, generator=g).squeeze(1)
    return logits, labels


def nll(logits, labels, t):
    return torch.nn.functional.cross_entropy(logits / t, labels).item()


def test_fitted_temperature_is_the_grid_minimum_of_nll_on_over_confident_logits():
    logits, labels = calibrated_logits(4000)
    over_confident = 2.5 * logits
    fitted = fit_temperature(over_confident, labels)
    grid = torch.logspace(np.log10(0.5), np.log10(10), 8001, dtype=torch.float64)
    losses = torch.stack([torch.nn.functional.cross_entropy(over_confident / t, labels)
                          for t in grid])
    best = grid[losses.argmin()].item()
    assert fitted == pytest.approx(best, rel=1e-3)
    assert nll(over_confident, labels, fitted) <= losses.min().item() + 1e-12


def test_fitted_temperature_of_calibrated_logits_is_one():
    logits, labels = calibrated_logits(100_000, seed=1)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=1e-2)


@pytest.fixture(scope="module")
def with_val(tmp_path_factory):
    """A data folder with a validation split: until `prepare` writes one, the test split
    copied as val.beton (the fit only needs a split of the same kind)."""
    import shutil

    from raymoll.data.prepare import SPLITS
    if "val" not in SPLITS:
        pytest.skip("needs the validation split of `raymoll prepare` (the protocol branch)")
    folder = prepare("synthetic", tmp_path_factory.mktemp("valdata"), num_train=20,
                     num_test=N_TEST, progress=False)
    meta = json.loads((folder / "meta.json").read_text())
    if "val" not in meta["counts"]:
        shutil.copy(folder / meta["files"]["test"]["file"], folder / "val.beton")
        meta["counts"]["val"] = meta["counts"]["test"]
        meta["files"]["val"] = dict(meta["files"]["test"], file="val.beton")
        (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_each_row_is_scored_raw_and_temperature_scaled(tmp_path, with_val, checkpoint):
    torch.set_num_threads(1)
    out = evaluate(checkpoint, with_val, out=tmp_path / "r.parquet", severities=[4], seed=3,
                   device="cpu")
    frame = pd.read_parquet(out)
    model, _ = load_model(checkpoint)
    normalize = normalizer(read_meta(with_val))
    with torch.no_grad():
        val_images, val_labels = load_split(with_val, "val")
        t = fit_temperature(model(normalize(val_images)), val_labels)
    assert (frame["temperature"] == t).all()
    assert json.loads(pq.read_schema(out).metadata[b"raymoll"])["tiny"]["temperature"] == t
    images, labels = load_split(with_val, "test")
    for corruption in ("clean", "fog", "speckle_noise"):
        severity = 0 if corruption == "clean" else 4
        generator = torch.Generator().manual_seed(set_seed(3, corruption, severity))
        x = corrupt(images, corruption, severity, generator=generator) if severity else images
        with torch.no_grad():
            probs = (model(normalize(x)) / t).softmax(1).double()
        got = row(frame, corruption, severity)
        assert got["nll_ts"] == pytest.approx(negative_log_likelihood(probs, labels), rel=1e-5)
        assert got["ece_ts"] == pytest.approx(expected_calibration_error(probs, labels),
                                              rel=1e-5, abs=1e-7)
        assert got["brier_ts"] == pytest.approx(brier_score(probs, labels), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Defects of issue 14 (each failed before: late, or a traceback)


@pytest.mark.parametrize("where", ["parent_is_a_file", "read_only"])
def test_defect2_unwritable_out_fails_before_any_work(tmp_path, data_dir, checkpoint, where,
                                                      monkeypatch):
    if where == "parent_is_a_file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "r.parquet"
    else:
        out = Path("/proc/raymoll-not-writable/r.parquet")  # read-only even for root
    scored = []
    monkeypatch.setattr(SetScorer, "__call__", lambda *a, **k: scored.append(1))
    with pytest.raises(WriteError, match="cannot write"):  # raymoll.io's up-front check
        evaluate(checkpoint, data_dir, out=out, device="cpu")
    assert not scored  # refused before the first set was scored


def test_defect5_every_c_file_is_checked_by_header_before_scoring(tmp_path, data_dir,
                                                                    checkpoint, monkeypatch):
    root = fake_c_folder(tmp_path / "c", CORRUPTIONS, 32)
    np.save(root / "jpeg_compression.npy", np.zeros((5 * N_OFFICIAL, 16, 16, 3), np.uint8))
    scored = []
    monkeypatch.setattr(SetScorer, "__call__", lambda *a, **k: scored.append(1))
    with pytest.raises(CorruptionFilesError, match="jpeg_compression.npy holds 16x16"):
        evaluate(checkpoint, data_dir, corruptions_dir=root, out=tmp_path / "r.parquet",
                 device="cpu")
    assert not scored and not (tmp_path / "r.parquet").exists()


@pytest.mark.parametrize("kwargs,message", [({"subset": -5}, "--subset"),
                                            ({"subset": 10 ** 6}, "--subset"),
                                            ({"batch_size": 0}, "--batch-size"),
                                            ({"runner": "spark"}, "--runner")])
def test_defect8_bad_sizes_are_refused_clearly(tmp_path, data_dir, checkpoint, kwargs, message):
    with pytest.raises(EvaluateError, match=message):
        evaluate(checkpoint, data_dir, out=tmp_path / "r.parquet", device="cpu", **kwargs)


def test_defect7_bad_checkpoints_are_refused_clearly(tmp_path, data_dir, checkpoint):
    state = torch.load(Path(checkpoint) / "checkpoint.pt", weights_only=True)
    cases = {"folder": tmp_path / "empty", "missing": tmp_path / "nothing.pt",
             "garbage": tmp_path / "garbage.pt"}
    cases["folder"].mkdir()
    cases["garbage"].write_bytes(np.random.default_rng(0).bytes(4096))
    no_model = dict(state, config={k: v for k, v in state["config"].items() if k != "model"})
    cases["no_model"] = save_checkpoint(tmp_path / "no_model", no_model)
    mismatch = dict(state, config=dict(state["config"], model=dict(state["config"]["model"],
                                                                     width=8)))
    cases["mismatch"] = save_checkpoint(tmp_path / "mismatch", mismatch)
    cases["no_ema"] = checkpoint
    messages = {"folder": "no raymoll checkpoint", "missing": "no raymoll checkpoint",
                "garbage": "not a readable", "no_model": "config.model",
                "mismatch": "do not fit its config", "no_ema": "no EMA weights"}
    for case, path in cases.items():
        kwargs = {"weights": "ema"} if case == "no_ema" else {}
        with pytest.raises(CheckpointError, match=messages[case]):
            evaluate(path, data_dir, out=tmp_path / "r.parquet", device="cpu", **kwargs)
    assert not (tmp_path / "r.parquet").exists()


def test_ema_and_raw_weights_follow_the_checkpoint_contract(tmp_path, data_dir, checkpoint):
    state = torch.load(Path(checkpoint) / "checkpoint.pt", weights_only=True)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in state["model"].items()}
    path = save_checkpoint(tmp_path / "ema", dict(state, ema=ema, selected="ema"))
    for weights, expected in (("selected", ema), ("ema", ema), ("raw", state["model"])):
        model, loaded = load_model(path, weights=weights)
        assert loaded["weights"] == ("raw" if expected is state["model"] else "ema")
        for key, value in model.state_dict().items():
            assert torch.equal(value, expected[key]), (weights, key)


@pytest.mark.ray
def test_ray_runner_rows_equal_the_local_runner(tmp_path, data_dir, checkpoint, ray_local):
    torch.set_num_threads(1)
    kwargs = {"severities": [2], "seed": 5, "batch_size": 8, "device": "cpu"}
    local = pq.read_table(evaluate(checkpoint, data_dir, out=tmp_path / "l.parquet",
                                   runner="local", **kwargs))
    on_ray = pq.read_table(evaluate(checkpoint, data_dir, out=tmp_path / "r.parquet",
                                    runner="ray", **kwargs))
    assert on_ray.num_rows == 1 + 19
    assert json.loads(on_ray.schema.metadata[b"raymoll"])["tiny"]["runner"] == "ray"
    for name in local.column_names:  # NaN (empty bins) compares equal in float arrays
        expected, got = local[name].to_pylist(), on_ray[name].to_pylist()
        if isinstance(expected[0], str):
            assert expected == got, name
        else:
            np.testing.assert_array_equal(np.array(got, float), np.array(expected, float), name)
