"""A defense sees only what a defender has, and a defense that crashes is a failed cell, not a dead sweep.
Each defense runs in a spawned worker process (bench/isolation.py); these defenses try hard to break out."""

from __future__ import annotations

import gc
import inspect
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from bdbench.isolation import sandbox_unavailable
from bdbench.runner import run_cell
from bdbench.defenses.base import Defense

SANDBOX = pytest.param("sandbox", marks=pytest.mark.skipif(sandbox_unavailable() is not None,
                                                           reason=f"no sandbox here: {sandbox_unavailable()}"))


class Snoop(Defense):
    """Walks everything a process can reach and reports what it found (its report is its only way out)."""

    def __init__(self, files: list[str], runner: int) -> None:
        self.files, self.runner = files, runner

    def repair(self, model, clean, ctx):
        from bdbench.attacks.base import Attack
        from bdbench.data import DataBundle, ImageSet

        found = {"frames": [f.function for f in inspect.stack()], "argv": sys.argv,
                 "env": sorted(k for k in os.environ if k.startswith("BDBENCH"))}
        objects = gc.get_objects()
        found["attacks"] = sum(isinstance(o, Attack) for o in objects)
        found["data_sets"] = sum(isinstance(o, (ImageSet, DataBundle)) for o in objects)
        found["image_batches"] = sorted({tuple(o.shape) for o in objects if isinstance(o, torch.Tensor)
                                         and o.dim() == 4 and o.dtype == torch.uint8})
        found["configs"] = sum(type(o).__name__ == "DictConfig" and isinstance(o.__dict__.get("_content"), dict)
                               and any(k in o.__dict__["_content"] for k in ("attack", "paths", "dataset"))
                               for o in objects)  # the run's config (Hydra's own schemas hold none of these)
        found["read_cache"] = len(sys.modules["bdbench.data"]._READ_CACHE) if "bdbench.data" in sys.modules else 0
        from hydra.core.global_hydra import GlobalHydra

        found["hydra"] = GlobalHydra.instance().is_initialized()
        found["modules_with_attack"] = sorted(name for name, m in list(sys.modules.items())
                                             if any(isinstance(v, Attack) for v in vars(m).values()))
        found["clean"] = list(clean.x.shape)
        found["readable"] = [path for path in [*self.files, f"/proc/{self.runner}/cmdline",
                                               f"/proc/{self.runner}/environ", f"/proc/{self.runner}/mem"]
                             if _readable(path)]
        return {"found": found}


def _readable(path: str) -> bool:
    try:
        if os.path.isdir(path):
            return bool(os.listdir(path))
        with open(path, "rb") as f:
            return bool(f.read(1))
    except OSError:
        return False


def _secrets(cfg) -> list[str]:
    """What a cheating defense would read: the data folder and its files, the cache (models with their targets,
    the attack's stamp and poisoned indices) and the records."""
    data = sorted(Path(cfg.paths.data).glob("*/*"))[:20]  # the data sets' files (CIFAR-10's JPEG folders: 60,000)
    files = [cfg.paths.data, *map(str, data), cfg.paths.cache, cfg.paths.records]
    files += [str(p) for p in Path(cfg.paths.cache).rglob("*") if p.is_file()]
    return files


@pytest.mark.parametrize("isolation", [SANDBOX, "process"])
def test_a_snooping_defense_finds_no_secret(isolation, tiny_cfg, choices):
    """In memory it finds nothing under either isolation; in the sandbox it also cannot read the data folder, the
    cache, the records or the runner's /proc (a plain process can: the issue read 254 MB of the runner's memory)."""
    cfg = tiny_cfg("attack=badnets", "attack.target=3", "budget=2", f"worker.isolation={isolation}")
    run_cell(cfg, {**choices(cfg), "defense": "none"})  # the poisoned model in the cache, a record in the records
    cfg.defense = {"_target_": "test_isolation.Snoop", "files": _secrets(cfg), "runner": os.getpid()}
    record = run_cell(cfg, {**choices(cfg), "defense": "snoop"})
    assert record["status"] == "ok", record.get("error")
    assert record["isolation"] == isolation
    found = record["defense"]["found"]
    assert found["attacks"] == 0 and found["data_sets"] == 0 and found["modules_with_attack"] == []
    assert found["image_batches"] == []  # no uint8 image tensor at all: not the test set, not the training set
    assert found["configs"] == 0 and found["read_cache"] == 0 and found["hydra"] is False
    assert found["env"] == [] and "run_cell" not in found["frames"] and "_run_cell" not in found["frames"]
    assert found["clean"] == [20, 1, 16, 16]  # what it was given: 2 clean images per class
    if isolation == "sandbox":
        assert found["readable"] == []
    else:  # what the threat model says a plain process can still reach
        assert f"/proc/{os.getpid()}/cmdline" in found["readable"] and cfg.paths.cache in found["readable"]


