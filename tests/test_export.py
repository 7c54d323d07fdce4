"""`raymoll export robustbench`, read back the way RobustBench 1.1.1 reads its files
(robustbench.leaderboard.template / utils.list_available_models for the JSON,
robustbench.eval.corruptions_evaluation for the CSV). The package itself does not import here
(its model zoo needs geotorch and more), so its reading code is repeated literally below."""
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymoll.cli import main
from raymoll.corruptions import CORRUPTIONS
from raymoll.export import ExportError, export_robustbench
from raymoll.results import METADATA_KEY, SCHEMA, write_results
from test_report import fake_rows

# robustbench.data.CORRUPTIONS, in RobustBench's own order.
ROBUSTBENCH_CORRUPTIONS = ("shot_noise", "motion_blur", "snow", "pixelate", "gaussian_noise",
                           "defocus_blur", "brightness", "fog", "zoom_blur", "frost",
                           "glass_blur", "impulse_noise", "contrast", "jpeg_compression",
                           "elastic_transform")


def read_like_robustbench(folder):
    """(model-info dicts by file stem, results frame) as RobustBench's code reads them."""
    models = {}
    for model_path in folder.glob("*.json"):
        with open(model_path) as fp:
            model = json.load(fp)
        model["clean_acc"] = float(model["clean_acc"]) / 100
        model["corruptions_acc"] = float(model["corruptions_acc"]) / 100
        models[model_path.stem] = model
    existing = pd.read_csv(folder / "unaggregated_results.csv", header=[0, 1], index_col=0)
    existing.columns = existing.columns.set_levels([
        existing.columns.levels[0], existing.columns.levels[1].astype(int)])
    return models, existing


def expected(rows):
    clean = next(r["accuracy"] for r in rows if r["corruption"] == "clean")
    test = [r["accuracy"] for r in rows if r["corruption"] in CORRUPTIONS]
    assert len(test) == 75
    return clean, float(np.mean(test))


def test_export_reads_back_as_robustbench_reads_it(tmp_path):
    one = fake_rows("plain", False, 0)
    two = fake_rows("mollified", True, 1)
    first = write_results(one, {"corruptions": "generated", "subset": 0}, tmp_path / "a.parquet")
    second = write_results(two, {"corruptions": "/c", "subset": 500}, tmp_path / "b.parquet")
    assert main(["export", "robustbench", str(first), "--out", str(tmp_path / "out")]) == 0
    assert main(["export", "robustbench", str(second), "--out", str(tmp_path / "out"),
                 "--name", "Mollified_SmallCNN"]) == 0
    folder = tmp_path / "out" / "model_info" / "synthetic" / "corruptions"
    models, results = read_like_robustbench(folder)

    assert set(models) == {"plain", "Mollified_SmallCNN"}
    for key, rows in (("plain", one), ("Mollified_SmallCNN", two)):
        clean, corrupted = expected(rows)
        assert models[key]["clean_acc"] == pytest.approx(clean, abs=5e-5)
        assert models[key]["corruptions_acc"] == pytest.approx(corrupted, abs=5e-5)
        assert models[key]["dataset"] == "synthetic" and models[key]["architecture"] == "smallcnn"
        # corruptions_acc is the mean of the CSV row, as corruptions_evaluation computes it
        assert results.loc[key].values.mean() == pytest.approx(corrupted)
        for row in rows:
            if row["corruption"] in CORRUPTIONS:
                assert results.loc[key][(row["corruption"], row["severity"])] == \
                    pytest.approx(row["accuracy"])
    assert set(results.columns.levels[0]) == set(ROBUSTBENCH_CORRUPTIONS)
    assert list(results.columns.levels[1]) == [1, 2, 3, 4, 5]
    assert "generated" in models["plain"]["footnote"] and \
        "official" in models["Mollified_SmallCNN"]["footnote"]

    # Re-exporting a name replaces its row and keeps the other model's.
    assert main(["export", "robustbench", str(first), "--out", str(tmp_path / "out")]) == 0
    _, again = read_like_robustbench(folder)
    assert sorted(again.index) == ["Mollified_SmallCNN", "plain"]


def test_export_refuses_incomplete_or_ambiguous_tables(tmp_path):
    rows = fake_rows("plain", False, 0)
    partial = write_results([r for r in rows if r["severity"] in (0, 1, 2)], {},
                            tmp_path / "partial.parquet")
    with pytest.raises(ExportError, match="15 x 5"):
        export_robustbench(partial, tmp_path / "out")
    # A study table: several runs in one file.
    study = tmp_path / "study.parquet"
    table = pa.Table.from_pylist(rows + fake_rows("mollified", True, 1), schema=SCHEMA)
    pq.write_table(table.replace_schema_metadata(
        {METADATA_KEY: json.dumps({"plain": {}, "mollified": {}})}), study)
    with pytest.raises(ExportError, match="--run"):
        export_robustbench(study, tmp_path / "out")
    assert main(["export", "robustbench", str(study), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
    with pytest.raises(ExportError, match="no run"):
        export_robustbench(study, tmp_path / "out", run="other")
    json_path, _ = export_robustbench(study, tmp_path / "out", run="mollified")
    assert json.loads(json_path.read_text())["corruptions_acc"] == \
        str(round(expected(fake_rows("mollified", True, 1))[1] * 100, 2))
    with pytest.raises(ExportError, match="--name"):
        export_robustbench(study, tmp_path / "out", run="plain", name="../escape")
    assert not (tmp_path / "escape.json").exists()
