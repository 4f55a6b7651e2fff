"""Data sets as uint8 tensors on the device, the defender pool and the per-class clean budget.

A data set config (``conf/dataset``) instantiates one of the ``ImageDataset`` classes below; its
``load`` returns a ``DataBundle``: train and test images as uint8 NCHW tensors on the device, and
the defender pool, a class-stratified set of training indices fixed by ``pool_seed`` that no attack
may poison. A cell's clean budget is the first ``k`` pool images per class under the cell's seed.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Sequence

import numpy as np
import torch

from bdbench.augment import Augment
from bdbench.errors import ConfigError, DataNotFoundError
from bdbench.schema import Count, NonNegative, PositiveInt, Range
from bdbench.seeding import generator

log = logging.getLogger(__name__)


@dataclass
class ImageSet:
    """Images as uint8 [N, C, H, W] and labels as int64 [N], on one device."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return self.y.shape[0]

    def subset(self, idx: torch.Tensor) -> "ImageSet":
        idx = idx.to(self.y.device)
        return ImageSet(self.x[idx], self.y[idx])

    def to(self, device: torch.device | str) -> "ImageSet":
        return ImageSet(self.x.to(device), self.y.to(device))


@dataclass
class DataBundle:
    """Everything a cell reads from a data set."""

    spec: "ImageDataset"
    train: ImageSet
    test: ImageSet
    pool: torch.Tensor  # training indices reserved for the defender, never poisoned

    def poisonable(self) -> torch.Tensor:
        """Training indices an attack may poison: all but the defender pool."""
        keep = torch.ones(len(self.train), dtype=torch.bool, device=self.pool.device)
        keep[self.pool] = False
        return keep.nonzero().squeeze(1)

    def budget_indices(self, k: int, seed: int) -> torch.Tensor:
        """The first ``k`` pool images of each class in a seeded order (budget k ⊂ budget k+1)."""
        labels = self.train.y[self.pool]
        gen = generator(seed, "budget")
        chosen = []
        for c in range(self.spec.num_classes):
            members = self.pool[labels == c]
            order = torch.randperm(len(members), generator=gen).to(members.device)
            chosen.append(members[order[:k]])
        return torch.cat(chosen)

    def budget(self, k: int, seed: int) -> ImageSet:
        return self.train.subset(self.budget_indices(k, seed))


