"""Data sets added after the first published grids, one per module.

``bdbench.data`` holds the readers the published models were trained from (its code is part of their cache keys, so
its CIFAR-10 and Fashion-MNIST checks stay as they are); a data set here keys its own models by its own module
(``bdbench.runner.code_version``), so adding one re-keys nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from bdbench.data import DataNotFoundError


def find_or_download(open_files: Callable[[bool], object], download: bool, root: Path, what: str, hint: str) -> None:
    """Open a data set's files through torchvision (``open_files(download)``), downloading them first where the
    config allows; else one DataNotFoundError that says why and where the files go."""
    try:
        open_files(False)
        return
    except (RuntimeError, OSError):  # missing files, a file whose MD5 is not the original's, a missing CSV
        pass
    reason = "download disabled (dataset.download=false)"
    if download:
        try:
            open_files(True)
            return
        except Exception as exc:  # offline: any network or file error ends in the one message
            reason = f"download failed: {type(exc).__name__}"
    raise DataNotFoundError(f"{what} not found under paths.data={root} ({reason}); {hint}")
