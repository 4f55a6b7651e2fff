"""One JSON record per cell, written atomically; a record that is unreadable, failed or of another
schema is not a finished cell and is run again."""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, entry_points, version
from pathlib import Path
from typing import Any

import torch

from bdbench.fsutil import atomic_write_json, sha256_json

log = logging.getLogger(__name__)

SCHEMA_VERSION = 4  # 2: cell.experiment and cell.setting; 3: metrics.collapsed, guard and reversal reports;
                    # 4: display names, configs with nested _target_ components (schedules, reversal, augment)
READABLE_SCHEMAS = (2, 3, 4)  # what ``bdbench report`` reads: published schema-2 records keep their tables
PACKAGES = ("torch", "torchvision", "hydra-core", "omegaconf", "numpy", "pandas", "bdbench")


def record_path(records_dir: str | Path, names: dict[str, Any], digest: str) -> Path:
    """``<dataset>-<model>-<attack>-<defense>-k<budget>-s<seed>-<hash>.json``: readable and unique."""
    stem = "-".join([names["dataset"], names["model"], names["attack"], names["defense"],
                     f"k{names['budget']}", f"s{names['seed']}", digest[:10]])
    return Path(records_dir) / f"{stem}.json"


# "diverged": the defense's loss went non-finite. Deterministic, so a result to report, not a crash to retry.
FINISHED = ("ok", "diverged")

# The jobs of the running sweep not to launch, as job_key tuples: those whose record exists, and those that repeat
# an earlier job's cell (a data-free defense at another budget). Filled by the CLI's validation pass, read by
# bdbench's sweeper (hydra_plugins.bdbench.sweeper). Here, in a module that is neither run as __main__ nor
# re-executed by Hydra's plugin scan, both see the same set.
NOT_LAUNCHED: set[tuple[str, ...]] = set()
# A sweep on a launcher with several workers: one job per poisoned model that two or more launched cells share and
# the cache lacks, each the overrides of its first cell plus ``stage=model``. bdbench's sweeper launches them as a
# batch of their own before the cells (a dependency, not a wait on the model's lock inside a job that holds a worker).
MODEL_JOBS: list[list[str]] = []
# What the sweeper saw of the sweep it ran, for the CLI's closing lines: its output folder and its launcher.
SWEEP: dict[str, str] = {}


def job_key(overrides: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """A job's identity as its overrides, independent of their order and without Hydra's own: the sweeper's
    jobs never hold ``hydra.sweeper.params.seed=0`` or ``hydra/launcher=parallel``, the command line's may."""
    return tuple(sorted(o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))))


def identity(node: Any) -> Any:
    """What a cell's identity hashes: its config without null values, at every depth. Every configured key is
    required (no Python defaults), so null never stands for an absent key; dropping nulls lets a later version
    add an optional key (``attack.checkpoint: null``) without renaming, and so re-running, every finished cell."""
    if isinstance(node, dict):
        return {k: identity(v) for k, v in node.items() if v is not None}
    if isinstance(node, list):
        return [identity(v) for v in node]
    return node


def misplaced(path: Path, record: dict) -> str | None:
    """Why the record at ``path`` is not that cell's (its name and its config's digest must be the path's), or None.
    A record copied over another cell's file counted as that cell: a table showed one cell's numbers twice."""
    if "cell" not in record:  # claims no cell, so counts as none
        return None
    name = record["cell"].get("id")
    if name != path.stem:
        return f"it names cell {name}, not {path.stem}"
    if "config" in record and sha256_json(identity(record["config"]))[:10] != path.stem[-10:]:
        return "its config is not the one its name digests"
    return None


def read_record(path: Path) -> dict | None:
    """The finished record at ``path``, or None if there is none to trust."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        log.warning("record %s is unreadable; running the cell again", path)
        return None
    if record.get("schema_version") != SCHEMA_VERSION:
        log.warning("record %s has schema %s (now %s); running the cell again", path,
                    record.get("schema_version"), SCHEMA_VERSION)
        return None
    wrong = misplaced(path, record)
    if wrong:
        log.warning("record %s is not this cell's (%s); running the cell again", path, wrong)
        return None
    if record.get("status") not in FINISHED:
        log.info("record %s is a failed cell; running it again", path)
        return None
    return record


def write_record(path: Path, record: dict) -> None:
    atomic_write_json(path, {"schema_version": SCHEMA_VERSION, **record})


@functools.cache
def _git() -> dict[str, Any]:
    """The checkout's commit when this process first asked, i.e. the code it runs (a sweep that runs for hours
    must not name a commit made while it ran)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=5).stdout.strip())
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


_git()  # read once, when the engine is imported: the commit of the code this process runs


@functools.cache
def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux): timings are comparable only between records that share it,
    and Python's ``platform.processor()`` is empty on Linux, which left records saying ``x86_64``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def plugin_versions() -> dict[str, str]:
    """Each installed distribution that adds attacks or defenses, by its name and version (read from its metadata,
    not by importing it)."""
    from bdbench.plugins import GROUPS

    return {ep.dist.name: ep.dist.version for group in GROUPS for ep in entry_points(group=group)
            if ep.dist is not None and ep.dist.name != "bdbench"}


def environment(device: torch.device) -> dict[str, Any]:
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    versions.update(plugin_versions())
    cpu = cpu_name()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    return {
        "python": sys.version.split()[0],
        "packages": versions,
        "platform": platform.platform(),
        "device": {"type": device.type, "name": name, "cpu": cpu, "cores": len(os.sched_getaffinity(0)),
                   "threads": torch.get_num_threads(),
                   "cuda": torch.version.cuda if device.type == "cuda" else None},
        "git": _git(),
    }
