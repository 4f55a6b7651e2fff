"""Data: IDX parsing, class folders, the defender pool and the clean budget, batch augmentation."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from torchvision.io import encode_png

from bench.augment import Augment, random_crop
from bench.data import FashionMNIST, ImageFolder, Synthetic, read_idx
from bench.errors import DataNotFoundError

AUG = Augment(crop_padding=1, hflip=False)
META = dict(mean=[0.5], std=[0.5], augment=AUG, defense_augment=AUG, pool_seed=0, subset={}, download=False)
SYN = dict(noise=20.0, seed=0)  # the synthetic set's remaining keys, as conf/dataset/synthetic.yaml


@pytest.fixture(scope="module")
def bundle():
    ds = Synthetic(name="synthetic", num_classes=10, shape=[1, 16, 16], n_train=1000, n_test=200,
                   pool_per_class=20, **META, **SYN)
    return ds.load("unused")


def test_pool_is_stratified_and_fixed(bundle):
    counts = torch.bincount(bundle.train.y[bundle.pool], minlength=10)
    assert (counts == 20).all()
    again = Synthetic(name="synthetic", num_classes=10, shape=[1, 16, 16], n_train=1000, n_test=200,
                      pool_per_class=20, **META, **SYN).load("unused")
    assert torch.equal(again.pool, bundle.pool)


def test_poisonable_is_the_complement_of_the_pool(bundle):
    poisonable = bundle.poisonable()
    assert len(poisonable) + len(bundle.pool) == len(bundle.train)
    assert not set(poisonable.tolist()) & set(bundle.pool.tolist())


@pytest.mark.parametrize("k", [0, 1, 10, 20])
def test_budget_is_k_per_class_from_the_pool(bundle, k):
    idx = bundle.budget_indices(k, seed=3)
    assert len(idx) == 10 * k
    assert set(idx.tolist()) <= set(bundle.pool.tolist())
    if k:
        assert (torch.bincount(bundle.train.y[idx], minlength=10) == k).all()
    assert bundle.budget(k, seed=3).x.shape == (10 * k, 1, 16, 16)


def test_budgets_are_nested_and_seeded(bundle):
    one, ten = bundle.budget_indices(1, seed=0), bundle.budget_indices(10, seed=0)
    assert set(one.tolist()) <= set(ten.tolist())
    assert not torch.equal(bundle.budget_indices(10, seed=1), ten)
    assert torch.equal(bundle.budget_indices(10, seed=0), ten)


def test_pool_larger_than_a_class_is_an_error():
    from bench.errors import ConfigError

    ds = Synthetic(name="s", num_classes=10, shape=[1, 8, 8], n_train=100, n_test=10, pool_per_class=11, **META, **SYN)
    with pytest.raises(ConfigError, match="pool_per_class=11"):
        ds.load("unused")


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_read_idx_round_trip(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "x.gz", images)
    assert np.array_equal(read_idx(tmp_path / "x.gz"), images)


def test_fashion_mnist_layouts_and_missing_files(tmp_path):
    folder = tmp_path / "FashionMNIST" / "raw"  # torchvision's layout
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 20)):
        _write_idx(folder / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(folder / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    ds = FashionMNIST(name="fashion_mnist", num_classes=10, shape=[1, 28, 28], pool_per_class=2, **META)
    data = ds.load(tmp_path)
    assert data.train.x.shape == (30, 1, 28, 28) and data.test.x.dtype == torch.uint8
    with pytest.raises(DataNotFoundError, match="put the four IDX files .* or set paths.data"):
        ds.check(tmp_path / "elsewhere")


def test_image_folder_decodes_and_caches(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "test"):
        for c, name in enumerate(("cat", "ant", "dog")):  # sorted: ant=0, cat=1, dog=2
            (root / "imgs" / split / name).mkdir(parents=True)
            for i in range(4):
                img = torch.full((3, 8, 8), 40 * c + i, dtype=torch.uint8)
                (root / "imgs" / split / name / f"{i}.png").write_bytes(encode_png(img).numpy().tobytes())
    ds = ImageFolder(folder="imgs", name="tiny_folder", num_classes=3, shape=[3, 8, 8], pool_per_class=1,
                     **{**META, "mean": [0.5] * 3, "std": [0.5] * 3})
    data = ds.load(root, cache_dir=tmp_path / "cache")
    assert data.train.x.shape == (12, 3, 8, 8)
    assert data.train.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert int(data.train.x[4, 0, 0, 0]) == 0 and int(data.train.x[0, 0, 0, 0]) == 40  # 'cat' images are class 1
    assert list((tmp_path / "cache" / "datasets").glob("tiny_folder-*/manifest.json"))


def image_folder(tmp_path, classes=("cat", "ant", "dog")):
    root = tmp_path / "data"
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            (root / "imgs" / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(4):
                img = torch.full((3, 8, 8), 40 * c + i, dtype=torch.uint8)
                (root / "imgs" / split / name / f"{i}.png").write_bytes(encode_png(img).numpy().tobytes())
    ds = ImageFolder(folder="imgs", name="tiny_folder", num_classes=len(classes), shape=[3, 8, 8],
                     pool_per_class=1, **{**META, "mean": [0.5] * 3, "std": [0.5] * 3})
    return root, ds


def test_a_truncated_decoded_cache_is_rebuilt(tmp_path, caplog):
    """Before, a truncated decoded data set made every later run crash and was never rebuilt."""
    from bench import data as data_module

    root, ds = image_folder(tmp_path)
    first = ds.load(root, cache_dir=tmp_path / "cache")
    blob = next((tmp_path / "cache" / "datasets").glob("tiny_folder-*/train.pt"))
    blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])
    data_module._READ_CACHE.clear()  # a new process
    again = ds.load(root, cache_dir=tmp_path / "cache")
    assert "is corrupt" in caplog.text and torch.equal(again.train.x, first.train.x)
    data_module._READ_CACHE.clear()
    assert torch.equal(ds.load(root, cache_dir=tmp_path / "cache").test.x, first.test.x)  # the rebuilt entry reads


def test_a_corrupt_image_and_an_empty_class_folder_are_named(tmp_path):
    root, ds = image_folder(tmp_path)
    (root / "imgs" / "train" / "dog" / "2.png").write_bytes(b"not a png")
    with pytest.raises(DataNotFoundError, match=r"cannot decode .*imgs/train/dog/2.png"):
        ds.load(root, cache_dir=tmp_path / "cache")
    (root / "imgs" / "train" / "dog" / "2.png").unlink()
    (root / "imgs" / "test" / "eel").mkdir()
    with pytest.raises(DataNotFoundError, match=r"class folder .*imgs/train/eel is empty or missing"):
        ds.load(root, cache_dir=tmp_path / "cache")


def test_two_cold_runs_share_one_decode(tmp_path):
    """They raced on one fixed .tmp name and one of them crashed."""
    import subprocess
    import sys

    root, _ = image_folder(tmp_path)
    script = (f"from bench.augment import Augment; from bench.data import ImageFolder; a = Augment(crop_padding=0, "
              f"hflip=False); ds = ImageFolder(folder='imgs', name='tiny_folder', num_classes=3, shape=[3, 8, 8], "
              f"pool_per_class=1, mean=[0.5] * 3, std=[0.5] * 3, augment=a, defense_augment=a, pool_seed=0, "
              f"subset={{}}, download=False); "
              f"print(int(ds.load('{root}', cache_dir='{tmp_path / 'cache'}').train.x.sum()))")
    runs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outs = [r.communicate(timeout=600) for r in runs]
    assert [r.returncode for r in runs] == [0, 0], outs
    assert outs[0][0] == outs[1][0] and len(list((tmp_path / "cache" / "datasets").iterdir())) == 1


def test_random_crop_is_a_per_sample_shift():
    x = torch.arange(2 * 5 * 5, dtype=torch.float32).view(2, 1, 5, 5)
    gen = torch.Generator().manual_seed(0)
    out = random_crop(x, 2, gen)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):  # every output is some 5x5 window of its own padded image
        windows = [padded[i, :, a : a + 5, b : b + 5] for a in range(5) for b in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)


def test_augment_keeps_dtype_and_shape():
    x = torch.randint(0, 256, (7, 3, 8, 8), dtype=torch.uint8)
    out = Augment(crop_padding=2, hflip=True)(x, torch.Generator().manual_seed(1))
    assert out.dtype == torch.uint8 and out.shape == x.shape


def test_tiny_imagenet_reads_the_official_train_layout_and_sorted_validation_images(tmp_path, tiny_cfg):
    """``dataset=tiny_imagenet`` on files written in the archive's own layout (train/<wnid>/images/*.JPEG) and a
    test/ folder sorted by wnid: the configured data set composes, loads 64x64 RGB uint8 images, labels them by the
    sorted wnids, and keeps its defender pool out of the poisonable indices. (Three classes of the 200 here.)"""
    from torchvision.io import encode_jpeg

    from bench.validate import build

    root = tmp_path / "data" / "tiny-imagenet"
    wnids = ("n01443537", "n01629819", "n01641577")
    for c, wnid in enumerate(wnids):
        for split, folder in (("train", root / "train" / wnid / "images"), ("test", root / "test" / wnid)):
            folder.mkdir(parents=True)
            for i in range(30 if split == "train" else 4):
                img = torch.full((3, 64, 64), 60 * c + 20, dtype=torch.uint8)
                (folder / f"{wnid}_{i}.JPEG").write_bytes(encode_jpeg(img, quality=95).numpy().tobytes())
    cfg = tiny_cfg("dataset=tiny_imagenet", "dataset.num_classes=3", "dataset.pool_per_class=2")
    data = build(cfg.dataset).load(tmp_path / "data", cache_dir=tmp_path / "cache")
    assert data.train.x.shape == (90, 3, 64, 64) and data.train.x.dtype == torch.uint8
    assert data.test.x.shape == (12, 3, 64, 64)
    assert data.train.y.tolist() == [0] * 30 + [1] * 30 + [2] * 30 and data.test.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert abs(int(data.train.x[30, 0, 5, 5]) - 80) <= 2  # the second wnid's images, JPEG-decoded
    assert len(data.pool) == 6 and not set(data.pool.tolist()) & set(data.poisonable().tolist())
