"""GTSRB (43 traffic-sign classes, photos of 15x15 to 250x250 pixels) in torchvision's layout, resized once."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from bdbench.data import ImageDataset, ImageSet
from bdbench.datasets import find_or_download

log = logging.getLogger(__name__)


class GTSRB(ImageDataset):
    """GTSRB under ``<root>/gtsrb`` as torchvision reads it (``GTSRB/Training/<class>/*.ppm``,
    ``GTSRB/Final_Test/Images/*.ppm`` and ``GT-final_test.csv``), every image resized to the configured size with
    PIL's bilinear filter (BackdoorBench's ``Resize((32, 32))``) and kept as uint8.

    Decoding and resizing ~52,000 photos takes a while, so the result is cached under ``cache_dir``, keyed by the
    files' contents (not their names and sizes): a data folder whose files changed decodes again."""

    classes = 43
    SPLITS = {"train": "GTSRB/Training", "test": "GTSRB/Final_Test/Images"}

    def _torchvision(self, root: Path, split: str, download: bool):
        import torchvision

        return torchvision.datasets.GTSRB(str(root), split=split, download=download)

    def check(self, root: Path) -> None:
        base = root / "gtsrb"
        find_or_download(lambda download: [self._torchvision(root, split, download) for split in self.SPLITS],
                         self.download, root, "GTSRB",
                         f"put torchvision's layout there: {base}/GTSRB/Training/<class>/*.ppm, "
                         f"{base}/GTSRB/Final_Test/Images/*.ppm and {base}/GT-final_test.csv (the official archives "
                         f"unpacked), or set paths.data=DIR")

    def _content_key(self, base: Path) -> str:
        digest = hashlib.sha256(f"{list(self.shape)}\n".encode())
        for path in sorted(p for p in base.rglob("*") if p.is_file()):
            digest.update(f"{path.relative_to(base)}\n".encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        return f"{self.name}-{digest.hexdigest()[:16]}"

    def _decode(self, root: Path, split: str) -> ImageSet:
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor

        samples = self._torchvision(root, split, False)
        size = (self.shape[2], self.shape[1])  # PIL's (width, height)
        log.info("decoding and resizing %d GTSRB %s images (once; cached afterwards)", len(samples), split)
        images, labels = [], []
        for image, label in samples:  # torchvision opens each file with PIL and converts it to RGB
            images.append(pil_to_tensor(image.resize(size, Image.BILINEAR)))
            labels.append(label)
        return ImageSet(torch.stack(images), torch.tensor(labels))

    def _read(self, root: Path, cache_dir: Path) -> tuple[ImageSet, ImageSet]:
        from bdbench.cache import ModelCache  # the one verified cache mechanism

        cache, key = ModelCache(cache_dir), self._content_key(root / "gtsrb")
        with cache.lock(f"dataset-{key}"):  # two cold runs: one decodes, the other waits and reads
            entry = cache.datasets.load(key)
            if entry is None:
                sets = {split: self._decode(root, split) for split in self.SPLITS}
                entry = cache.datasets.store(key, {s: {"x": sets[s].x, "y": sets[s].y} for s in sets}, {})
        return tuple(ImageSet(entry.objects[s]["x"], entry.objects[s]["y"]) for s in self.SPLITS)
