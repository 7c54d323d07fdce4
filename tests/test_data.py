"""raymoll.data: sources -> .beton -> loader round trips, sharding, augmentation, bad input."""
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

from torchvision.transforms import v2

from raymoll.data import (AUGMENTS, BatchAugment, BatchMix, DataError, batch_mix,
                          flip_crop_rotate, load_source, load_split, make_loader, prepare,
                          read_meta)
from raymoll.data.sources import stratified_indices
from raymoll.errors import RaymollError

FASHION = Path("/usr/share/datasets/fashion-mnist")
REPO = Path(__file__).resolve().parents[1]


def _idx(name: str, offset: int) -> np.ndarray:
    with gzip.open(FASHION / name) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def _epoch(loader) -> tuple[torch.Tensor, torch.Tensor]:
    """All batches of one epoch, copied out of FFCV's reused buffers."""
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in loader])
    return torch.cat(xs), torch.cat(ys)


@pytest.fixture(scope="module")
def indexed_dir(tmp_path_factory):
    """Synthetic data whose label is the sample index (one class per sample); 6 of the 56
    training samples go to val.beton, 50 stay in train.beton."""
    return prepare("synthetic", tmp_path_factory.mktemp("indexed"), num_train=56, num_test=30,
                   num_classes=56, progress=False)


def _train_source_indices(meta: dict, source_count: int) -> np.ndarray:
    """The source indices train.beton holds: all but the validation split's, in order."""
    return np.setdiff1d(np.arange(source_count), meta["val"]["source_indices"])


