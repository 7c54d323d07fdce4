"""The command line: bad input fails fast, with one clear paragraph, before Ray is imported."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "jobs" / "configs" / "fashion_small.yaml"


def run_cli(*args: str) -> tuple[int, str, list[str]]:
    """Run `raymoll ARGS` in a fresh interpreter; returns (exit code, stderr, heavy modules
    that got imported)."""
    code = ("import sys; from raymoll.cli import main; rc = main(sys.argv[1:]); "
            "print([m for m in ('ray', 'ffcv') if m in sys.modules]); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    return proc.returncode, proc.stderr, eval(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("verb", ["train", "tune"])
def test_bad_config_value_fails_before_ray(verb):
    rc, err, heavy = run_cli(verb, "--config", str(CONFIG), "mollify.sigma_min=-1")
    assert rc == 2 and heavy == []
    assert "mollify.sigma_min" in err and "-1" in err and "Traceback" not in err


def test_unknown_key_and_missing_config():
    rc, err, heavy = run_cli("train", "--config", str(CONFIG), "optim.learning_rate=0.1")
    assert rc == 2 and "optim.learning_rate" in err and heavy == []
    rc, err, _ = run_cli("train", "--config", "nope.yaml")
    assert rc == 2 and "nope.yaml" in err


@pytest.mark.parametrize("verb, config", [("train", CONFIG),
                                          ("tune", CONFIG.with_name("fashion_tune.yaml"))])
def test_missing_data_fails_before_ray(verb, config, tmp_path):
    rc, err, heavy = run_cli(verb, "--config", str(config), f"data.path={tmp_path / 'none'}")
    assert rc == 2 and "ray" not in heavy
    assert str(tmp_path / "none") in err
