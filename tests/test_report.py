import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from raymoll.corruptions import CORRUPTIONS, FAMILIES, VALIDATION_CORRUPTIONS
from raymoll.report import PLOTS, format_table, headline, report
from raymoll.results import ResultsError, read_results, run_settings, write_results

N_BINS = 15


def fake_rows(run, mollified, seed):
    """96 rows of one run with random but valid metrics and reliability bins."""
    rng = np.random.default_rng(seed)
    sets = [("clean", "clean", 0)] + [(name, FAMILIES[name], s)
                                      for name in CORRUPTIONS + VALIDATION_CORRUPTIONS
                                      for s in range(1, 6)]
    rows = []
    for name, family, severity in sets:
        count = rng.integers(0, 30, N_BINS)
        count[-1] += 1  # at least one sample
        confidence = np.where(count > 0, (np.arange(N_BINS) + rng.uniform(0, 1, N_BINS)) / N_BINS,
                              np.nan)
        acc = np.where(count > 0, rng.uniform(0, 1, N_BINS), np.nan)
        rows.append({"run": run, "checkpoint": f"/ckpt/{run}", "dataset": "synthetic",
                     "model": "smallcnn", "mollified": mollified, "corruption": name,
                     "family": family, "severity": severity, "n": int(count.sum()),
                     "accuracy": rng.uniform(0.2, 0.9), "nll": rng.uniform(0.3, 2.0),
                     "ece": rng.uniform(0.0, 0.2), "brier": rng.uniform(0.1, 0.9),
                     "bin_count": count.tolist(), "bin_confidence": confidence.tolist(),
                     "bin_accuracy": acc.tolist(), "temperature": 1.5 + seed,
                     "nll_ts": rng.uniform(0.3, 2.0), "ece_ts": rng.uniform(0.0, 0.2),
                     "brier_ts": rng.uniform(0.1, 0.9), "bin_count_ts": count[::-1].tolist(),
                     "bin_confidence_ts": confidence[::-1].tolist(),
                     "bin_accuracy_ts": acc[::-1].tolist()})
    return rows


@pytest.fixture
def two_runs(tmp_path):
    paths = []
    for seed, (run, mollified) in enumerate([("plain", False), ("mollified", True)]):
        paths.append(write_results(fake_rows(run, mollified, seed), {"seed": seed},
                                   tmp_path / f"{run}.parquet"))
    return paths


def test_results_files_are_plain_parquet_with_settings(two_runs):
    frame = pd.read_parquet(two_runs[0])
    assert frame.shape[0] == 96 and set(frame["run"]) == {"plain"}
    metadata = pq.read_schema(two_runs[1]).metadata
    assert json.loads(metadata[b"raymoll"]) == {"mollified": {"seed": 1}}
    table = read_results(two_runs)
    assert table.num_rows == 192
    assert run_settings(table) == {"plain": {"seed": 0}, "mollified": {"seed": 1}}


def test_read_results_rejects_what_is_not_a_results_table(tmp_path, two_runs):
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(ResultsError, match="not a Parquet file"):
        read_results([tmp_path / "junk.parquet"])
    pd.DataFrame({"run": ["x"], "accuracy": [0.5]}).to_parquet(tmp_path / "other.parquet")
    with pytest.raises(ResultsError, match="not a raymoll results table"):
        read_results([tmp_path / "other.parquet"])
    with pytest.raises(ResultsError, match="does not exist"):
        read_results([tmp_path / "missing.parquet"])
    with pytest.raises(ResultsError, match="--run"):
        read_results([two_runs[0], two_runs[0]])


