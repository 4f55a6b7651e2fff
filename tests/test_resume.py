"""A sweep killed with SIGKILL and started again with the same command loses nothing and repeats nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import TINY

GRID = ["-m", *TINY, "attack=badnets,blended", "defense=none,ft", "budget=0,1", "seed=0"]
CELLS = {(a, d, k) for a in ("badnets", "blended") for d, ks in (("none", ["any"]), ("ft", [0, 1])) for k in ks}


def command(tmp_path: Path) -> list[str]:
    paths = [f"paths.cache={tmp_path / 'cache'}", f"paths.records={tmp_path / 'records'}",
             f"paths.output={tmp_path / 'outputs'}", "device=cpu"]
    return [sys.executable, "-m", "bdbench.cli", *GRID, *paths]


def finished(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "records").glob("*.json"))


def test_sigkill_mid_sweep_then_resume(tmp_path):
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(command(tmp_path), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while len(finished(tmp_path)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # into the middle of the next cell (a defense, or the second poisoned model's training)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the sweep ended before it could be killed"
    survivors = {p: p.stat().st_mtime_ns for p in finished(tmp_path)}
    assert 3 <= len(survivors) < len(CELLS)
    models_before = {p.name for p in (tmp_path / "cache" / "models").iterdir() if not p.name.startswith(".")}

    second = subprocess.run(command(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    out = second.stdout + second.stderr
    records = [json.loads(p.read_text()) for p in finished(tmp_path)]
    cells = [(r["cell"]["attack"], r["cell"]["defense"], r["cell"]["budget"]) for r in records]
    assert sorted(cells) == sorted(CELLS) and all(r["status"] == "ok" for r in records)  # each exactly once
    assert (f"{len(survivors)} of {len(CELLS)} cells have a record; 2 jobs repeat an earlier job's cell (a data-free "
            f"defense at another budget): not launched") in out
    assert f"Launching {len(CELLS) - len(survivors)} jobs" in out
    assert {p: p.stat().st_mtime_ns for p in survivors} == survivors  # finished records never rewritten
    models_after = {p.name for p in (tmp_path / "cache" / "models").iterdir() if not p.name.startswith(".")}
    assert len(models_after) == 2  # one poisoned model per attack
    trained_again = [key for key in models_before if f"cache miss {key[:12]}" in out]
    assert trained_again == []  # a model stored before the kill is never trained again
    assert out.count("cache miss") == len(models_after - models_before)


def test_parallel_workers_train_a_shared_model_once(tmp_path):
    """Two joblib workers and two cells that need the same poisoned model: the model is trained first, in a job of
    its own, and both cells load it (before, both cells started and one waited on the other's training lock)."""
    paths = [f"paths.cache={tmp_path / 'cache'}", f"paths.records={tmp_path / 'records'}",
             f"paths.output={tmp_path / 'outputs'}", "device=cpu"]
    run = subprocess.run([sys.executable, "-m", "bdbench.cli", "-m", *TINY, "attack=badnets", "defense=none,clp",
                          "budget=1", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", *paths],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in finished(tmp_path)]
    assert sorted(r["cell"]["defense"] for r in records) == ["clp", "none"]
    assert [r["cache"]["hit"] for r in records] == [True, True]  # trained once, by the model job
    out = run.stdout + run.stderr
    assert "1 poisoned model first, one job each" in out and out.count(": trained (") == 1
    assert len(list((tmp_path / "cache" / "models").iterdir())) == 1
    cores = len(__import__("os").sched_getaffinity(0))
    assert {r["env"]["device"]["threads"] for r in records} == {max(1, cores // min(2, cores))}  # no fight for cores


def test_a_hydra_override_does_not_relaunch_recorded_cells(tmp_path):
    """The published grids' command sets the seed as ``hydra.sweeper.params.seed=0``: Hydra's sweeper never sees
    that override in a job, so a job key that kept it matched no job and every recorded cell was launched again
    (192 of 192 on the CIFAR-10 grid, each only to find its record)."""
    paths = [f"paths.cache={tmp_path / 'cache'}", f"paths.records={tmp_path / 'records'}",
             f"paths.output={tmp_path / 'outputs'}", "device=cpu"]
    grid = [sys.executable, "-m", "bdbench.cli", "-m", *TINY, "attack=badnets", "defense=none,clp", "budget=1",
            "+hydra.sweeper.params.seed=0", *paths]
    first = subprocess.run(grid, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0 and len(finished(tmp_path)) == 2, first.stderr[-3000:]
    second = subprocess.run(grid, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    out = second.stdout + second.stderr
    assert second.returncode == 0 and "2 of 2 cells have a record: not launched" in out
    assert "Launching 0 jobs" in out and "record exists, skipping" not in out