FORGER = """
import json, pathlib, sys, time
time.sleep(float(sys.argv[2]))
for path in pathlib.Path(sys.argv[1]).rglob("*.json"):
    record = json.loads(path.read_text())
    record["metrics"]["asr"] = 0.0
    path.write_text(json.dumps(record))
"""


class Forge(Defense):
    """Starts a detached process that rewrites the records after the runner wrote them."""

    def __init__(self, records: str, delay: float) -> None:
        self.records, self.delay = records, delay

    def repair(self, model, clean, ctx):
        import subprocess

        subprocess.Popen([sys.executable, "-c", FORGER, self.records, str(self.delay)], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return {}


@pytest.mark.skipif(sandbox_unavailable() is not None, reason=f"no sandbox here: {sandbox_unavailable()}")
def test_a_detached_process_cannot_forge_the_record(tiny_cfg, choices):
    """A defense's detached child rewrote its record after the runner wrote it (the terminal said ASR 97.8, the
    file 0.0). In the sandbox the records folder does not exist and the child dies with the cell."""
    from bdbench.runner import cell_path

    cfg = tiny_cfg("attack=badnets", "budget=1", "worker.isolation=sandbox")
    cfg.defense = {"_target_": "test_isolation.Forge", "records": cfg.paths.records, "delay": 1.0}
    path = cell_path(cfg, {**choices(cfg), "defense": "forge"})
    record = run_cell(cfg, {**choices(cfg), "defense": "forge"})
    assert record["status"] == "ok" and record["metrics"]["asr"] > 0.5
    time.sleep(3)
    assert json.loads(path.read_text())["metrics"]["asr"] == record["metrics"]["asr"]


class Oracle(torch.nn.Module):
    """A forward that reads the evaluator's frames for the true labels: what a repaired *object* could do."""

    def forward(self, x):
        for frame in inspect.stack():
            for value in frame.frame.f_locals.values():
                y = getattr(value, "y", None)
                if isinstance(y, torch.Tensor) and y.dim() == 1 and len(y) >= len(x) and len(x) > 1:
                    return torch.nn.functional.one_hot(y[:len(x)].long(), 10).float() * 10  # the answers
        return torch.zeros(len(x), 10)


class Cheat(Defense):
    def repair(self, model, clean, ctx):
        model.__class__ = Oracle  # the repair: same weights, a forward of its own
        return {}


class Regrow(Defense):
    def repair(self, model, clean, ctx):
        model.extra = torch.nn.Linear(3, 3)  # weights the architecture does not have
        return {}


@pytest.mark.parametrize("isolation", [SANDBOX, "none"])
def test_a_repaired_object_never_runs_only_its_weights_do(isolation, tiny_cfg, choices):
    """The runner unpickled the model a defense returned and ran its forward: ACC 83.9 -> 100, ASR 100 -> 0 with a
    class that read the test labels from the evaluator's frames. Now only its weights come back, into the runner's
    own class: the cheat's numbers are the undefended model's."""
    cfg = tiny_cfg("attack=badnets", "budget=1", f"worker.isolation={isolation}")
    cfg.defense = {"_target_": "test_isolation.Cheat"}
    record = run_cell(cfg, {**choices(cfg), "defense": "cheat"})
    assert record["status"] == "ok", record.get("error")
    assert record["metrics"]["acc"] == pytest.approx(record["undefended"]["acc"])
    assert record["metrics"]["asr"] == pytest.approx(record["undefended"]["asr"]) and record["metrics"]["asr"] > 0.5
    cfg.defense = {"_target_": "test_isolation.Regrow"}
    refused = run_cell(cfg, {**choices(cfg), "defense": "regrow"})
    assert refused["status"] == "failed" and "repaired weights do not fit" in refused["error"]
    assert "extra.weight" in refused["error"]


class Abort(Defense):
    def repair(self, model, clean, ctx):
        os.abort()


class Hog(Defense):
    def repair(self, model, clean, ctx):
        hoard = []
        while True:
            hoard.append(torch.ones(2**26))  # 256 MB a step, without bound


class Hang(Defense):
    def repair(self, model, clean, ctx):
        time.sleep(600)


@pytest.mark.parametrize("name, settings, error", [
    ("abort", {}, "defense worker died (signal 6, SIGABRT"),
    ("hog", {"memory_gb": 3}, "alloc"),
    ("hang", {"timeout": 3}, "ran past worker.timeout=3"),
])
def test_a_crashing_defense_is_a_failed_cell_and_the_next_cell_runs(name, settings, error, tiny_cfg, choices):
    settings = {"isolation": "auto", **settings}
    cfg = tiny_cfg("budget=1", *(f"worker.{k}={v}" for k, v in settings.items()))
    cfg.defense = {"_target_": f"test_isolation.{name.capitalize()}"}
    failed = run_cell(cfg, {**choices(cfg), "defense": name})
    assert failed["status"] == "failed" and failed["phase"] == "defense" and error in failed["error"]
    after = run_cell(cfg := tiny_cfg("budget=1", "defense=clp", *(f"worker.{k}={v}" for k, v in settings.items())),
                     choices(cfg))
    assert after["status"] == "ok"


def test_worker_timeout_counts_the_defense_not_the_workers_start(tiny_cfg, choices):
    """A fresh worker spends seconds importing torch; that counted against worker.timeout, so a 0.1-s defense
    under a 1-s limit 'ran past' it, and a cell after a killed worker failed on a busy machine."""
    record = run_cell(cfg := tiny_cfg("budget=1", "defense=clp", "worker.timeout=1", "worker.isolation=auto"),
                      choices(cfg))
    assert record["status"] == "ok", record.get("error")


@pytest.mark.parametrize("isolation", [SANDBOX, "process"])
def test_a_worker_whose_runner_is_gone_exits_quietly(isolation, capfd):
    """A killed sweep closes the worker's socket: the worker ends with exit code 0 and no EOFError traceback."""
    from bdbench.isolation import DefenseWorker

    worker = DefenseWorker(timeout=None, threads=1, memory_gb=None, isolation=isolation)
    worker._start()
    worker.conn.close()  # what the runner's death does to the worker's end of the socket
    assert worker.process.wait(60) == 0
    assert "EOFError" not in capfd.readouterr().err


RUNNER = """
import sys, torch
from bdbench.isolation import DefenseWorker
worker = DefenseWorker(timeout=None, threads=1, memory_gb=None, isolation=sys.argv[1])
worker._start()
print(worker.process.pid, flush=True)
worker.run({"_target_": "test_isolation.Hang"}, torch.nn.Linear(1, 1), None, None, 0)
"""


def descendants(pid: int) -> set[int]:
    """Every living process below ``pid`` (from /proc's parent links)."""
    parents = {}
    for entry in os.listdir("/proc"):
        try:
            parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError, IndexError):
            continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("isolation", [SANDBOX, "process"])
