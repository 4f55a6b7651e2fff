"""CIFAR-100 (100 fine classes, 32x32 RGB) from torchvision's ``cifar-100-python`` folder."""

from __future__ import annotations

from pathlib import Path

from bdbench.data import CIFAR10
from bdbench.datasets import find_or_download


class CIFAR100(CIFAR10):
    """CIFAR-100 through torchvision's reader (which checks every file's MD5), fine labels; downloaded if allowed."""

    classes = 100

    def _torchvision(self, root: Path, train: bool, download: bool):
        import torchvision

        return torchvision.datasets.CIFAR100(str(root), train=train, download=download)

    def check(self, root: Path) -> None:
        find_or_download(lambda download: self._torchvision(root, True, download), self.download, root, "CIFAR-100",
                         "put torchvision's cifar-100-python folder (train, test, meta) there or set paths.data=DIR")