def test_fashion_mnist_matches_idx_files(fashion_mnist_dir):
    meta = read_meta(fashion_mnist_dir)
    assert meta["counts"] == {"train": 54000, "val": 6000, "test": 10000}
    assert meta["num_classes"] == 10 and meta["image_size"] == [32, 32]
    assert (meta["val"]["fraction"], meta["val"]["seed"]) == (0.1, 0)
    val_indices = np.array(meta["val"]["source_indices"])
    where = {"train": _train_source_indices(meta, 60000), "val": val_indices,
             "test": np.arange(10000)}
    for split, prefix in (("train", "train"), ("val", "train"), ("test", "t10k")):
        images, labels = load_split(fashion_mnist_dir, split)
        grey = torch.tensor(_idx(f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28))
        grey = grey[where[split]]
        expected = torch.zeros(len(grey), 3, 32, 32, dtype=torch.uint8)
        expected[:, :, 2:30, 2:30] = grey[:, None]
        assert images.shape == expected.shape and images.dtype == torch.uint8
        assert torch.equal(images, expected)
        source_labels = torch.tensor(_idx(f"{prefix}-labels-idx1-ubyte.gz", 8)).long()
        assert torch.equal(labels, source_labels[where[split]])
        assert torch.bincount(labels).tolist() == [len(labels) // 10] * 10  # 6000 per class
    # mean/std in [0, 255] units over every pixel of train.beton (the 3 channels are equal)
    pixels = torch.tensor(_idx("train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28))
    padded = F.pad(pixels[where["train"]], (2, 2, 2, 2)).double()
    np.testing.assert_allclose(meta["mean"], [padded.mean().item()] * 3, rtol=1e-9)
    np.testing.assert_allclose(meta["std"], [padded.std(unbiased=False).item()] * 3, rtol=1e-9)


def test_synthetic_round_trips_exactly(tmp_path):
    kwargs = dict(num_train=120, num_test=40, num_classes=4, image_size=24, seed=3)
    prepare("synthetic", tmp_path, progress=False, **kwargs)
    source = load_source("synthetic", **kwargs)
    meta = read_meta(tmp_path)
    where = {"train": _train_source_indices(meta, 120), "val": meta["val"]["source_indices"],
             "test": range(40)}
    for split in ("train", "val", "test"):
        images, labels = load_split(tmp_path, split)
        origin = source.test if split == "test" else source.train
        reference = [origin[int(i)] for i in where[split]]
        expected = torch.from_numpy(np.stack([image for image, _ in reference]))
        assert torch.equal(images, expected.permute(0, 3, 1, 2))
        assert labels.tolist() == [label for _, label in reference]


def test_loader_orders_batches_and_subsets(indexed_dir):
    threads = torch.get_num_threads()
    train = make_loader(indexed_dir, "train", 8, "cpu", train=True, seed=1)
    assert torch.get_num_threads() == threads
    x, y = _epoch(train)
    assert x.dtype == torch.float32 and x.shape == (48, 3, 32, 32)  # 50, drop_last: 6 batches
    assert len(set(y.tolist())) == 48 and y.tolist() != sorted(y.tolist())
    assert torch.equal(y, _epoch(make_loader(indexed_dir, "train", 8, "cpu", train=True,
                                             seed=1))[1])
    assert not torch.equal(y, _epoch(make_loader(indexed_dir, "train", 8, "cpu", train=True,
                                                 seed=2))[1])
    x, y = _epoch(make_loader(indexed_dir, "test", 8, "cpu", train=False, subset=13,
                              normalize=False))
    assert x.dtype == torch.uint8 and y.tolist() == list(range(13))


def _shard_worker(rank: int, data_dir: str, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        for train in (True, False):  # random and sequential order
            loader = make_loader(data_dir, "train", 5, "cpu", train=train, drop_last=False)
            np.save(f"{out}/rank{rank}-{train}.npy", _epoch(loader)[1].numpy())
    finally:
        dist.destroy_process_group()


def test_two_ranks_get_disjoint_shards(indexed_dir, tmp_path):
    port = 29500 + os.getpid() % 1000
    mp.spawn(_shard_worker, args=(str(indexed_dir), port, str(tmp_path)), nprocs=2)
    for train in (True, False):
        shards = [set(np.load(tmp_path / f"rank{r}-{train}.npy").tolist()) for r in range(2)]
        assert len(shards[0]) == len(shards[1]) == 25
        in_train = set(_train_source_indices(read_meta(indexed_dir), 56).tolist())
        assert not shards[0] & shards[1] and shards[0] | shards[1] == in_train


def _shifted_flips(image: torch.Tensor, pad: int) -> list[torch.Tensor]:
    """Every flip + pad-and-crop of `image`: the candidates of fcr without rotation."""
    h, w = image.shape[-2:]
    out = []
    for flipped in (image, image.flip(-1)):
        padded = F.pad(flipped, (pad,) * 4)
        out += [padded[:, dy:dy + h, dx:dx + w] for dy in range(2 * pad + 1)
                for dx in range(2 * pad + 1)]
    return out


def test_fcr_without_rotation_is_a_flip_and_crop():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 12, 12), dtype=torch.uint8)
    candidates = torch.stack(_shifted_flips(image, 4))
    out = flip_crop_rotate(image.expand(64, -1, -1, -1), max_degrees=0.0)
    matches = [(candidates == o).flatten(1).all(1).nonzero().flatten().tolist() for o in out]
    assert all(matches)  # each output is one candidate exactly
    assert len({m[0] for m in matches}) > 10  # and they are drawn per sample


@pytest.mark.parametrize("name", [a for a in AUGMENTS if a != "none"])
def test_augmentation_differs_per_sample(name):
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    batch = image.expand(16, -1, -1, -1).contiguous()
    out = BatchAugment(name)(batch)
    assert out.shape == batch.shape and out.dtype == batch.dtype and out.device == batch.device
    assert len({o.numpy().tobytes() for o in out}) > 4


def test_fcr_keeps_float_and_policies_refuse_float():
    x = torch.rand(4, 3, 16, 16)
    assert BatchAugment("fcr")(x).dtype == torch.float32
    assert BatchAugment("none")(x) is x
    with pytest.raises(ValueError, match="needs uint8"):
        BatchAugment("randaugment")(x)
    with pytest.raises(ValueError, match="choose one of"):
        BatchAugment("cutout")


def test_batch_mix_gives_soft_labels():
    assert batch_mix(10) is None
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8) % 10
    for mix in (batch_mix(10, mixup_alpha=1.0), batch_mix(10, cutmix_alpha=1.0),
                BatchMix(10, 1.0, 1.0)):
        mixed, soft = mix(x.clone(), y)
        assert mixed.shape == x.shape and soft.shape == (8, 10)
        torch.testing.assert_close(soft.sum(1), torch.ones(8))


@pytest.mark.parametrize("mixup_alpha, cutmix_alpha, reference",
                         [(0.4, 0.0, v2.MixUp), (0.0, 1.0, v2.CutMix)])
def test_batch_mix_is_torchvisions_at_the_same_draws(mixup_alpha, cutmix_alpha, reference):
    x, y = torch.rand(6, 3, 20, 16), torch.tensor([0, 1, 2, 3, 4, 2])
    mix = BatchMix(5, mixup_alpha, cutmix_alpha, torch.Generator().manual_seed(0))
    tv = reference(alpha=max(mixup_alpha, cutmix_alpha), num_classes=5)
    for _ in range(5):
        params = mix.sample(20, 16)
        ours = mix.apply(x.clone(), y, params)
        theirs = [tv.transform(inpt, {"labels": y, "batch_size": 6, **params})
                  for inpt in (x.clone(), y)]
        torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=0)
        torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=0)


