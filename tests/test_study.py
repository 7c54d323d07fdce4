"""Studies: the grid and its checks (no Ray), the statistics against direct computations, and,
marked `ray`, the small study end to end on a real local Ray, interrupted and resumed."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from raymoll.cli import main
from raymoll.config import MollifyConfig, load_config, to_dict
from raymoll.study import StudyError, cell_config, expand
from raymoll.study.cells import label
from raymoll.study.report import bootstrap_ci, mean_std, paired_differences

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "jobs" / "configs"


AXES = {"data.augment": [["fcr"], ["fcr", "trivialaugment"]],
        "method": ["plain", "label_smoothing", "mollified"]}


def study(**section):
    return load_config(None, [f"study={json.dumps({'axes': AXES, 'seeds': [0, 1]} | section)}"])


# --- the grid -------------------------------------------------------------------------------


def check_cells(cfg, smoothing):
    cells = expand(cfg)
    axes = cfg.study.axes
    assert len(cells) == len(axes["data.augment"]) * len(axes["method"]) * len(cfg.study.seeds)
    assert len({c.name for c in cells}) == len(cells)
    combos = {(label(c.values["data.augment"]), c.values["method"], c.seed) for c in cells}
    assert len(combos) == len(cells)
    for cell in cells:
        run = cell_config(cfg, cell)
        assert run.run.seed == cell.seed
        assert label(run.data.augment) == label(cell.values["data.augment"])
        method = cell.values["method"]
        assert run.mollify.enabled == (method == "mollified")
        assert run.optim.label_smoothing == (smoothing if method == "label_smoothing" else 0.0)
        if method == "mollified":
            assert to_dict(run.mollify) == to_dict(MollifyConfig())
        # everything else is the base config's
        assert run.optim.epochs == cfg.optim.epochs and run.model == cfg.model


def test_cells_are_the_product_of_axes_and_seeds_with_the_method_presets():
    check_cells(study(seeds=[0, 1, 5], label_smoothing=0.2), 0.2)


def test_tuned_method_takes_the_mollify_section_of_a_best_yaml(tmp_path):
    best = to_dict(load_config(None, ["mollify.t_beta=4.5", "mollify.p_clean=0.5",
                                      "mollify.p_noise=0.25", "mollify.p_blur=0.25",
                                      "mollify.enabled=false", "optim.lr=0.3"]))
    (tmp_path / "best.yaml").write_text(yaml.safe_dump(best))
    cfg = study(axes={"method": ["plain", f"tuned:{tmp_path / 'best.yaml'}"]}, seeds=[3])
    tuned = cell_config(cfg, expand(cfg)[1])
    assert tuned.mollify.enabled and tuned.mollify.t_beta == 4.5 and tuned.mollify.p_clean == 0.5
    assert tuned.optim.lr == cfg.optim.lr  # only the mollify section is taken


def test_named_axis_sets_several_keys():
    cfg = load_config(CONFIGS / "study_cifar10.yaml")
    cells = expand(cfg)
    assert len(cells) == 7 * 3 * 3
    mixup = [cell_config(cfg, c) for c in cells if c.values["augmentation"]["name"] == "fcr+mixup"]
    assert len(mixup) == 9 and all(c.data.mixup_alpha == 1.0 for c in mixup)
    assert all(c.data.augment == ["fcr"] for c in mixup)


BAD = [
    ({"axes": {"data.augmnt": [["fcr"]], "method": ["plain"]}},
     "'data.augmnt' is not a config key"),
    ({"axes": {"lr": [0.1], "method": ["plain"]}}, "is not a preset"),
    ({"axes": {"run.seed": [1, 2], "method": ["plain"]}}, "set by the study itself"),
    ({"axes": {"data.augment": [], "method": ["plain"]}}, "must be a non-empty list"),
    ({"axes": {"method": []}}, "must be a non-empty list"),
    ({"axes": {"data.augment": [["fcr"]]}}, "no `method` axis"),
    ({"axes": {"model.name": ["smallcnn", "vgg"], "method": ["plain"]}},
     "'model.name' = 'vgg' is not allowed"),
    ({"axes": {"optim.lr": [-1.0], "method": ["plain"]}}, "'optim.lr' = -1.0 is out of range"),
    ({"axes": {"method": ["plain", "smoothed"]}}, "'smoothed' is not a method"),
    ({"axes": {"method": ["plain", "tuned:/nonexistent/best.yaml"]}}, "does not exist"),
    ({"axes": {"method": ["plain", "plain"]}}, "repeats a value"),
    ({"seeds": [0, 1, 0]}, "repeats a seed"),
    ({"seeds": []}, "non-empty list of integers"),
    ({"seeds": [0, -1]}, "non-empty list of integers"),
    ({"reference": "label-smoothing"}, "is not among the methods"),
]


@pytest.mark.parametrize("section, message", BAD, ids=[m for _, m in BAD])
def test_bad_studies_are_rejected(section, message):
    with pytest.raises(StudyError) as err:
        expand(study(**section))
    assert message in str(err.value)


def test_cli_rejects_a_bad_study_before_ray(tmp_path, cli_without_ray):
    config = tmp_path / "bad.yaml"
    config.write_text(f"extends: {CONFIGS / 'study_fashion.yaml'}\nstudy:\n  seeds: [1, 1]\n"
                      f"run:\n  storage_path: {tmp_path / 'runs'}\n")
    code, err = cli_without_ray(["study", "--config", str(config)])
    assert code == 2 and "repeats a seed" in err, err
    assert not (tmp_path / "runs").exists()


# --- statistics -----------------------------------------------------------------------------


def plain_paired_bootstrap(a, b, resamples, seed):
    """The percentile bootstrap of mean(a - b) over seeds, written out (the definition)."""
    rng = np.random.default_rng(seed)
    k = len(a)
    means = []
    for _ in range(resamples):
        picked = rng.integers(0, k, size=k)
        means.append(sum(a[i] - b[i] for i in picked) / k)
    return np.percentile(means, 2.5), np.percentile(means, 97.5)


def test_bootstrap_ci_equals_a_plain_paired_bootstrap():
    method = [0.71, 0.65, 0.74, 0.69, 0.80]
    reference = [0.70, 0.61, 0.69, 0.70, 0.72]
    d = np.subtract(method, reference)
    low, high = bootstrap_ci(d, 2000, seed=7)
    assert (low, high) == pytest.approx(plain_paired_bootstrap(method, reference, 2000, 7),
                                        abs=1e-12)
    assert low < d.mean() < high


def runs_frame():
    rng = np.random.default_rng(0)
    rows = []
    for aug in ("fcr", "fcr+augmix"):
        for method in ("plain", "mollified"):
            for seed in (0, 1, 2):
                rows.append({"data.augment": aug, "method": method, "seed": seed,
                             "corrupted_accuracy": rng.uniform(0.5, 0.9),
                             "corrupted_ece": rng.uniform(0.0, 0.2)})
    return pd.DataFrame(rows).sample(frac=1.0, random_state=1)  # pairing must not use order


def test_mean_std_over_seeds_equals_numpy():
    runs = runs_frame()
    cells = mean_std(runs, ["method", "data.augment"]).set_index(["method", "data.augment"])
    assert len(cells) == 4
    for (method, aug), row in cells.iterrows():
        values = runs[(runs["method"] == method) & (runs["data.augment"] == aug)]
        for m in ("corrupted_accuracy", "corrupted_ece"):
            assert row[f"{m}_mean"] == pytest.approx(np.mean(values[m]), abs=1e-12)
            assert row[f"{m}_std"] == pytest.approx(np.std(values[m], ddof=1), abs=1e-12)
        assert row["seeds"] == 3


def test_paired_differences_pair_by_seed_and_other_axes():
    runs = runs_frame()
    diffs = paired_differences(runs, ["method", "data.augment"], "plain", 1000)
    assert set(diffs["method"]) == {"mollified"} and len(diffs) == 2
    for _, row in diffs.iterrows():
        pick = lambda method: runs[(runs["method"] == method) & (
            runs["data.augment"] == row["data.augment"])].sort_values("seed")
        a, b = pick("mollified"), pick("plain")
        for m in ("corrupted_accuracy", "corrupted_ece"):
            d = a[m].to_numpy() - b[m].to_numpy()
            assert row[f"{m}_diff"] == pytest.approx(d.mean(), abs=1e-12)
            assert (row[f"{m}_low"], row[f"{m}_high"]) == pytest.approx(
                plain_paired_bootstrap(a[m].to_numpy(), b[m].to_numpy(), 1000, 0), abs=1e-12)
        assert row["pairs"] == 3


# --- the small study on a real local Ray ------------------------------------------------------


def small_study_overrides(data, storage):
    """study_fashion.yaml cut to 4 cells (plain, mollified x seeds 0, 1), tiny sizes, one
    worker per cell (DDP is test_train's; each worker costs ~10 s of imports)."""
    return [f"data.path={data}", f"run.storage_path={storage}", "data.train_subset=512",
            "study.axes={method: [plain, mollified]}",
            "study.eval_subset=50", "eval.val_subset=128", "model.width=8", "optim.epochs=1",
            "run.num_workers=1", "run.cpus_per_worker=0.5", "tune.trial_cpus=0.5"]


# The job script `jobs/study.py ARGS`, SIGKILLed by itself the moment it has written its first
# cell's evaluation. A kill from outside on seeing that file races the others: the cells'
# evaluation tasks finish together, and the driver writes their files within milliseconds.
_STUDY_KILLED_AFTER_FIRST_EVALUATION = """
import os, runpy, signal, sys
import raymoll.study.run as run
write = run.atomic_write
def write_then_die(*args, **kwargs):
    write(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
run.atomic_write = write_then_die
runpy.run_path(sys.argv.pop(1), run_name="__main__")
"""


@pytest.fixture(scope="module")
def interrupted_study(ray_local, fashion_mnist_dir, tmp_path_factory):
    """The small study driven by a subprocess attached to the session's Ray, killed (SIGKILL)
    right after the first cell's evaluation is written, then resumed here."""
    from raymoll.study import run_study
    storage = tmp_path_factory.mktemp("study")
    overrides = small_study_overrides(fashion_mnist_dir, storage)
    cfg = load_config(CONFIGS / "study_fashion.yaml", overrides)
    path = storage / cfg.run.name
    env = os.environ | {"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
                        "RAY_AUTH_MODE": "token", "PYTHONPATH": str(ROOT)}
    with (storage / "driver.log").open("w") as log:
        driver = subprocess.run([sys.executable, "-c", _STUDY_KILLED_AFTER_FIRST_EVALUATION,
                                 str(ROOT / "jobs" / "study.py"), "--config",
                                 str(CONFIGS / "study_fashion.yaml"), *overrides],
                                env=env, stdout=log, stderr=subprocess.STDOUT, timeout=600)
    assert driver.returncode == -signal.SIGKILL, (storage / "driver.log").read_text()[-3000:]
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes())
              for p in path.glob("evaluations/*.parquet")}
    checkpoints = {str(p): p.stat().st_mtime_ns for p in path.glob("train-*/checkpoint_*")}
    result = run_study(cfg, resume=True)
    return cfg, path, before, checkpoints, result


