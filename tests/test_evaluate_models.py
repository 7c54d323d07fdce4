"""`raymoll evaluate --model SPEC`: torchvision, timm and python: models on prepared data."""
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from raymoll.cli import main
from raymoll.data import load_split, prepare, read_meta
from raymoll.evaluation import evaluate
from raymoll.evaluation.external import ModelSpecError, input_normalizer, load_external
from raymoll.evaluation.scoring import SetScorer
from raymoll.metrics import negative_log_likelihood

SMALL = {"severities": [1], "subset": 4, "batch_size": 4, "device": "cpu"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare("synthetic", tmp_path_factory.mktemp("data"), num_train=20, num_test=8,
                   progress=False)


MODEL_FILE = '''
from torch import nn

def tiny(num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))

def seven():
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 7))
'''


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "models.py"
    path.write_text(MODEL_FILE)
    return path


@pytest.mark.parametrize("spec", ["torchvision:resnet18", "timm:test_resnet", "python"])
def test_any_model_is_scored_with_its_saved_weights(tmp_path, data_dir, model_file, spec):
    pytest.importorskip("timm") if spec.startswith("timm") else None
    spec = f"python:{model_file}:tiny" if spec == "python" else spec
    torch.manual_seed(1)
    weights = tmp_path / "w.pt"
    torch.save(load_external(spec, None, 10).state_dict(), weights)
    torch.set_num_threads(1)
    out = evaluate(None, data_dir, model=spec, weights=weights, input="unit",
                   out=tmp_path / "r.parquet", **SMALL)
    frame = pd.read_parquet(out)
    assert len(frame) == 1 + 19 and set(frame["run"]) == {spec} == set(frame["model"])
    assert json.loads(pq.read_schema(out).metadata[b"raymoll"])[spec]["input"] == "unit"
    model = load_external(spec, weights, 10)  # the saved weights, not a fresh initialisation
    images, labels = load_split(data_dir, "test", subset=4)
    with torch.no_grad():
        probs = model(input_normalizer("unit", read_meta(data_dir))(images)).softmax(1)
    clean = frame[frame["corruption"] == "clean"].iloc[0]
    assert clean["nll"] == pytest.approx(negative_log_likelihood(probs.double(), labels),
                                         rel=1e-4)


def test_wrong_class_count_fails_before_scoring(tmp_path, data_dir, model_file, monkeypatch):
    scored = []
    monkeypatch.setattr(SetScorer, "__call__", lambda *a, **k: scored.append(1))
    with pytest.raises(ModelSpecError, match=r"\(N, 10\)"):
        evaluate(None, data_dir, model=f"python:{model_file}:seven",
                 out=tmp_path / "r.parquet", **SMALL)
    assert not scored and not (tmp_path / "r.parquet").exists()


def test_random_bytes_as_weights_is_a_clear_error(tmp_path, data_dir, capsys):
    weights = tmp_path / "w.pt"
    weights.write_bytes(np.random.default_rng(0).bytes(2048))
    code = main(["evaluate", "--model", "torchvision:resnet18", "--weights", str(weights),
                 "--data", str(data_dir), "--out", str(tmp_path / "r.parquet")])
    assert code == 2 and "weights_only=True" in capsys.readouterr().err
    assert not (tmp_path / "r.parquet").exists()


def test_bad_specs_are_refused_before_any_model_is_built(tmp_path, data_dir):
    for spec in ("resnet18", "torchvision:no_such_net", f"python:{tmp_path}/none.py:f"):
        with pytest.raises(ModelSpecError):
            evaluate(None, data_dir, model=spec, out=tmp_path / "r.parquet", **SMALL)