def test_batch_mix_draws_follow_its_generator():
    draws = lambda seed: [BatchMix(5, 0.0, 1.0, torch.Generator().manual_seed(seed)).sample(8, 8)
                          for _ in range(3)]
    assert draws(1) == draws(1) and draws(1) != draws(2)
    mix = BatchMix(5, 0.5, 0.0, torch.Generator().manual_seed(0))
    lams = np.array([mix.sample(8, 8)["lam"] for _ in range(4000)])
    assert abs(lams.mean() - 0.5) < 0.02 and abs(lams.var() - 0.125) < 0.01  # Beta(.5, .5)


def test_augment_inside_the_loader(indexed_dir):
    x, y = _epoch(make_loader(indexed_dir, "test", 10, "cpu", train=False, normalize=False,
                              augment=BatchAugment("trivialaugment")))
    assert x.shape == (30, 3, 32, 32) and x.dtype == torch.uint8 and y.tolist() == list(range(30))


def test_validation_split_is_stratified_disjoint_and_seeded():
    rng = np.random.default_rng(0)
    labels = rng.choice(7, size=1003, p=[0.4, 0.2, 0.15, 0.1, 0.1, 0.04, 0.01])
    held_out, rest = stratified_indices(labels, 0.15, seed=3)
    assert not set(held_out.tolist()) & set(rest.tolist())
    assert sorted(held_out.tolist() + rest.tolist()) == list(range(len(labels)))
    assert len(held_out) == round(0.15 * len(labels))
    for c in range(7):  # within one image of the class's share
        assert abs((labels[held_out] == c).sum() - 0.15 * (labels == c).sum()) < 1
    again, _ = stratified_indices(labels, 0.15, seed=3)
    other, _ = stratified_indices(labels, 0.15, seed=4)
    assert np.array_equal(held_out, again) and not np.array_equal(held_out, other)


def test_prepare_val_split_follows_its_seed(tmp_path):
    kwargs = dict(num_train=200, num_test=20, num_classes=4, image_size=8, progress=False)
    chosen = {}
    for name, seed, fraction in (("a", 5, 0.2), ("b", 5, 0.2), ("c", 6, 0.2), ("d", 5, 0.3)):
        meta = read_meta(prepare("synthetic", tmp_path / name, val_seed=seed,
                                 val_fraction=fraction, **kwargs))
        assert (meta["val"]["seed"], meta["val"]["fraction"]) == (seed, fraction)
        assert meta["counts"]["val"] == round(fraction * 200) == len(meta["val"]["source_indices"])
        assert meta["counts"]["train"] == 200 - meta["counts"]["val"]
        _, labels = load_split(tmp_path / name, "val")
        assert torch.bincount(labels).tolist() == [meta["counts"]["val"] // 4] * 4
        chosen[name] = meta["val"]["source_indices"]
    assert chosen["a"] == chosen["b"] and chosen["a"] != chosen["c"]


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.fixture()
def damaged(indexed_dir, tmp_path):
    """A fresh copy of a prepared folder that a test may break."""
    return Path(shutil.copytree(indexed_dir, tmp_path / "copy"))


def test_truncated_beton(damaged):
    path = damaged / "train.beton"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated"):
        read_meta(damaged)


@pytest.mark.parametrize("content", [b"", b"hello", bytes(range(256)) * 100])
def test_not_a_beton(damaged, content):
    (damaged / "test.beton").write_bytes(content)
    with pytest.raises(DataError, match="not a readable FFCV .beton"):
        make_loader(damaged, "test", 4, "cpu", train=False)


def test_changed_beton_does_not_match_meta(damaged):
    path = damaged / "train.beton"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, still a structurally valid .beton
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="content hash"):
        read_meta(damaged)
    shutil.copy(damaged / "test.beton", path)  # a whole .beton of another split
    with pytest.raises(DataError, match="meta.json records"):
        read_meta(damaged)


