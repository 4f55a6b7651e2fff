"""Sweeps beyond one process: SLURM's path through submitit's local executor (real submitit: pickled jobs, one
process each, its own logs folder), a local Ray cluster, a cache shared by several processes, and a lock whose
holder dies."""

from __future__ import annotations

import importlib.util
import json
import logging
import multiprocessing
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bdbench.cache import ModelCache, Store
from conftest import TINY

GRID = ["-m", *TINY, "attack=badnets", "defense=none,ft", "budget=1", "seed=0", "device=cpu"]


def command(root: Path, *extra: str) -> list[str]:
    paths = [f"paths.cache={root / 'cache'}", f"paths.records={root / 'records'}", f"paths.output={root / 'outputs'}"]
    return [sys.executable, "-m", "bdbench.cli", *GRID, *extra, *paths]


def records(root: Path) -> dict[tuple, dict]:
    found = [json.loads(p.read_text()) for p in sorted((root / "records").glob("*.json"))]
    return {(r["cell"]["attack"], r["cell"]["defense"]): r for r in found}


def job_logs(root: Path) -> str:
    return "".join(p.read_text() for p in (root / "outputs").rglob(".submitit/*/*_log.*"))


@pytest.fixture(scope="module")
def basic_run(tmp_path_factory) -> dict[tuple, dict]:
    """The two cells through Hydra's basic launcher, one thread (as each cluster job runs): the reference."""
    root = tmp_path_factory.mktemp("basic")
    run = subprocess.run(command(root), cwd=root, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    return records(root)


LAUNCHERS = [
    pytest.param(["hydra/launcher=slurm_local"], "LocalLauncher", id="submitit", marks=pytest.mark.skipif(
        importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
        reason="hydra-submitit-launcher not installed (pip install -e '.[dev]')")),
    pytest.param(["hydra/launcher=ray", "+hydra.launcher.init.object_store_memory=100000000"], "RayLauncher", id="ray",
                 marks=pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                          reason="ray not installed (pip install -e '.[dev]')")),
]


