"""The poisoned-model cache, addressed by content.

An entry's key is the hash of everything that determines the trained model: the resolved data set,
model, attack and recipe configs, the seed, the effective precision and the source code of the
modules that train it. An entry is a folder with the weights, the attack's trigger artifacts
(poisoned indices included) and a manifest (training history, undefended metrics, file hashes).
It is written to a temp folder and renamed into place, verified by hash on load, and a corrupt
entry is reported and rebuilt, never loaded. A file lock keeps two processes from training one key.
"""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from bench.fsutil import atomic_write_json, sha256_file

log = logging.getLogger(__name__)

FILES = ("weights.pt", "attack.pt")


@dataclass
class CacheEntry:
    weights: dict[str, torch.Tensor]
    attack_state: dict[str, Any]
    manifest: dict[str, Any]


class ModelCache:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / "models" / key

    @contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Exclusive across processes (and hosts sharing the folder, where the file system supports it)."""
        lock_path = self.root / "locks" / f"{key}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def load(self, key: str) -> CacheEntry | None:
        """The entry, or None if absent; a corrupt entry is reported, removed and None returned."""
        folder = self.path(key)
        if not folder.exists():
            return None
        problem = self._verify(folder)
        if problem is None:
            try:
                manifest = json.loads((folder / "manifest.json").read_text())
                return CacheEntry(
                    torch.load(folder / "weights.pt", map_location="cpu", weights_only=True),
                    torch.load(folder / "attack.pt", map_location="cpu", weights_only=True),
                    manifest,
                )
            except Exception as exc:  # unreadable despite matching hashes: treat as corrupt too
                problem = f"unreadable ({type(exc).__name__}: {exc})"
        log.warning("cache entry %s is corrupt (%s); removing it and training again", folder, problem)
        shutil.rmtree(folder, ignore_errors=True)
        return None

    def _verify(self, folder: Path) -> str | None:
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            return f"manifest unreadable: {type(exc).__name__}"
        for name in FILES:
            expected = manifest.get("files", {}).get(name)
            if not (folder / name).is_file():
                return f"{name} missing"
            if sha256_file(folder / name) != expected:
                return f"{name} does not match its hash"
        return None

    def store(self, key: str, weights: dict, attack_state: dict, manifest: dict) -> CacheEntry:
        folder = self.path(key)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{key}."))
        try:
            torch.save(weights, tmp / "weights.pt")
            torch.save(attack_state, tmp / "attack.pt")
            manifest = {**manifest, "key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "files": {name: sha256_file(tmp / name) for name in FILES}}
            atomic_write_json(tmp / "manifest.json", manifest)
            if folder.exists():  # a corrupt or stale entry: replace it
                shutil.rmtree(folder)
            tmp.rename(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return CacheEntry(weights, attack_state, manifest)

    def load_synthetic(self, key: str) -> dict[str, Any] | None:
        """A cached synthetic clean set (tensors and stats), or None if absent or unreadable."""
        path = self.root / "synthetic" / f"{key}.pt"
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            log.warning("synthetic set %s is unreadable (%s); synthesizing again", path, type(exc).__name__)
            return None

    def store_synthetic(self, key: str, entry: dict[str, Any]) -> None:
        """Written to a temp file and renamed, so a killed process never leaves a half-written set."""
        path = self.root / "synthetic" / f"{key}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key}.")
        try:
            with open(fd, "wb") as f:
                torch.save(entry, f)
            Path(tmp).rename(path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