class ImageDataset(ABC):
    """Metadata and loading of one image classification data set.

    Subclasses implement ``_read(root, cache_dir)`` returning (train, test) uint8 NCHW CPU tensors,
    and may override ``check(root)`` to fail early with a message that says where files go.
    """

    classes: int | None = None  # the class count of a data set with fixed files (None: read from the files)

    def __init__(self, *, name: str, num_classes: Annotated[int, Range(ge=2)], shape: Sequence[int],
                 mean: Sequence[float], std: Sequence[float], augment: Augment, defense_augment: Augment,
                 pool_per_class: Count, pool_seed: Count, subset: dict, download: bool) -> None:
        if self.classes is not None and num_classes != self.classes:
            raise ValueError(f"dataset.num_classes={num_classes}: {name} has {self.classes} classes; valid: "
                             f"{self.classes}")
        if len(shape) != 3 or len(mean) != shape[0] or len(std) != shape[0]:
            raise ValueError(f"dataset.shape={list(shape)} with {len(mean)} means and {len(std)} stds; valid: "
                             f"[C, H, W] and one mean and std per channel")
        self.name = name
        self.num_classes = num_classes
        self.shape = tuple(shape)
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.augment = augment
        self.defense_augment = defense_augment
        self.pool_per_class = pool_per_class
        self.pool_seed = pool_seed
        self.subset = dict(subset)
        self.download = download

    @abstractmethod
    def _read(self, root: Path, cache_dir: Path) -> tuple[ImageSet, ImageSet]:
        """(train, test) as uint8 NCHW tensors on the CPU."""

    def check(self, root: Path) -> None:
        """Raise DataNotFoundError if the files are missing (after a download attempt if allowed)."""

    def train_labels(self, root: Path, cache_dir: Path) -> torch.Tensor:
        """The training labels, cheaper than the images where the format allows (a sweep checks its pools with
        them before any job runs)."""
        return self._read(root, cache_dir)[0].y

    def check_data(self, root: str | Path, cache_dir: str | Path, verify_files: bool = True) -> None:
        """Everything about this config that only the files can tell, before any compute: the files exist and
        are whole, the class count matches, the defender pool fits every class of the (subset) training set."""
        root, cache_dir = Path(root), Path(cache_dir)
        key = self._files_key(root)
        if verify_files or key not in _LABELS:
            self.check(root)
        if key not in _LABELS:
            _LABELS[key] = self.train_labels(root, cache_dir)
        labels = _LABELS[key]
        idx = self._subset_indices(len(labels), self.subset.get("train"), "train")
        labels = labels if idx is None else labels[idx]
        found = int(labels.max()) + 1
        if found != self.num_classes:
            raise ConfigError(f"dataset.num_classes={self.num_classes}: the files of {self.name} hold {found} classes; "
                              f"valid: {found}")
        self._pool_counts(labels)

    def load(self, root: str | Path, device: torch.device | str = "cpu", cache_dir: str | Path = ".cache/bdbench") -> DataBundle:
        root, cache_dir = Path(root), Path(cache_dir)
        key = self._files_key(root)
        if key not in _READ_CACHE:  # a multirun reads each data set once per process
            self.check(root)
            _READ_CACHE[key] = self._read(root, cache_dir)
        train, test = _READ_CACHE[key]
        train = self._subsample(train, self.subset.get("train"), "train")
        test = self._subsample(test, self.subset.get("test"), "test")
        if tuple(train.x.shape[1:]) != self.shape:
            raise ConfigError(f"dataset {self.name}: images have shape {tuple(train.x.shape[1:])}, config says {self.shape}")
        train, test = train.to(device), test.to(device)
        return DataBundle(self, train, test, self._pool(train))

    def _subsample(self, data: ImageSet, n: int | None, split: str) -> ImageSet:
        idx = self._subset_indices(len(data), n, split)
        return data if idx is None else data.subset(idx)

    def _subset_indices(self, size: int, n: int | None, split: str) -> torch.Tensor | None:
        """The seeded subset of a split (None: all of it)."""
        if n is None or n >= size:
            return None
        return torch.randperm(size, generator=generator(0, f"subset:{self.name}:{split}"))[:n]

    def _files_key(self, root: Path) -> tuple:
        """What the decoded files depend on: the key of the per-process read caches."""
        return type(self).__name__, self.name, str(root.resolve())

    def _pool_counts(self, labels: torch.Tensor) -> None:
        counts = torch.bincount(labels, minlength=self.num_classes)
        if int(counts.min()) < self.pool_per_class:
            raise ConfigError(
                f"dataset.pool_per_class={self.pool_per_class} is larger than the smallest class "
                f"({int(counts.min())} images); valid: 0..{int(counts.min())}"
            )

    def _pool(self, train: ImageSet) -> torch.Tensor:
        self._pool_counts(train.y)
        gen = generator(self.pool_seed, f"pool:{self.name}")
        pool = []
        for c in range(self.num_classes):
            members = (train.y == c).nonzero().squeeze(1)
            order = torch.randperm(len(members), generator=gen).to(members.device)
            pool.append(members[order[: self.pool_per_class]])
        return torch.cat(pool).sort().values


_READ_CACHE: dict[tuple, tuple[ImageSet, ImageSet]] = {}
_LABELS: dict[tuple, torch.Tensor] = {}  # training labels per data set, for the checks before a sweep


def _from_numpy(images: np.ndarray, labels: Sequence[int] | np.ndarray) -> ImageSet:
    """HWC or HW uint8 numpy images -> ImageSet with NCHW uint8."""
    x = torch.from_numpy(np.array(images, dtype=np.uint8, copy=True))
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()
    return ImageSet(x, torch.tensor(np.array(labels), dtype=torch.int64))