def test_missing_folder_and_files(damaged, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_meta(tmp_path / "nowhere")
    (damaged / "test.beton").unlink()
    with pytest.raises(DataError, match="test.beton is missing"):
        read_meta(damaged)
    (damaged / "meta.json").unlink()
    with pytest.raises(DataError, match="no meta.json"):
        read_meta(damaged)


def test_non_square_rejected(damaged, tmp_path):
    with pytest.raises(DataError, match="square"):
        prepare("synthetic", tmp_path / "wide", image_size=(16, 24), progress=False)
    assert not (tmp_path / "wide").exists()
    meta = damaged / "meta.json"
    meta.write_text(meta.read_text().replace('"image_size": [\n  32,\n  32\n ]',
                                             '"image_size": [32, 24]'))
    with pytest.raises(DataError, match="24x32 images"):
        read_meta(damaged)


def test_folder_without_val_split_names_the_fix(damaged):
    """A folder prepared before the validation split existed."""
    meta_path = damaged / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["val"], meta["counts"]["val"], meta["files"]["val"]
    meta_path.write_text(json.dumps(meta))
    (damaged / "val.beton").unlink()
    with pytest.raises(RaymollError, match="raymoll prepare --dataset synthetic --out"):
        read_meta(damaged)
    with pytest.raises(RaymollError, match="raymoll prepare --dataset synthetic --out"):
        make_loader(damaged, "train", 4, "cpu", train=True)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 0.001])
def test_bad_val_fraction(tmp_path, fraction):
    with pytest.raises(DataError, match="val_fraction"):
        prepare("synthetic", tmp_path / "out", num_train=100, val_fraction=fraction,
                progress=False)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_unknown_dataset_and_missing_root(tmp_path):
    with pytest.raises(DataError, match="choose one of cifar10, cifar100, tinyimagenet"):
        prepare("mnist", tmp_path / "a", progress=False)
    with pytest.raises(DataError, match="pass --root pointing at the tiny-imagenet-200"):
        prepare("tinyimagenet", tmp_path / "b", root=tmp_path, progress=False)
    with pytest.raises(DataError, match="imagefolder needs --root"):
        prepare("imagefolder", tmp_path / "c", progress=False)
    assert not any((tmp_path / name).exists() for name in "abc")


def test_failed_prepare_keeps_the_finished_set(damaged, tmp_path):
    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for k in range(2):
            (root / split / f"c{k}").mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(
                    root / split / f"c{k}" / f"{i}.png")
    (root / "train" / "c1" / "broken.png").write_bytes(b"not an image")
    before = {p.name: p.read_bytes() for p in damaged.iterdir()}
    with pytest.raises(DataError, match="broken.png"):
        prepare("imagefolder", damaged, root=root, image_size=32, progress=False)
    assert {p.name: p.read_bytes() for p in damaged.iterdir()} == before
    read_meta(damaged)


def test_killed_prepare_leaves_nothing_finished(tmp_path):
    code = ("from raymoll.data import prepare; prepare('synthetic', r'%s', num_train=200000, "
            "num_test=10, image_size=64, progress=False)" % tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".train.beton.tmp-*")) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the writer's worker processes too
        proc.wait()
    assert list(tmp_path.glob(".train.beton.tmp-*"))  # it was killed while writing
    assert not (tmp_path / "meta.json").exists() and not list(tmp_path.glob("*.beton"))
