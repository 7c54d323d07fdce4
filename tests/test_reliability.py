"""Issue 14's defects 4, 6-10: each bad input fails up front (before Ray and heavy imports)
with a RaymollError, and prepare leaves no litter. Named after the defect each one guards."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from raymoll.cli import main
from raymoll.config import ConfigError, load_config
from raymoll.data.sources import DataError
from raymoll.preflight import check_train, check_tune, read_meta_file
from mounts import read_only_folder


def _cfg(data, tmp_path, *overrides):
    return load_config(None, [f"data.path={data}", f"run.storage_path={tmp_path / 'runs'}",
                              *overrides])


def test_defect4_subset_larger_than_split_refused(fashion_mnist_dir, tmp_path):
    key = "data.train_subset"
    count = read_meta_file(fashion_mnist_dir)["counts"]["train"]
    with pytest.raises(ConfigError, match=key):
        check_train(_cfg(fashion_mnist_dir, tmp_path, f"{key}={count + 1}"))
    check_train(_cfg(fashion_mnist_dir, tmp_path, f"{key}={count}"))  # the whole split is fine


@pytest.mark.parametrize("overrides, key", [
    (["mollify.sigma_min=32"], "mollify.sigma_min"),  # = the 32 px image width
    (["data.train_subset=100", "data.batch_size=101"], "data.batch_size"),
    (["run.num_workers=2", "data.train_subset=100", "data.batch_size=51"], "data.batch_size"),
    (["tune.objective={val_acc: 1.0}"], "tune.objective"),
])
def test_defect6_train_settings_checked_against_the_data(fashion_mnist_dir, tmp_path,
                                                          overrides, key, cli_without_ray):
    with pytest.raises(ConfigError, match=key):
        check_train(_cfg(fashion_mnist_dir, tmp_path, *overrides))
    code, err = cli_without_ray(["train", f"data.path={fashion_mnist_dir}",
                                 f"run.storage_path={tmp_path / 'runs'}", *overrides])
    assert code == 2 and "Traceback" not in err, err


def test_defect6_sigma_min_in_a_tune_space(fashion_mnist_dir, tmp_path):
    space = "tune.space={mollify.sigma_min: {type: uniform, low: 0.1, high: 40}}"
    with pytest.raises(ConfigError, match="sigma_min"):
        check_tune(_cfg(fashion_mnist_dir, tmp_path, space), resume=False)
    check_tune(_cfg(fashion_mnist_dir, tmp_path, space.replace("40", "20")), resume=False)


def test_defect6_unwritable_storage_path(fashion_mnist_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="run.storage_path"):
        check_train(_cfg(fashion_mnist_dir, tmp_path, f"run.storage_path={tmp_path / 'file'}"))
    with read_only_folder(tmp_path / "ro") as folder:
        with pytest.raises(ConfigError, match="run.storage_path"):
            check_train(_cfg(fashion_mnist_dir, tmp_path, f"run.storage_path={folder / 'runs'}"))


def test_defect6_tune_resume_and_duplicate_checked_before_ray(fashion_mnist_dir, tmp_path,
                                                             cli_without_ray):
    space = "tune.space={mollify.t_beta: {type: uniform, low: 1, high: 9}}"
    cfg = _cfg(fashion_mnist_dir, tmp_path, space, "run.name=search")
    with pytest.raises(ConfigError, match="--resume"):
        check_tune(cfg, resume=True)
    # A started search is what Ray Tune's Tuner.can_restore recognises: its tuner.pkl.
    (tmp_path / "runs" / "search").mkdir(parents=True)
    (tmp_path / "runs" / "search" / "tuner.pkl").write_bytes(b"state")
    with pytest.raises(ConfigError, match="already exists"):
        check_tune(cfg, resume=False)
    check_tune(cfg, resume=True)
    code, err = cli_without_ray(["tune", f"data.path={fashion_mnist_dir}",
                                 f"run.storage_path={tmp_path / 'runs'}", "run.name=search", space])
    assert code == 2 and "Traceback" not in err, err


def test_defect7_prepare_out_is_a_file_or_read_only(tmp_path):
    (tmp_path / "file").write_text("keep me")
    assert main(["prepare", "--dataset", "synthetic", "--out", str(tmp_path / "file")]) == 2
    assert (tmp_path / "file").read_text() == "keep me"
    with read_only_folder(tmp_path / "ro") as folder:
        assert main(["prepare", "--dataset", "synthetic", "--out", str(folder / "data")]) == 2
    assert main(["report", str(tmp_path / "none.parquet"), "--out", str(tmp_path / "file")]) == 2


def _tinyimagenet(root: Path, annotation_wnid: str, with_val_images: bool = True) -> Path:
    from PIL import Image
    import numpy as np
    (root / "wnids.txt").parent.mkdir(parents=True)
    (root / "wnids.txt").write_text("n001\nn002\n")
    image = Image.fromarray(np.zeros((64, 64, 3), np.uint8))
    for wnid in ("n001", "n002"):
        (root / "train" / wnid / "images").mkdir(parents=True)
        image.save(root / "train" / wnid / "images" / f"{wnid}_0.JPEG")
    (root / "val").mkdir()
    if with_val_images:
        (root / "val" / "images").mkdir()
        image.save(root / "val" / "images" / "val_0.JPEG")
    (root / "val" / "val_annotations.txt").write_text(f"val_0.JPEG\t{annotation_wnid}\t0\t0\t63\t63\n")
    return root


def test_defect7_tinyimagenet_unknown_wnid_and_missing_images(tmp_path):
    from raymoll.data.sources import load_source
    assert len(load_source("tinyimagenet", _tinyimagenet(tmp_path / "good", "n002")).test) == 1
    with pytest.raises(DataError, match="n999"):
        load_source("tinyimagenet", _tinyimagenet(tmp_path / "bad", "n999"))
    with pytest.raises(DataError, match="images"):
        load_source("tinyimagenet", _tinyimagenet(tmp_path / "noimg", "n001", False))


def test_defect8_empty_imagefolder(tmp_path):
    from raymoll.data.sources import load_source
    for split in ("train", "val"):
        (tmp_path / split / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        load_source("imagefolder", tmp_path)


def test_defect8_meta_image_size_of_one_number(fashion_mnist_dir, tmp_path):
    folder = tmp_path / "data"
    shutil.copytree(fashion_mnist_dir, folder)
    meta = json.loads((folder / "meta.json").read_text())
    meta["image_size"] = [32]
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="image_size"):
        read_meta_file(folder)


def test_defect8_binary_or_folder_config(tmp_path):
    binary = tmp_path / "model.pt"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="model.pt"):
        load_config(binary)
    with pytest.raises(ConfigError, match="folder"):
        load_config(tmp_path)


@pytest.mark.parametrize("flag", ["--epochs", "--width", "--train-subset"])
def test_defect8_demo_zero_is_refused_not_defaulted(flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["demo", flag, "0"])
    assert exit_.value.code == 2


BAD_ARGUMENTS = [
    ["train", "data.path=/nonexistent/data"],
    ["train", "--config", "/"],
    ["prepare", "--dataset", "nosuch", "--out", "/tmp/x"],
    ["prepare", "--dataset", "synthetic", "--out", "/proc/version"],
    ["report", "/nonexistent.parquet", "--out", "/proc/version"],
    ["evaluate", "--data", "/nonexistent/data", "--checkpoint", "ckpt"],
    ["evaluate", "--data", "/tmp", "--checkpoint", "ckpt", "--subset", "-5"],
    ["evaluate", "--data", "/tmp", "--checkpoint", "ckpt", "--batch-size", "0"],
    ["evaluate", "--data", "/tmp", "--checkpoint", "ckpt", "--device", "gpu"],
]


def test_defect9_bad_arguments_fail_before_heavy_imports():
    """Each case exits 2 without importing torch, FFCV, numba or Ray (their import is the
    ~10 s the issue measured); the time itself is jobs/bench/bad_inputs.py's."""
    code = ("import sys, json; from raymoll.cli import main\n"
            "rc = main(json.loads(sys.argv[1]))\n"
            "print(json.dumps([rc] + [m in sys.modules for m in ('torch', 'ffcv', 'numba', 'ray')]))")
    for argv in BAD_ARGUMENTS:
        done = subprocess.run([sys.executable, "-c", code, json.dumps(argv)], capture_output=True,
                              text=True, timeout=60)
        rc, *heavy = json.loads(done.stdout.splitlines()[-1])
        assert rc == 2 and not any(heavy), (argv, done.stdout, done.stderr)