@pytest.mark.parametrize("launcher, name", LAUNCHERS)
def test_a_cluster_sweep_trains_each_model_once_first_and_resumes_after_a_kill(tmp_path, basic_run, launcher, name):
    """The basic launcher's two cells through submitit (its local executor) and a local Ray cluster, killed once
    a record is written and run again: the same poisoned model and numbers, the model trained once in a job of its
    own before any cell starts, and the second run launching only the cell without a record."""
    root = tmp_path / "sweep"
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(command(root, *launcher), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.monotonic() + 600
        while not list((root / "records").glob("*.json")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first = (tmp_path / "first.log").read_text()
    assert proc.returncode == -signal.SIGKILL, first[-3000:]
    assert "1 poisoned model first, one job each; the cells follow" in first
    time.sleep(3)  # a job that outlived its sweep would show itself in the records meanwhile
    survivors = {p: p.stat().st_mtime_ns for p in (root / "records").glob("*.json")}
    assert len(survivors) == 1

    second = subprocess.run(command(root, *launcher), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert "1 of 2 cells have a record: not launched" in out
    assert "poisoned model" not in out and "cache miss" not in out  # the model was stored before the kill
    assert f"bdbench: 1 cells launched ({name}), 1 skipped (their record was there); logs: " in out
    assert {p: p.stat().st_mtime_ns for p in survivors} == survivors  # never rewritten

    ours = records(root)
    assert set(ours) == set(basic_run) == {("badnets", "none"), ("badnets", "ft")}
    assert all(r["status"] == "ok" for r in ours.values())
    assert all(r["cache"]["hit"] for r in ours.values())  # no cell trained: the model jobs did, before them
    models = [p for p in (root / "cache" / "models").iterdir() if not p.name.startswith(".")]
    assert len(models) == 1 and not any((root / "cache" / "training").glob("*"))
    logs = first + job_logs(root)  # a killed Ray driver loses its workers' last lines: submitit's are files
    trained = logs.count("cache miss"), logs.count(": trained (")
    assert trained == (1, 1) if name == "LocalLauncher" else max(trained) <= 1  # once, in a job of its own
    assert {r["env"]["device"]["threads"] for r in ours.values()} == {1}
    for cell, record in ours.items():  # the same models, trained the same way
        assert record["cache"]["key"] == basic_run[cell]["cache"]["key"]
        assert record["undefended"] == basic_run[cell]["undefended"]
    assert ours[("badnets", "none")]["metrics"] == basic_run[("badnets", "none")]["metrics"]
    assert ours[("badnets", "none")]["undefended"]["asr"] > 0.8  # the backdoor took


def test_one_model_job_trains_and_writes_no_record(tmp_path):
    """``stage=model`` on its own: the model in the cache, no record; the cell run after it finds the model."""
    run = subprocess.run([sys.executable, "-m", "bdbench.cli", *TINY, "attack=badnets", "device=cpu", "stage=model",
                          f"paths.cache={tmp_path / 'cache'}", f"paths.records={tmp_path / 'records'}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert ": trained (" in run.stdout and not (tmp_path / "records").exists()
    assert len([p for p in (tmp_path / "cache" / "models").iterdir() if not p.name.startswith(".")]) == 1


HOLD = """
import sys, time
from bdbench.cache import ModelCache
with ModelCache(sys.argv[1]).lock("model-x"):
    print("held", flush=True)
    time.sleep(600)
"""

TAKE = """
import logging, sys
from bdbench.cache import ModelCache
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
with ModelCache(sys.argv[1]).lock("model-x"):
    print("taken", flush=True)
"""


def test_a_lock_whose_holder_was_killed_blocks_nobody(tmp_path):
    """A job SIGKILLed while it holds a model's lock (an OOM kill, a preemption): the job waiting for it is told
    who holds it, then takes it as soon as the holder is gone, though the lock file is still there."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    time.sleep(0.2)  # its name is in the lock file once it holds it
    waiter = subprocess.Popen([sys.executable, "-c", TAKE, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert select.select([waiter.stdout], [], [], 60)[0], "the waiter said nothing about the lock it waits for"
    line = waiter.stdout.readline()
    assert line.startswith("waiting for model-x: held by ") and f"pid {holder.pid} since " in line
    time.sleep(0.5)
    assert waiter.poll() is None  # still waiting while the holder lives
    holder.kill()
    holder.wait()
    assert (tmp_path / "locks" / "model-x.lock").exists()
    out, _ = waiter.communicate(timeout=30)
    assert waiter.returncode == 0 and out.strip() == "taken"


def _share_one_entry(root: str, worker: int, rounds: int, queue) -> None:
    """One of several processes that read an entry, build it when absent and now and then rebuild it anyway."""
    corrupt = []
    handler = logging.Handler()
    handler.emit = lambda record: corrupt.append(record.getMessage())
    logging.getLogger("bdbench.cache").addHandler(handler)
    store = Store(root, "models")
    expected = torch.arange(50_000, dtype=torch.float32)
    wrong = 0
    for i in range(rounds):
        entry = store.load("k") if (i + worker) % 3 else None
        if entry is None:
            entry = store.store("k", {"w": expected.clone()}, {"by": worker})
        wrong += not torch.equal(entry.objects["w"], expected)
    queue.put((wrong, len(corrupt)))


def test_several_processes_share_one_cache_entry(tmp_path):
    """Four processes reading and replacing one entry at once: none ever reads a wrong or half-written entry, none
    fails, no read entry is taken for corrupt and removed, and one whole entry is left with nothing beside it.
    (Replacing used to delete the folder and rename the new one in: a concurrent writer's rename then failed, and a
    reader between the two found files missing and removed a good entry.)"""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_share_one_entry, args=(str(tmp_path), w, 40, queue)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert [queue.get(timeout=5) for _ in procs] == [(0, 0)] * 4  # (wrong reads, entries taken for corrupt)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["k"]  # no temp or trash folder left
    entry = Store(tmp_path, "models").load("k")
    assert entry is not None and torch.equal(entry.objects["w"], torch.arange(50_000, dtype=torch.float32))


def test_a_writer_whose_rename_lost_to_an_entry_since_moved_aside_tries_again(tmp_path, monkeypatch):
    """The interleaving CI met with four processes: writer A's rename fails on B's fresh entry, then C moves B's
    aside before A looks. A must try its rename again, not fail its cell on an empty place."""
    store = Store(tmp_path, "models")
    target = store.path("k")
    real_rename = os.rename
    lost = []

    def rename(src, dst, *args, **kwargs):
        if Path(dst) == target and not lost:  # B landed first and C then moved it aside: the place is empty again
            lost.append(src)
            raise OSError(39, "Directory not empty")
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    store.store("k", {"w": torch.ones(3)}, {})
    assert lost, "the rename was never raced"
    entry = store.load("k")
    assert entry is not None and torch.equal(entry.objects["w"], torch.ones(3))
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["k"]


def test_a_file_system_without_locks_is_refused_in_one_line(tmp_path, monkeypatch):
    """Lustre without ``-o flock`` answers flock with ENOLCK: the cell must not run unlocked."""
    import errno
    import fcntl

    from bdbench.errors import ConfigError

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(ConfigError, match=r"paths.cache=.*: its file system does not support file locks"):
        with ModelCache(tmp_path).lock("model-x"):
            pass
