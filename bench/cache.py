"""Content-addressed caches, one mechanism for every kind: poisoned models, budget-0 synthetic sets, decoded
data sets, trigger reversals (and anything added later).

An entry is a folder ``<root>/<kind>/<key>/`` holding one ``.pt`` file per object and a ``manifest.json`` with
each file's sha256. It is written to a temp folder of a unique name and renamed into place, verified by hash
on every load, and a corrupt or unreadable entry is reported, removed and rebuilt, never loaded. A file lock
per entry keeps two processes from building the same one. Files and folders take the user's umask (a cache
shared by a group on a cluster needs group bits), not the 0600 / 0700 of Python's temp files.

A poisoned model in training keeps its state after every epoch under its key (kind ``training``), verified the
same way, so a killed run resumes; the entry goes once the model is cached.

A poisoned model's key is the hash of everything that determines it: the resolved data set, model, attack and
recipe configs, the seed, the effective precision and the source of the modules that train it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from bdbench.errors import ConfigError
from bdbench.fsutil import atomic_write_json, sha256_file, sha256_json, umask_mode

log = logging.getLogger(__name__)


@dataclass
class Entry:
    objects: dict[str, Any]
    manifest: dict[str, Any]


def _identity(folder: Path) -> tuple[int, int, int]:
    """Which folder is at a path: its inode alone can be reused by the folder that replaced a deleted one."""
    st = folder.stat()
    return st.st_ino, st.st_ctime_ns, st.st_mtime_ns


def seal(manifest: dict[str, Any]) -> str:
    """The digest of everything a manifest says (its files' hashes, the undefended metrics a record copies, ...)."""
    return sha256_json({k: v for k, v in manifest.items() if k != "seal"})


class Store:
    """Verified entries of one kind: ``store(key, objects, manifest)`` and ``load(key) -> Entry | None``."""

    def __init__(self, root: str | Path, kind: str, describes: Callable[[str, dict], bool] | None = None) -> None:
        """``describes(key, manifest)``: whether an entry's manifest says it is what ``key`` names (else corrupt)."""
        self.root, self.kind, self.describes = Path(root), kind, describes

    def path(self, key: str) -> Path:
        return self.root / self.kind / key

    def load(self, key: str) -> Entry | None:
        """The entry, or None if absent; a corrupt one is reported, removed and None returned. An entry another
        process replaced while this one read it is read again, never removed."""
        folder = self.path(key)
        for _ in range(3):
            try:
                seen = _identity(folder)
            except FileNotFoundError:
                return None
            try:
                return self._read(key, folder)
            except Exception as exc:  # unreadable, truncated, flipped bytes, missing files: all corrupt
                try:
                    if _identity(folder) != seen:  # replaced meanwhile by a writer: read the new one
                        continue
                except FileNotFoundError:  # moved out of the way by a writer that replaces it
                    return None
                log.warning("%s cache entry %s is corrupt (%s: %s); removing it and building it again", self.kind,
                            folder, type(exc).__name__, exc)
                self._discard(folder)
                return None
        return None

    def _discard(self, folder: Path) -> None:
        """Out of the way in one rename (a reader sees the entry whole or absent), then deleted."""
        trash = folder.parent / f".trash.{folder.name}.{secrets.token_hex(4)}"
        try:
            folder.rename(trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def _read(self, key: str, folder: Path) -> Entry:
        """The verified entry in ``folder``; raises if anything in it is not what it should be."""
        manifest = json.loads((folder / "manifest.json").read_text())
        if manifest.get("key") != key:  # another entry's folder copied or renamed here
            raise ValueError(f"its manifest is entry {manifest.get('key')}'s")
        files = manifest["files"]
        if not files:
            raise ValueError("its manifest lists no files")
        if self.describes is not None and not self.describes(key, manifest):
            raise ValueError("it is not what its key describes")
        if "seal" in manifest and manifest["seal"] != seal(manifest):  # e.g. its undefended metrics edited
            raise ValueError("its manifest was changed after it was written")
        for name, digest in files.items():
            if not (folder / name).is_file():
                raise ValueError(f"{name} missing")
            if sha256_file(folder / name) != digest:
                raise ValueError(f"{name} does not match its hash")
        objects = {name[: -len(".pt")]: torch.load(folder / name, map_location="cpu", weights_only=True)
                   for name in files}
        if "seal" not in manifest:  # written before manifests were sealed: sealed now, checked from now on
            manifest["seal"] = seal(manifest)
            try:
                atomic_write_json(folder / "manifest.json", manifest)
                log.info("%s cache entry %s: manifest sealed", self.kind, folder)
            except OSError:  # a read-only cache is checked by its files' hashes alone
                pass
        return Entry(objects, manifest)

    def store(self, key: str, objects: dict[str, Any], manifest: dict[str, Any]) -> Entry:
        folder = self.path(key)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{key}."))  # unique: concurrent writers never clash
        try:
            for name, obj in objects.items():
                torch.save(obj, tmp / f"{name}.pt")
                umask_mode(tmp / f"{name}.pt")
            manifest = {**manifest, "key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "files": {f"{name}.pt": sha256_file(tmp / f"{name}.pt") for name in objects}}
            manifest["seal"] = seal(manifest)
            atomic_write_json(tmp / "manifest.json", manifest)
            umask_mode(tmp)
            if folder.exists():  # a corrupt or stale entry: replace it
                self._discard(folder)
            self._move_in(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Entry(objects, manifest)

    @staticmethod
    def _move_in(tmp: Path, folder: Path, tries: int = 50) -> None:
        """Rename ``tmp`` to ``folder``; if another writer's entry is there, keep it (the same content: its key is
        its content). That entry can itself be moved aside by a third writer between the failed rename and the look,
        so an empty place is tried again rather than taken for an error."""
        for attempt in range(tries):
            try:
                tmp.rename(folder)
                return
            except OSError:
                if folder.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)
                    return
                if attempt == tries - 1:  # not a race: a real failure (permissions, a full disk), said as it is
                    raise


def spec_digests_to_key(key: str, manifest: dict) -> bool:
    """A poisoned model's key is the digest of its ``spec``: another seed's model folder renamed under this key,
    manifest and all, is refused."""
    return sha256_json(manifest.get("spec"))[:len(key)] == key


@dataclass
class TrainingCheckpoint:
    """``train``'s checkpoint for one poisoned model (``bdbench.train.Checkpoint``), a verified cache entry."""

    store: Store
    key: str

    def load(self) -> dict[str, Any] | None:
        entry = self.store.load(self.key)
        return None if entry is None else entry.objects["state"]

    def save(self, state: dict[str, Any]) -> None:
        self.store.store(self.key, {"state": state}, {"epochs": len(state["history"])})

    def remove(self) -> None:
        shutil.rmtree(self.store.path(self.key), ignore_errors=True)


@dataclass
class CacheEntry:
    weights: dict[str, torch.Tensor]
    attack_state: dict[str, Any]
    manifest: dict[str, Any]


class ModelCache:
    """The cache folder of a run: poisoned models, synthetic sets, decoded data sets, and their locks."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.models = Store(self.root, "models", describes=spec_digests_to_key)
        self.synthetic, self.datasets, self.reversals, self.training, self.salts = (
            Store(self.root, k) for k in ("synthetic", "datasets", "reversals", "training", "salts"))

    def path(self, key: str) -> Path:
        return self.models.path(key)

    @contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Exclusive across processes, and across hosts on a shared file system with working locks (NFS, Lustre
        mounted with ``flock``).

        The rule for a holder that dies: the lock is the kernel's (``flock``), never a file's existence, so it is
        released when its holder's process ends however it ends (SIGKILL, OOM, a preempted job); on NFS, when the
        server's lease for a dead node runs out (90 s by default on NFSv4). A stale lock file is only a name: the
        next process takes it at once. A waiter logs who holds it (host, pid, since when), read from the file.
        A file system without locks is refused in one line, never silently run unlocked.
        """
        lock_path = self.root / "locks" / f"{key}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "a process that has not written its name yet"
                log.info("waiting for %s: held by %s", key[:40], holder)
                fcntl.flock(f, fcntl.LOCK_EX)
            except OSError as exc:  # ENOLCK, EOPNOTSUPP: e.g. Lustre without -o flock, NFS without lockd
                raise ConfigError(f"paths.cache={self.root}: its file system does not support file locks "
                                  f"({exc.strerror}); valid: a folder on one that does (a local disk, NFS with "
                                  f"locking, Lustre mounted with -o flock)") from None
            try:
                f.seek(0)
                f.truncate()
                f.write(f"{socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
                f.flush()
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def salt(self, key: str) -> bytes:
        """The model's secret: 32 random bytes drawn on first use and kept beside the model, so a defense's seed
        (``bdbench.seeding.defense_seed``) is reproducible from the cache and computable from nothing a defense sees."""
        with self.lock(f"salt-{key}"):
            entry = self.salts.load(key)
            if entry is None:
                entry = self.salts.store(key, {"salt": torch.frombuffer(bytearray(secrets.token_bytes(32)),
                                                                        dtype=torch.uint8)}, {"model": key})
        return bytes(entry.objects["salt"].tolist())

    def load(self, key: str) -> CacheEntry | None:
        entry = self.models.load(key)
        return None if entry is None else CacheEntry(entry.objects["weights"], entry.objects["attack"], entry.manifest)

    def store(self, key: str, weights: dict, attack_state: dict, manifest: dict) -> CacheEntry:
        entry = self.models.store(key, {"weights": weights, "attack": attack_state}, manifest)
        return CacheEntry(weights, attack_state, entry.manifest)

    def training_checkpoint(self, key: str) -> TrainingCheckpoint:
        """Where the poisoned model ``key`` keeps its training state between epochs (use under its lock)."""
        return TrainingCheckpoint(self.training, key)

    def load_synthetic(self, key: str) -> dict[str, Any] | None:
        """A cached synthetic clean set (tensors and stats), verified like a model."""
        entry = self.synthetic.load(key)
        return None if entry is None else entry.objects["set"]

    def store_synthetic(self, key: str, entry: dict[str, Any]) -> None:
        self.synthetic.store(key, {"set": entry}, {})