def test_defect10_prepare_removes_stale_temporaries(tmp_path):
    from raymoll.data import prepare
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = tmp_path / f".train.beton.tmp-{int(dead.stdout)}"
    stale.write_bytes(b"x" * 1000)
    prepare("synthetic", tmp_path, progress=False, num_train=64, num_test=32)
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "test.beton", "train.beton",
                                                          "val.beton"]


def test_defect10_earlier_set_survives_a_failed_prepare(tmp_path):
    """A prepare that fails while writing leaves the earlier finished set whole (meta.json too)."""
    from raymoll.data import prepare, read_meta
    prepare("synthetic", tmp_path, progress=False, num_train=64, num_test=32)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    code = ("import sys; from raymoll.data import prepare\n"
            f"prepare('synthetic', {str(tmp_path)!r}, progress=False, num_train=64, num_test=32,"
            " image_size=48)\n")
    limited = subprocess.run([sys.executable, "-c",
                              "import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, "
                              "(150000, 150000)); exec(sys.argv[1])", code],
                             capture_output=True, text=True, timeout=120)
    assert limited.returncode != 0  # the new (larger) set did not fit
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()
            if not p.name.startswith(".")} == before
    assert read_meta(tmp_path)["counts"]["test"] == 32


def test_defect3_prepare_on_a_full_disk_fails_clearly(tmp_path):
    """A real full disk (a 2 MiB tmpfs): FFCV's worker dies; prepare exits 2, no hang."""
    from mounts import small_disk
    with small_disk(tmp_path / "disk", "2m") as disk:
        done = subprocess.run([sys.executable, "-m", "raymoll.cli", "prepare", "--dataset",
                               "synthetic", "--out", str(disk / "data")],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        assert not (disk / "data" / "meta.json").exists()
        assert [p.name for p in (disk / "data").iterdir()] == []  # no temporaries left


def test_defect3_prepare_interrupted_ends_promptly(tmp_path):
    """Ctrl-C (SIGINT to the prepare process) mid-write: exit 130, the writer's processes gone."""
    import signal
    import time
    import psutil
    code = ("import sys; from raymoll.cli import main; sys.exit(main(['prepare', '--dataset', "
            f"'synthetic', '--out', {str(tmp_path)!r}]))")
    process = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while not list(tmp_path.glob(".train.beton.tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    family = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=20) == 130
    assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not (tmp_path / "meta.json").exists()