def test_a_worker_ends_when_its_runner_is_killed_mid_cell(isolation):
    """SIGTERM on a sweep (``pkill -f "bdbench -m ..."``) killed the runner, but its worker went on computing the
    cell it had started (minutes of ANP on two cores shared with the next sweep): it only read its pipe between
    cells. The worker (in the sandbox, every process of it) now ends within seconds of its runner's death."""
    import signal
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    runner = subprocess.Popen([sys.executable, "-c", RUNNER, isolation], stdout=subprocess.PIPE, text=True, env=env)
    worker_pid = int(runner.stdout.readline())
    time.sleep(2)  # the worker has the cell and sleeps in Hang.repair
    tree = {pid for pid in {worker_pid} | descendants(worker_pid) if alive(pid)}
    assert worker_pid in tree and len(tree) >= (3 if isolation == "sandbox" else 1), tree  # bwrap, its init, Python
    runner.send_signal(signal.SIGTERM)
    runner.wait(30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not any(alive(pid) for pid in tree):
            return
        time.sleep(0.2)
    for pid in tree:
        os.kill(pid, signal.SIGKILL)
    pytest.fail(f"worker processes {sorted(p for p in tree if alive(p))} outlived their killed runner by 30 s")


def test_without_a_sandbox_auto_runs_a_process_and_says_so_and_sandbox_is_refused(monkeypatch, caplog):
    from bdbench import isolation
    from bdbench.errors import ConfigError

    monkeypatch.setattr(isolation, "sandbox_unavailable", lambda: "bubblewrap (bwrap) is not installed")
    with caplog.at_level("WARNING", logger="bdbench.isolation"):
        assert isolation.resolve_isolation("auto") == "process" == isolation.resolve_isolation("auto")
    assert "isolation: process" in caplog.text and "bwrap" in caplog.text
    assert caplog.text.count("isolation: process") == 1  # one line a run, not one a cell
    with pytest.raises(ConfigError, match="worker.isolation=sandbox: bubblewrap .* valid here: auto, process, none"):
        isolation.resolve_isolation("sandbox")


class SeedProbe(Defense):
    def repair(self, model, clean, ctx):
        return {"ctx_seed": ctx.seed, "torch_seed": torch.initial_seed()}


def test_the_defense_seed_is_one_way_from_the_cells_seed_and_reproducible_from_the_cache(tiny_cfg, choices, tmp_path):
    """ctx.seed was the cell's seed, and the published grids draw the target from it (target_of_seed). Now it is
    derived under a secret salt kept beside the model: the same cache gives the same seed, another cache (another
    salt) another one for the same cell, so it is no function of the cell's seed a defense could invert."""
    from bdbench.runner import cell_path
    from bdbench.seeding import derive

    cfg = tiny_cfg("attack=badnets", "budget=1", "seed=0", "worker.isolation=auto")
    cfg.defense = {"_target_": "test_isolation.SeedProbe"}
    cell = {**choices(cfg), "defense": "seedprobe"}
    first = run_cell(cfg, cell)
    seen = first["defense"]
    assert seen["ctx_seed"] == first["defense_seed"] and seen["ctx_seed"] not in range(2**20)
    assert seen["torch_seed"] == derive(seen["ctx_seed"], "defense") != derive(0, "defense")
    cell_path(cfg, cell).unlink()
    assert run_cell(cfg, cell)["defense"]["ctx_seed"] == seen["ctx_seed"]  # reproducible from the cache
    cfg.paths.cache, cfg.paths.records = str(tmp_path / "other-cache"), str(tmp_path / "other-records")
    other = run_cell(cfg, cell)
    assert other["undefended"] == first["undefended"]  # the same model, trained again
    assert other["defense"]["ctx_seed"] != seen["ctx_seed"]  # another salt


SPY = '''
from bdbench.schema import Positive
from bdbench.defenses.base import Defense


class Spy(Defense):
    """A plugin's defense: its module must never be imported by the runner, only by a defense worker."""

    data_free = True

    def __init__(self, lr: Positive = 0.1) -> None:
        self.lr = lr

    def repair(self, model, clean, ctx):
        return {"lr": self.lr}
'''


@pytest.mark.parametrize("isolation", [SANDBOX, "process"])
def test_a_plugins_module_is_imported_by_its_worker_never_by_the_runner(isolation, tiny_cfg, choices, tmp_path,
                                                                        monkeypatch):
    """Validation checks a plugin defense's settings, and the runner learns it is data-free (its cell's budget is
    ``any``), from the defense worker: the plugin's module is never in the runner's ``sys.modules`` (validation
    used to build the defense in the runner, and the runner asked its class whether it was data-free)."""
    from bdbench.errors import ConfigError
    from bdbench.validate import validate

    (tmp_path / "plugin").mkdir()
    (tmp_path / "plugin" / "spy_plugin.py").write_text(SPY)
    monkeypatch.syspath_prepend(str(tmp_path / "plugin"))
    cfg = tiny_cfg("attack=badnets", "budget=2", f"worker.isolation={isolation}")
    cfg.defense = {"_target_": "spy_plugin.Spy", "lr": -1.0}
    with pytest.raises(ConfigError, match=r"defense.lr=-1.0: invalid; valid: .* \(as Spy declares it\)"):
        validate(cfg, {**choices(cfg), "defense": "spy"})
    cfg.defense = {"_target_": "spy_plugin.Spy", "lr": 0.01}
    record = run_cell(cfg, {**choices(cfg), "defense": "spy"})
    assert record["status"] == "ok", record.get("error")
    assert record["cell"]["budget"] == "any" and record["data_source"] == "none"  # data-free, as the worker said
    assert "spy_plugin" not in sys.modules