# ---------------------------------------------------------------------------------------------
class FashionMNIST(ImageDataset):
    """Fashion-MNIST from its four IDX files (gzipped or not), else torchvision's download."""

    classes = 10

    FILES = {
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }
    FOLDERS = ("fashion-mnist", "FashionMNIST/raw", ".")

    def _locate(self, root: Path) -> dict[str, Path] | None:
        for folder in self.FOLDERS:
            found = {}
            for stem in (s for pair in self.FILES.values() for s in pair):
                for name in (stem + ".gz", stem):
                    if (root / folder / name).is_file():
                        found[stem] = root / folder / name
                        break
            if len(found) == 4:
                return found
        return None

    def check(self, root: Path) -> None:
        files = self._locate(root)
        if files is not None:
            for path in files.values():  # whole files: a truncated or damaged one is named here, not mid-run
                read_idx(path)
            return
        error = "download disabled (dataset.download=false)"
        if self.download:
            try:
                import torchvision

                torchvision.datasets.FashionMNIST(str(root), train=True, download=True)
                torchvision.datasets.FashionMNIST(str(root), train=False, download=True)
                return
            except Exception as exc:  # offline: any network or file error ends in the one message
                error = f"download failed: {type(exc).__name__}"
        raise DataNotFoundError(
            f"Fashion-MNIST not found under paths.data={root} ({error}); put the four IDX files "
            f"(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
            f"t10k-labels-idx1-ubyte.gz) in {root / 'fashion-mnist'} or set paths.data=DIR"
        )

    def train_labels(self, root: Path, cache_dir: Path) -> torch.Tensor:
        files = self._locate(root)
        return torch.from_numpy(read_idx(files[self.FILES["train"][1]]).astype(np.int64))

    def _read(self, root: Path, cache_dir: Path) -> tuple[ImageSet, ImageSet]:
        files = self._locate(root)
        assert files is not None
        out = []
        for images, labels in self.FILES.values():
            out.append(_from_numpy(read_idx(files[images]), read_idx(files[labels])))
        return out[0], out[1]


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (the MNIST format): magic 0x0000 0x08 ndim, big-endian dims, uint8 data."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataNotFoundError(f"{path}: damaged or truncated gzip file ({exc}); replace it with the original") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataNotFoundError(f"{path} is not a uint8 IDX file (magic {raw[:4].hex()}); replace it with the original")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = 4 + 4 * ndim + math.prod(dims)
    if len(raw) != expected:
        raise DataNotFoundError(f"{path}: {len(raw)} bytes where its header {dims} needs {expected} (truncated or "
                                f"damaged); replace it with the original")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


# ---------------------------------------------------------------------------------------------
class CIFAR10(ImageDataset):
    """CIFAR-10 from torchvision's files under ``root`` (``cifar-10-batches-py``), downloaded if allowed."""

    classes = 10

    def _torchvision(self, root: Path, train: bool, download: bool):
        import torchvision

        return torchvision.datasets.CIFAR10(str(root), train=train, download=download)

    def check(self, root: Path) -> None:
        try:
            self._torchvision(root, True, False)
            return
        except RuntimeError:
            pass
        error = "download disabled (dataset.download=false)"
        if self.download:
            try:
                self._torchvision(root, True, True)
                return
            except Exception as exc:
                error = f"download failed: {type(exc).__name__}"
        raise DataNotFoundError(
            f"CIFAR-10 not found under paths.data={root} ({error}); put torchvision's "
            f"cifar-10-batches-py folder there, set paths.data=DIR, or use dataset=cifar10_jpeg"
        )

    def _read(self, root: Path, cache_dir: Path) -> tuple[ImageSet, ImageSet]:
        train, test = (self._torchvision(root, split, False) for split in (True, False))
        return _from_numpy(train.data, train.targets), _from_numpy(test.data, test.targets)


