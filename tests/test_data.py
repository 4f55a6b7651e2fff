"""Data: IDX parsing, class folders, the defender pool and the clean budget, batch augmentation."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from torchvision.io import encode_png

from bdbench.augment import Augment, random_crop
from bdbench.data import FashionMNIST, ImageFolder, Synthetic, read_idx
from bdbench.errors import DataNotFoundError

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
    from bdbench.errors import ConfigError

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
    from bdbench import data as data_module

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
    script = (f"from bdbench.augment import Augment; from bdbench.data import ImageFolder; a = Augment(crop_padding=0, "
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

    from bdbench.validate import build

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


def write_gtsrb(root, sizes=lambda c, i: (20 + c, 30 + i)) -> None:
    """Three training photos per class and one test photo per class in torchvision's GTSRB layout: solid colour
    10 + 5 * class (bilinear resizing keeps a solid colour exactly), each of its own size (``sizes(c, i)``, H x W)."""
    from PIL import Image

    base = root / "gtsrb"
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    (base / "GTSRB" / "Final_Test" / "Images").mkdir(parents=True)
    for c in range(43):
        folder = base / "GTSRB" / "Training" / f"{c:05d}"
        folder.mkdir(parents=True)
        for i in range(3):
            h, w = sizes(c, i)
            Image.fromarray(np.full((h, w, 3), 10 + 5 * c, np.uint8)).save(folder / f"00000_{i:05d}.ppm")
        Image.fromarray(np.full((40, 35, 3), 10 + 5 * c, np.uint8)).save(base / "GTSRB/Final_Test/Images" / f"{c:05d}.ppm")
        rows.append(f"{c:05d}.ppm;35;40;0;0;35;40;{c}")
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")


def test_image_folder_decodes_again_when_files_swap_contents_under_the_same_names_and_sizes(tmp_path):
    """The decoded cache is keyed by the files' contents: a key of names and sizes reused the old decoding after two
    files of equal size swapped contents (a data folder edited in place reads as the folder it was)."""
    from bdbench import data as data_module

    root, ds = image_folder(tmp_path)
    ant, cat = (root / "imgs" / "train" / name / "0.png" for name in ("ant", "cat"))
    for path, value in ((ant, 0), (cat, 40)):  # uncompressed, so equal sizes
        image = torch.full((3, 8, 8), value, dtype=torch.uint8)
        path.write_bytes(encode_png(image, compression_level=0).numpy().tobytes())
    first = ds.load(root, cache_dir=tmp_path / "cache")
    a, c = ant.read_bytes(), cat.read_bytes()
    assert len(a) == len(c)  # the same names and sizes: only the contents tell the two folders apart
    ant.write_bytes(c), cat.write_bytes(a)
    data_module._READ_CACHE.clear()  # a new process
    again = ds.load(root, cache_dir=tmp_path / "cache")
    assert int(first.train.x[0, 0, 0, 0]) == 0 and int(again.train.x[0, 0, 0, 0]) == 40  # ant's first is cat's now
    assert len(list((tmp_path / "cache" / "datasets").glob("tiny_folder-*"))) == 2


def test_gtsrb_reads_torchvisions_layout_resized_to_the_configured_size(tmp_path, tiny_cfg):
    """``dataset=gtsrb`` on files in the archives' layout: photos of any size come out 3 x 32 x 32 uint8, labelled
    by their class folder (training) and by the CSV (test), with the defender pool out of the poisonable indices."""
    from bdbench.validate import build

    write_gtsrb(tmp_path / "data")
    cfg = tiny_cfg("dataset=gtsrb", "dataset.pool_per_class=2", "dataset.download=false")
    data = build(cfg.dataset).load(tmp_path / "data", cache_dir=tmp_path / "cache")
    assert data.train.x.shape == (129, 3, 32, 32) and data.train.x.dtype == torch.uint8
    assert data.test.x.shape == (43, 3, 32, 32)
    assert data.train.y.tolist() == [c for c in range(43) for _ in range(3)] and data.test.y.tolist() == list(range(43))
    assert (data.train.x == (10 + 5 * data.train.y)[:, None, None, None].to(torch.uint8)).all()
    assert (data.test.x == (10 + 5 * data.test.y)[:, None, None, None].to(torch.uint8)).all()
    assert len(data.pool) == 86 and not set(data.pool.tolist()) & set(data.poisonable().tolist())


def test_gtsrb_decodes_again_when_a_files_content_changes_under_the_same_name_and_size(tmp_path, tiny_cfg):
    """The decoded cache is keyed by the files' contents: ImageFolder's names-and-sizes key reused an old decoding
    after two files of equal size swapped contents."""
    from bdbench.validate import build

    write_gtsrb(tmp_path / "data", sizes=lambda c, i: (24, 24))
    ds = build(tiny_cfg("dataset=gtsrb", "dataset.pool_per_class=2").dataset)
    train, _ = ds._read(tmp_path / "data", tmp_path / "cache")
    first, second = (tmp_path / "data/gtsrb/GTSRB/Training" / f"{c:05d}" / "00000_00000.ppm" for c in (0, 1))
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b), second.write_bytes(a)
    again, _ = ds._read(tmp_path / "data", tmp_path / "cache")
    assert int(train.x[0, 0, 0, 0]) == 10 and int(again.x[0, 0, 0, 0]) == 15  # class 0's first photo is now class 1's
    assert len(list((tmp_path / "cache").glob("datasets/*"))) == 2
    assert ds._read(tmp_path / "data", tmp_path / "cache")[0].x.equal(again.x)  # and that decoding is cached


def write_cifar100(root) -> None:
    """CIFAR-100's python pickles with four images per fine class (label c: colour 2 * c) in training, one in test."""
    import pickle

    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    for name, per_class in (("train", 4), ("test", 1)):
        labels = [c for c in range(100) for _ in range(per_class)]
        data = np.repeat(np.array(labels, np.uint8)[:, None] * 2, 3072, axis=1)
        with open(base / name, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [c // 5 for c in labels]}, f)
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{c}" for c in range(100)]}, f)


def test_cifar100_reads_torchvisions_files_with_fine_labels_and_refuses_files_that_fail_their_md5(tmp_path, tiny_cfg,
                                                                                                   monkeypatch):
    """``dataset=cifar100`` reads through torchvision, which checks each file against the original's MD5: the small
    files written here fail it (one line naming where the files go), and pass with that check alone patched."""
    import torchvision.datasets.cifar

    from bdbench.validate import build

    write_cifar100(tmp_path / "data")
    ds = build(tiny_cfg("dataset=cifar100", "dataset.pool_per_class=2", "dataset.download=false").dataset)
    with pytest.raises(DataNotFoundError, match=r"CIFAR-100 not found .*download disabled.*cifar-100-python"):
        ds.check(tmp_path / "data")
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    data = ds.load(tmp_path / "data", cache_dir=tmp_path / "cache")
    assert data.train.x.shape == (400, 3, 32, 32) and data.test.x.shape == (100, 3, 32, 32)
    assert data.train.y.tolist() == [c for c in range(100) for _ in range(4)]
    assert (data.train.x == (2 * data.train.y)[:, None, None, None].to(torch.uint8)).all()
    assert len(data.pool) == 200


def test_a_missing_gtsrb_folder_is_one_line_that_says_where_the_files_go(tmp_path, tiny_cfg):
    from bdbench.validate import build

    ds = build(tiny_cfg("dataset=gtsrb", "dataset.download=false").dataset)
    with pytest.raises(DataNotFoundError, match=r"GTSRB not found .*download disabled.*GTSRB/Training/<class>/\*\.ppm"):
        ds.check(tmp_path)


def test_a_cell_runs_on_gtsrb_files_from_training_to_its_record(tmp_path, tiny_cfg, choices):
    """The whole path on the new data set: poisoned training on 43 classes, fine-tuning on one image per class."""
    from omegaconf import open_dict

    from bdbench.runner import run_cell

    write_gtsrb(tmp_path / "data")
    cfg = tiny_cfg("dataset=gtsrb", "model=cifar_cnn", "dataset.pool_per_class=2", "attack=badnets", "defense=ft",
                   "budget=1", "recipe.epochs=2", "defense.schedule.epochs=1", "defense.schedule.min_steps=2")
    with open_dict(cfg):
        cfg.paths.data = str(tmp_path / "data")
    record = run_cell(cfg, choices(cfg))
    assert record["status"] == "ok", record.get("error")
    assert record["defense_images"] == 43 and record["display"]["dataset"] == "GTSRB"
    assert record["config"]["dataset"]["_target_"] == "bdbench.datasets.gtsrb.GTSRB"
