"""Benchmark: seconds to apply all 19 corruptions (severity 3) to the same 32x32 images,
raymoll.corruptions against the PyPI package `imagecorruptions` (target: >= 20x faster).

    PYTHONPATH=. .venv/bin/python jobs/bench/corruptions.py [--n 1000] [--threads 1]

The images are the first --n Fashion-MNIST test images, padded to 32x32 and repeated to RGB.
The reference runs in its own virtual environment, .venv-bench/ in the repository root (made
on first use, ignored by git), because it needs setuptools < 82 and shims for NumPy 2 and
current scikit-image. It is single-threaded, so raymoll runs with --threads 1 by default.
"""
import argparse
import gzip
import json
import statistics
import subprocess
import tempfile
import time
import venv
from pathlib import Path

import numpy as np
import torch

from common import report_result
from raymoll.corruptions import CORRUPTIONS, VALIDATION_CORRUPTIONS, corrupt

REPO = Path(__file__).resolve().parents[2]
BENCH_VENV = REPO / ".venv-bench"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
TARGET = 20.0
REPEATS = 3  # timed calls of each raymoll corruption (the reference runs once: ~20 s)
NAMES = CORRUPTIONS + VALIDATION_CORRUPTIONS

# Runs inside .venv-bench: argv = images.npy, comma-separated names; prints {name: seconds}.
REFERENCE_SCRIPT = r"""
import json, sys, time
import numpy as np
np.float_ = np.float64  # removed in NumPy 2; imagecorruptions' fog still uses it
import skimage.filters
_gaussian = skimage.filters.gaussian
def gaussian(image, sigma=1, *args, multichannel=None, **kwargs):
    # scikit-image removed `multichannel`; channel_axis=-1 is what it meant.
    if multichannel:
        kwargs["channel_axis"] = -1
    return _gaussian(image, sigma, *args, **kwargs)
skimage.filters.gaussian = gaussian
from imagecorruptions import corrupt
images = np.load(sys.argv[1])
np.random.seed(0)
seconds = {}
for name in sys.argv[2].split(","):
    start = time.perf_counter()
    for image in images:
        corrupt(image, corruption_name=name, severity=3)
    seconds[name] = time.perf_counter() - start
print(json.dumps(seconds))
"""


def fashion_mnist_32(n: int) -> np.ndarray:
    """The first n Fashion-MNIST test images as uint8 (n, 32, 32, 3)."""
    with gzip.open(FASHION_MNIST) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    return np.repeat(np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None], 3, axis=3)


def reference_python() -> Path:
    """The interpreter of .venv-bench, created with imagecorruptions on first use."""
    python = BENCH_VENV / "bin" / "python"
    if not python.exists():
        venv.create(BENCH_VENV, with_pip=True)
        (BENCH_VENV / ".gitignore").write_text("*\n")
        subprocess.run([str(python), "-m", "pip", "install", "-q", "imagecorruptions",
                        "setuptools<82"], check=True)
    return python


def time_reference(images: np.ndarray) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "images.npy"
        np.save(path, images)
        result = subprocess.run([str(reference_python()), "-c", REFERENCE_SCRIPT, str(path),
                                 ",".join(NAMES)], check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def time_raymoll(images: np.ndarray) -> dict[str, float]:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    for name in NAMES:  # warm-up: loads the frost photos once, as a long evaluation would
        corrupt(x[:8], name, 3, torch.Generator().manual_seed(0))
    seconds = {}
    for name in NAMES:  # median of 3: an evaluation corrupts set after set in one process
        times = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            corrupt(x, name, 3, torch.Generator().manual_seed(0))
            times.append(time.perf_counter() - start)
        seconds[name] = statistics.median(times)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000,
                        help="number of images (both sides use the same ones)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for raymoll")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images = fashion_mnist_32(args.n)
    ours = time_raymoll(images)
    reference = time_reference(images)
    print(f"{args.n} Fashion-MNIST images 32x32, severity 3, raymoll on {args.threads} thread(s)")
    print(f"{'corruption':<18} {'raymoll s':>10} {'reference s':>12} {'ratio':>8}")
    for name in NAMES:
        print(f"{name:<18} {ours[name]:>10.3f} {reference[name]:>12.2f} "
              f"{reference[name] / ours[name]:>7.1f}x")
    total_ours, total_reference = sum(ours.values()), sum(reference.values())
    ratio = total_reference / total_ours
    passed = ratio >= TARGET
    print(f"{'all 19':<18} {total_ours:>10.3f} {total_reference:>12.2f} {ratio:>7.1f}x")
    print(f"target: >= {TARGET:.0f}x; {'met' if passed else 'NOT met'}")
    report_result("corruptions", f"imagecorruptions / raymoll.corruptions, seconds for all 19 at "
                  f"severity 3, {args.n} images", ratio, "x", f">= {TARGET:.0f}", passed, "cpu",
                  f"raymoll {total_ours:.2f} s on {args.threads} thread(s), reference "
                  f"{total_reference:.1f} s")


if __name__ == "__main__":
    main()
