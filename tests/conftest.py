"""Shared pytest fixtures."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The child exits 3 when Ray is initialised by the time the command returns.
_CLI = ("import sys; from raymoll.cli import main; rc = main(sys.argv[1:]); "
        "ray = sys.modules.get('ray'); sys.exit(3 if ray and ray.is_initialized() else rc)")


@pytest.fixture(scope="session")
def fashion_mnist_dir(tmp_path_factory):
    """Fashion-MNIST prepared once per test session (raw 32x32 .beton files + meta.json)."""
    from raymoll.data import prepare
    return prepare("fashion-mnist", tmp_path_factory.mktemp("data") / "fashion-mnist",
                   progress=False)


@pytest.fixture(scope="session")
def ray_local():
    """One embedded local Ray for the whole test session (each start costs ~10 s here).

    4 logical CPUs on 2 cores: lets 2-worker runs and concurrent Tune trials be scheduled.
    """
    import os

    import ray
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    os.environ.pop("RAY_ADDRESS", None)  # never attach to a developer's cluster by accident
    ray.init(num_cpus=4)
    yield ray
    ray.shutdown()


@pytest.fixture
def cli_without_ray():
    """Run `raymoll ARGS` in a fresh interpreter and return (exit code, stderr); exit code 3
    means the command started Ray. A fresh process, because the session's own Ray (ray_local)
    would hide a Ray that the command started."""
    def run(args: list[str]) -> tuple[int, str]:
        proc = subprocess.run([sys.executable, "-c", _CLI, *args], cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        return proc.returncode, proc.stderr
    return run
