"""Shared pytest fixtures."""
import pytest


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
