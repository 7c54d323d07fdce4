"""Defect 1 of the hostile run: a run name continues its own run only; other settings are
refused before Ray starts, and --restart moves the old run aside."""
import json
from pathlib import Path

import pytest

from raymoll.cli import main
from raymoll.config import load_config
from raymoll.run_folder import SETTINGS_FILE, RunFolderError, claim_run_folder, defining_settings

CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "fashion_small.yaml"


def _cfg(tmp_path, *overrides):
    return load_config(CONFIG, [f"run.storage_path={tmp_path}", "run.name=x", *overrides])


def test_defect1_rerun_with_changed_settings_is_refused(tmp_path, fashion_mnist_dir):
    data = f"data.path={fashion_mnist_dir}"
    folder = Path(claim_run_folder(_cfg(tmp_path, data)))
    (folder / "checkpoint_2026-01-01_00-00-00.000000").mkdir()  # a run's work, to be kept
    recorded = json.loads((folder / SETTINGS_FILE).read_text())["settings"]
    assert recorded == defining_settings(_cfg(tmp_path, data))
    # Continuing with the same settings, or with ones that do not change the result, is allowed.
    claim_run_folder(_cfg(tmp_path, data, "run.num_to_keep=5", "data.num_workers=1"))
    with pytest.raises(RunFolderError, match=r"mollify\.enabled.*optim\.lr"):
        claim_run_folder(_cfg(tmp_path, data, "mollify.enabled=false", "optim.lr=0.5"))
    # The CLI refuses before Ray: exit 2, and the run folder is as it was.
    assert main(["train", "--config", str(CONFIG), data, f"run.storage_path={tmp_path}",
                 "run.name=x", "optim.lr=0.5"]) == 2
    assert json.loads((folder / SETTINGS_FILE).read_text())["settings"] == recorded
    assert (folder / "checkpoint_2026-01-01_00-00-00.000000").is_dir()


def test_defect1_restart_moves_the_old_run_aside(tmp_path, fashion_mnist_dir):
    data = f"data.path={fashion_mnist_dir}"
    old_cfg = _cfg(tmp_path, data)
    folder = Path(claim_run_folder(old_cfg))
    (folder / "checkpoint_2026-01-01_00-00-00.000000").mkdir()
    new = _cfg(tmp_path, data, "optim.lr=0.5")
    assert Path(claim_run_folder(new, restart=True)) == folder
    assert json.loads((folder / SETTINGS_FILE).read_text())["settings"] == defining_settings(new)
    assert not list(folder.glob("checkpoint_*"))  # a fresh run folder
    [old] = tmp_path.glob("x.replaced-*")  # the old run, whole
    assert (old / "checkpoint_2026-01-01_00-00-00.000000").is_dir()
    assert json.loads((old / SETTINGS_FILE).read_text())["settings"] == defining_settings(old_cfg)


def test_defect1_a_folder_not_made_by_train_is_not_continued(tmp_path, fashion_mnist_dir):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "tuner.pkl").write_bytes(b"")  # e.g. a tune search of that name
    with pytest.raises(RunFolderError, match="--restart"):
        claim_run_folder(_cfg(tmp_path, f"data.path={fashion_mnist_dir}"))
