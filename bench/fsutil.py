"""Files that are either whole or absent: a killed process never leaves a half-written one."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from bdbench.code_versions import renamed


def umask_mode(path: Path) -> None:
    """Give a temp file (0600) or temp folder (0700) the mode a plain ``open`` / ``mkdir`` would have had
    under the user's umask, so a cache or records folder shared by a group stays readable by it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """The digest of JSON data; a config's ``_target_`` reads as its published name (``bdbench.code_versions``), so
    cache keys and cell names hold across the move of bdbench's modules into one namespace."""
    return hashlib.sha256(json.dumps(renamed(obj), sort_keys=True, default=str).encode()).hexdigest()