@pytest.mark.ray
def test_small_study_runs_to_the_end_with_every_cell_and_set(interrupted_study):
    cfg, path, _, _, result = interrupted_study
    cells = expand(cfg)
    assert result.finished
    table = pd.read_parquet(result.study)
    assert len(table) == len(cells) * 96
    assert set(table["method"]) == {"plain", "mollified"}
    assert set(table["seed"]) == {0, 1}
    per_cell = table.groupby(["method", "seed"])["run"].agg(["nunique", "size"])
    assert (per_cell["nunique"] == 1).all() and (per_cell["size"] == 96).all()
    assert (table.loc[table["method"] == "mollified", "mollified"]).all()
    assert not (table.loc[table["method"] == "plain", "mollified"]).any()
    listed = pd.read_parquet(result.cells)
    assert set(listed["status"]) == {"evaluated"} and len(listed) == len(cells)
    assert (listed["training_s"] > 0).all()
    # each evaluated checkpoint is the one its row names, and it is a checkpoint of that cell
    for _, row in listed.iterrows():
        assert (Path(row["checkpoint"]) / "checkpoint.pt").is_file()
        assert set(table.loc[table["run"] == row["cell"], "checkpoint"]) == {
            str(Path(row["checkpoint"]).resolve())}
    summary = Path(result.report).read_text()
    assert "mollified" in summary and (path / "report" / "study.png").stat().st_size > 10_000


@pytest.mark.ray
def test_resume_neither_retrains_nor_reevaluates_finished_cells(interrupted_study):
    cfg, path, before, checkpoints, result = interrupted_study
    assert len(before) == 1 < len(expand(cfg))  # the driver died after its first write
    for name, (mtime, data) in before.items():
        file = path / "evaluations" / name
        assert file.stat().st_mtime_ns == mtime and file.read_bytes() == data
    assert {str(p): p.stat().st_mtime_ns for p in path.glob("train-*/checkpoint_*")} == checkpoints
    timing = json.loads((path / "timing.json").read_text())
    assert timing["cells_trained_now"] == 0
    assert timing["cells_evaluated_now"] == len(expand(cfg)) - len(before)


@pytest.mark.ray
def test_report_cli_detects_a_study(interrupted_study, tmp_path):
    _, _, _, _, result = interrupted_study
    assert main(["report", result.study, "--out", str(tmp_path)]) == 0
    text = (tmp_path / "summary.md").read_text()
    runs = pq.read_table(result.study).num_rows // 96
    assert "Paired differences vs `plain`" in text and f"{runs} runs" in text