def test_headline_is_the_mean_over_the_right_sets(two_runs):
    frame = pd.concat([pd.read_parquet(p) for p in two_runs])
    rows = {row["run"]: row for row in headline(read_results(two_runs))}
    for run, group in frame.groupby("run"):
        test = group[group["corruption"].isin(CORRUPTIONS)]
        assert len(test) == 75
        assert rows[run]["clean_accuracy"] == group[group["severity"] == 0]["accuracy"].item()
        assert rows[run]["corrupted_accuracy"] == pytest.approx(test["accuracy"].mean())
        assert rows[run]["corrupted_nll"] == pytest.approx(test["nll"].mean())
        assert rows[run]["corrupted_ece"] == pytest.approx(test["ece"].mean())
        assert rows[run]["corrupted_nll_ts"] == pytest.approx(test["nll_ts"].mean())
        assert rows[run]["corrupted_ece_ts"] == pytest.approx(test["ece_ts"].mean())
        assert rows[run]["clean_ece_ts"] == group[group["severity"] == 0]["ece_ts"].item()
        assert rows[run]["temperature"] == group["temperature"].iloc[0]
        validation = group[group["corruption"].isin(VALIDATION_CORRUPTIONS)]
        assert rows[run]["validation_accuracy"] == pytest.approx(validation["accuracy"].mean())
        blur = group[group["corruption"].isin(CORRUPTIONS[3:7])]
        assert rows[run]["blur_ece"] == pytest.approx(blur["ece"].mean())
        assert rows[run]["blur_ece_ts"] == pytest.approx(blur["ece_ts"].mean())
        assert rows[run]["noise_nll_ts"] == pytest.approx(
            group[group["corruption"].isin(CORRUPTIONS[:3])]["nll_ts"].mean())


def test_format_table_is_markdown_with_percentages():
    text = format_table([{"run": "a", "clean_accuracy": 0.91234, "clean_ece": 0.05}],
                        ["run", "clean_accuracy", "clean_ece"])
    lines = text.splitlines()
    assert lines[0] == "| run | clean acc | clean ECE |"
    assert lines[2] == "| a | 91.23% | 0.0500 |"


def test_report_writes_pngs_and_summary(tmp_path, two_runs):
    out = tmp_path / "report"
    summary = report([str(p) for p in two_runs], out)
    assert summary == out / "summary.md"
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    text = summary.read_text()
    frame = pd.concat([pd.read_parquet(p) for p in two_runs])
    for run, group in frame.groupby("run"):
        test = group[group["corruption"].isin(CORRUPTIONS)]
        assert f"| {run} |" in text
        assert f"{test['accuracy'].mean():.2%}" in text
        assert f"{group[group['severity'] == 0]['accuracy'].item():.2%}" in text
    assert all(name in text for name in PLOTS)
    assert not list(out.glob(".*tmp*"))


def test_report_refuses_a_bad_file_before_writing(tmp_path):
    (tmp_path / "bad.parquet").write_text("nope")
    with pytest.raises(ResultsError):
        report([str(tmp_path / "bad.parquet")], tmp_path / "report")
    assert not (tmp_path / "report").exists()


def test_report_shows_raw_and_scaled_side_by_side_and_draws_either_reliability(tmp_path,
                                                                              two_runs):
    raw = report([str(p) for p in two_runs], tmp_path / "raw").read_text()
    scaled_png = tmp_path / "ts" / "reliability.png"
    report([str(p) for p in two_runs], tmp_path / "ts", reliability="ts")
    frame = pd.concat([pd.read_parquet(p) for p in two_runs])
    for run, group in frame.groupby("run"):
        test = group[group["corruption"].isin(CORRUPTIONS)]
        line = next(line for line in raw.splitlines() if line.startswith(f"| {run} | smallcnn"))
        assert f"| {test['nll'].mean():.4f} | {test['nll_ts'].mean():.4f} |" in line
        assert f"| {test['ece'].mean():.4f} | {test['ece_ts'].mean():.4f} |" in line
    # The scaled bins differ from the raw ones (reversed above), so the drawings differ.
    assert scaled_png.read_bytes() != (tmp_path / "raw" / "reliability.png").read_bytes()
    with pytest.raises(ResultsError, match="reliability"):
        report([str(p) for p in two_runs], tmp_path / "bad", reliability="calibrated")
