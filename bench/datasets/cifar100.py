"""CIFAR-100 (100 fine classes, 32x32 RGB) from torchvision's ``cifar-100-python`` folder."""

from __future__ import annotations

from pathlib import Path

from bench.data import CIFAR10, DataNotFoundError


class CIFAR100(CIFAR10):
    """CIFAR-100 through torchvision's reader (which checks every file's MD5), fine labels; downloaded if allowed."""

    classes = 100

    def _torchvision(self, root: Path, train: bool, download: bool):
        import torchvision

        return torchvision.datasets.CIFAR100(str(root), train=train, download=download)

    def check(self, root: Path) -> None:
        try:
            self._torchvision(root, True, False)
            return
        except RuntimeError:  # missing, or a file whose MD5 is not the original's
            pass
        error = "download disabled (dataset.download=false)"
        if self.download:
            try:
                self._torchvision(root, True, True)
                return
            except Exception as exc:  # offline: any network or file error ends in the one message
                error = f"download failed: {type(exc).__name__}"
        raise DataNotFoundError(f"CIFAR-100 not found under paths.data={root} ({error}); put torchvision's "
                                f"cifar-100-python folder (train, test, meta) there or set paths.data=DIR")