# ---------------------------------------------------------------------------------------------
class ImageFolder(ImageDataset):
    """Any ``{train,test}/<class>/<image>`` folder; classes in sorted name order.

    Decoded once with torchvision.io (no PIL) and cached as uint8 tensors under ``cache_dir``, keyed by the files'
    contents: a folder whose files were replaced by others of the same names and sizes decodes again.
    """

    def __init__(self, *, folder: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.folder = folder

    def check(self, root: Path) -> None:
        base = root / self.folder
        missing = [s for s in ("train", "test") if not (base / s).is_dir()]
        if missing:
            raise DataNotFoundError(
                f"dataset {self.name}: no {'/'.join(missing)} folder under {base}; expected "
                f"{base}/{{train,test}}/<class>/<image>; set paths.data=DIR"
            )

    def train_labels(self, root: Path, cache_dir: Path) -> torch.Tensor:
        base = root / self.folder / "train"
        classes = sorted(d.name for d in base.iterdir() if d.is_dir())
        files = sorted(p for p in base.rglob("*") if p.is_file())
        return torch.tensor([classes.index(p.relative_to(base).parts[0]) for p in files], dtype=torch.long)

    def _read(self, root: Path, cache_dir: Path) -> tuple[ImageSet, ImageSet]:
        base = root / self.folder
        listing = {s: sorted(p for p in (base / s).rglob("*") if p.is_file()) for s in ("train", "test")}
        digest = hashlib.sha256(f"{list(self.shape)}\n".encode())  # the files' contents, not their names and sizes
        for split, files in listing.items():
            for p in files:
                digest.update(f"{split}/{p.relative_to(base / split)}\n".encode())
                digest.update(hashlib.sha256(p.read_bytes()).digest())
        from bdbench.cache import ModelCache  # the one verified cache mechanism

        cache, key = ModelCache(cache_dir), f"{self.name}-{digest.hexdigest()[:16]}"
        with cache.lock(f"dataset-{key}"):  # two cold runs: one decodes, the other waits and reads
            entry = cache.datasets.load(key)
            if entry is None:
                classes = sorted(d.name for d in (base / "train").iterdir() if d.is_dir())
                found = {d.name for s in ("train", "test") for d in (base / s).iterdir() if d.is_dir()}
                for split in ("train", "test"):
                    for name in sorted(found):
                        if not any(p.is_file() for p in (base / split / name).rglob("*")):
                            raise DataNotFoundError(f"dataset {self.name}: class folder {base / split / name} is "
                                                    f"empty or missing; every class needs images in train and test")
                sets = {s: self._decode(listing[s], base / s, classes) for s in ("train", "test")}
                entry = cache.datasets.store(key, {s: {"x": sets[s].x, "y": sets[s].y} for s in sets}, {})
        return tuple(ImageSet(entry.objects[s]["x"], entry.objects[s]["y"]) for s in ("train", "test"))

    def _decode(self, files: list[Path], split_dir: Path, classes: list[str]) -> ImageSet:
        from torchvision.io import ImageReadMode, decode_image, read_file

        mode = ImageReadMode.GRAY if self.shape[0] == 1 else ImageReadMode.RGB
        log.info("decoding %d images under %s (once; cached afterwards)", len(files), split_dir)
        images = []
        for p in files:
            try:
                images.append(decode_image(read_file(str(p)), mode=mode))
            except RuntimeError as exc:
                raise DataNotFoundError(f"dataset {self.name}: cannot decode {p} ({str(exc).splitlines()[0]})") from None
        x = torch.stack(images)
        y = torch.tensor([classes.index(p.relative_to(split_dir).parts[0]) for p in files])
        return ImageSet(x, y)


# ---------------------------------------------------------------------------------------------
class Synthetic(ImageDataset):
    """A tiny learnable data set for unit tests: one smooth random prototype per class plus noise."""

    def __init__(self, *, n_train: PositiveInt, n_test: PositiveInt, noise: NonNegative, seed: Count, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n_train, self.n_test, self.noise, self.seed = n_train, n_test, noise, seed

    def _files_key(self, root: Path) -> tuple:
        return super()._files_key(root) + (self.num_classes, self.shape, self.n_train, self.n_test, self.noise, self.seed)

    def _read(self, root: Path, cache_dir: Path) -> tuple[ImageSet, ImageSet]:
        gen = generator(self.seed, f"synthetic:{self.name}")
        c, h, w = self.shape
        coarse = torch.rand(self.num_classes, c, 4, 4, generator=gen)
        protos = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        protos = 40 + 175 * protos

        def draw(n: int) -> ImageSet:
            y = torch.arange(n) % self.num_classes
            x = protos[y] + self.noise * torch.randn(n, c, h, w, generator=gen)
            return ImageSet(x.round().clamp(0, 255).to(torch.uint8), y)

        return draw(self.n_train), draw(self.n_test)
