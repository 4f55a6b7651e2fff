"""Each defense runs in a worker process of its own, by default inside a bubblewrap sandbox: it receives the model,
the clean images, the context and its own resolved config, and nothing else; it answers with data alone: a JSON
header (status, report, peak memory) and the repaired weights as ``torch.save`` bytes, which the runner reads with
``weights_only`` into its own model class. Nothing the worker sends is unpickled, so no object a defense made (a
model class whose ``forward`` reads the evaluator's frames, say) ever runs in the runner.

The worker is a fresh Python (``python -I``: no inherited ``sys.argv``, no ``PYTHON*`` variables) with a short list
of environment variables; the test set, the attack, Hydra's state and the run's paths are never in it. In the
sandbox (``worker.isolation=sandbox``; docs/threat-model.md) it also has its own mount, PID, network, IPC and user
namespaces: its filesystem holds only the Python installation, the code of bdbench and of the plugins, and an empty
``/tmp``; the data folder, the cache, the records and the runner's ``/proc`` do not exist there; it has no network
and no capabilities, and it dies with the runner. Why bubblewrap: it is the sandbox Flatpak is built on, a small
setuid-free program in every Linux distribution, and it does in one command what hand-written namespace code would
(pivot_root, a private /proc, dropping capabilities, killing the tree with its parent).

The worker also isolates crashes: a defense that segfaults, aborts, runs out of memory or runs past
``worker.timeout`` becomes a failed cell, the worker (its whole process tree) is killed and the next cell gets a
fresh one. A worker serves consecutive cells of one defense only (starting one costs a Python and torch import,
~3 s on 2 CPU cores): code of one defense never runs beside another defense's cell, and in the sandbox every
process a cell left behind is killed before the next cell.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import json
import logging
import os
import pickle
import resource
import shutil
import signal
import site
import socket
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from glob import glob
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bdbench.errors import ConfigError

log = logging.getLogger(__name__)

ISOLATIONS = ("auto", "sandbox", "process", "none")  # none: the runner's own process (a debugger)
CODE_PACKAGES = ("bdbench", "hydra_plugins")
KEPT_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER",
            "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES")
ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/passwd",
             "/etc/group", "/etc/nsswitch.conf")


class DefenseCrashed(RuntimeError):
    """The worker died (a signal, an abort, the kernel's OOM killer) or ran past its time."""


@dataclass
class Outcome:
    weights: dict[str, torch.Tensor]
    report: dict[str, Any]
    peak_rss_mb: float


MAX_HEADER = 64 * 2**20  # a report is kilobytes; more is not a report


def _send(conn: Connection, header: dict, weights: dict[str, torch.Tensor] | None = None) -> None:
    """One answer as bytes: the JSON header (what records hold: ``default=str`` as records write), then the weights."""
    conn.send_bytes(json.dumps(header, default=str).encode())
    if weights is not None:
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in weights.items()}, buffer)
        conn.send_bytes(buffer.getvalue())


def weights_of(blob: bytes) -> dict[str, torch.Tensor]:
    """Tensors and nothing else: ``weights_only`` refuses any other object the bytes describe."""
    state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError("the defense worker's weights are not a mapping of names to tensors")
    return state


# --- inside the worker ---------------------------------------------------------------------------------------------

def _peak_rss_mb() -> float:
    """The worker's peak resident memory since the last reset (VmHWM), in MiB; ru_maxrss where unreadable."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _end_when_orphaned() -> None:
    """A runner killed by a signal runs no clean-up, and the worker reads its socket only between cells: without
    this it would compute the cell it holds to the end (minutes, on cores the next sweep needs) for no reader.
    (In the sandbox bubblewrap's ``--die-with-parent`` does the same.)"""
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(0)


def _kill_strays() -> None:
    """In the sandbox's PID namespace (bubblewrap's init is 1, the worker 2): every other process is one a cell
    started (a detached child waiting for the next cell, say) and dies before the next cell."""
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in (1, os.getpid()):
            try:
                os.kill(int(entry), signal.SIGKILL)
            except ProcessLookupError:
                pass


def serve(fd: int, threads: int, memory_bytes: int | None, sandboxed: bool) -> None:
    """The worker's loop: (defense config, model, clean, context, seed) in, (weights, report, peak memory) out."""
    from bdbench.device import retain_freed_memory

    threading.Thread(target=_end_when_orphaned, daemon=True, name="orphan-watch").start()
    conn = Connection(fd)
    torch.set_num_threads(threads)
    retain_freed_memory()
    if memory_bytes:
        resource.setrlimit(resource.RLIMIT_DATA, (memory_bytes, memory_bytes))
    from hydra.utils import instantiate

    _send(conn, {"status": "ready"})  # worker.timeout counts a defense's time, not this process's start-up
    while True:
        try:
            message = pickle.loads(conn.recv_bytes())  # plain pickle: tensors by value, no shared memory or fds
        except EOFError:  # the runner is gone (a killed sweep): nothing left to serve, nothing to report
            return
        if message is None:
            return
        if message[0] == "describe":  # the facts the runner needs of a defense, learned here, not there
            _send(conn, {"status": "ok", "facts": describe(message[1])})
            continue
        defense_cfg, model, clean, ctx, seed = message
        _reset_peak_rss()
        defense = None
        try:
            torch.manual_seed(seed)
            defense = instantiate(defense_cfg)
            repaired = defense.apply(model, clean, ctx)
            header = {"status": "ok", "report": defense.report(), "peak_rss_mb": _peak_rss_mb()}
            weights = repaired.state_dict()
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the runner as text
            report = {}
            try:
                report = defense.report()
            except Exception:
                pass
            header = {"status": "error", "kind": type(exc).__name__, "message": str(exc),
                      "trace": traceback.format_exc(limit=8), "report": report}
            weights = None
        if sandboxed:
            _kill_strays()
        _send(conn, header, weights)
        del message, model, clean


def describe(node: dict) -> dict:
    """What the runner needs to know of a defense before its cell runs, computed where the defense's code may run:
    its settings' first error as one line (its schema, then its constructor), whether it is data-free, what it needs
    a model to declare (``Defense.needs``), and which of its nested components are steps the runner computes once
    and shares (``bdbench.defenses.base.register_shared``; only
    bdbench's own classes: a plugin's step runs inside its defense)."""
    from hydra.utils import get_class, instantiate
    from omegaconf import OmegaConf

    from bdbench.validate import check_types, one_line
    from bdbench.defenses.base import shared_step

    try:
        check_types("defense", OmegaConf.create(node))
        defense = instantiate(node)
    except ConfigError as exc:
        return {"error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a constructor's refusal of its own values
        return {"error": str(one_line(exc))}
    shared = [name for name, sub in node.items() if isinstance(sub, dict) and "_target_" in sub
              and builtin(sub) and shared_step(get_class(sub["_target_"]))]
    needs = defense.needs() if callable(getattr(defense, "needs", None)) else {}
    return {"error": None, "data_free": bool(getattr(defense, "data_free", False)), "shared": shared,
            "needs": {str(k): int(v) for k, v in dict(needs).items()}}


def builtin(node: Any) -> bool:
    """Whether every ``_target_`` in a config node names bdbench's own defense-side code (a module of ``bdbench``
    outside ``bdbench.attacks``, judged by name, without importing a module: a plugin's code never runs to answer).
    Anything else is a plugin's, and runs only in a worker."""
    if isinstance(node, dict):
        target = node.get("_target_")
        name = str(target)
        if target is not None and (not name.startswith("bdbench.") or name.startswith("bdbench.attacks.")):
            return False
        return all(builtin(v) for v in node.values())
    if isinstance(node, list):
        return all(builtin(v) for v in node)
    return True


# --- in the runner -------------------------------------------------------------------------------------------------

def _is_related(path: Path, others: list[Path]) -> bool:
    return any(path == o or path in o.parents or o in path.parents for o in others)


CODE_ROOT = "/opt/bdbench"  # where the sandbox mounts the runner's own packages, first on the worker's import path
# Subpackages an editable install maps apart from their parent: mounted beside it (a mount point inside the
# parent's read-only mount cannot be made) and found through the parent's __path__ (hydra_plugins is a namespace).
MAPPED = {"hydra_plugins.bdbench": f"{CODE_ROOT}/hydra_plugins/bdbench",
          **{f"bdbench.{sub}": f"{CODE_ROOT}/.bdbench/{sub}" for sub in ("attacks", "defenses", "conf")}}


def packages() -> dict[str, Path]:
    """The folders of the packages a defense's code comes from, as the runner imports them (an editable install, a
    checkout, a wheel): bdbench's, its Hydra plugin's and each plugin package's, by dotted name."""
    from bdbench.plugins import plugin_packages

    found = {}
    for name in (*CODE_PACKAGES, *MAPPED, *plugin_packages()):
        module = sys.modules.get(name)
        locations = list(getattr(module, "__path__", []) if module else
                         (getattr(importlib.util.find_spec(name), "submodule_search_locations", None) or []))
        if locations and name != "hydra_plugins":  # a namespace: its bdbench portion is the one that matters
            found[name] = Path(locations[0]).resolve()
    return found


def import_paths(hidden: list[Path]) -> list[Path]:
    """The runner's import path and Python installation, less any folder that holds, or lies inside, a hidden one
    (the data, the cache, the records: a project root on the import path is left out whole)."""
    candidates = [sys.base_prefix, sys.prefix, sys.exec_prefix, *site.getsitepackages(), site.getusersitepackages(),
                  *sys.path]
    hidden = [h.resolve() for h in hidden]
    kept: list[Path] = []
    for candidate in candidates:
        path = Path(candidate).resolve() if candidate else None
        if path and path.is_dir() and path != Path("/") and not _is_related(path, hidden) and path not in kept:
            kept.append(path)
    return kept


def sandbox_argv(binds: list[Path], code: dict[str, Path] | None = None) -> list[str]:
    """bubblewrap's command line: new namespaces, no capabilities, a private /proc, /dev and /tmp, the system's
    libraries and ``binds`` read-only, the packages ``code`` under CODE_ROOT, the GPU's device nodes where there
    are any; nothing else of the host."""
    argv = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    for name in ETC_FILES:
        argv += ["--ro-bind-try", name, name]
    nvidia = sorted(glob("/dev/nvidia*"))
    for node in nvidia:
        argv += ["--dev-bind", node, node]
    if nvidia:  # the CUDA driver reads the GPUs' topology from sysfs
        argv += ["--ro-bind", "/sys", "/sys"]
    for path in sorted(set(binds)):
        if not str(path).startswith("/usr/"):
            argv += ["--ro-bind", str(path), str(path)]
    for name, path in (code or {}).items():
        argv += ["--ro-bind", str(path), MAPPED.get(name, f"{CODE_ROOT}/{name}")]
    for path in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep):
        if path:
            argv += ["--ro-bind-try", path, path]
    return argv + ["--chdir", "/tmp", "--"]


@functools.cache
def sandbox_unavailable() -> str | None:
    """Why a sandbox cannot start on this machine (no bubblewrap, or no user namespaces), or None."""
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed (apt-get install bubblewrap)"
    probe = subprocess.run([*sandbox_argv([]), "/usr/bin/true"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        return f"bubblewrap cannot create namespaces here: {probe.stderr.strip().splitlines()[-1:] or probe.returncode}"
    return None


@functools.cache
def _say_once(reason: str) -> None:
    log.warning("defenses run as plain processes, not sandboxed (isolation: process): %s", reason)


def resolve_isolation(name: str) -> str:
    """The isolation a run gets: ``auto`` is the sandbox where it can start, else a plain process, said once."""
    if name not in ISOLATIONS:
        raise ConfigError(f"worker.isolation={name!r}: invalid; valid: {', '.join(ISOLATIONS)}")
    if name in ("auto", "sandbox"):
        reason = sandbox_unavailable()
        if reason is None:
            return "sandbox"
        if name == "sandbox":
            raise ConfigError(f"worker.isolation=sandbox: {reason}; valid here: auto, process, none")
        _say_once(reason)
        return "process"
    return name


STARTUP_SECONDS = 300  # starting Python and importing torch and bench (~3 s on 2 idle cores)


class DefenseWorker:
    """A worker for defenses; ``run`` raises what the defense raised (FloatingPointError stays one), or
    DefenseCrashed when the process died or timed out. ``hidden`` are folders the sandbox must not show."""

    def __init__(self, timeout: float | None, threads: int, memory_gb: float | None, isolation: str = "process",
                 hidden: list[Path] | None = None) -> None:
        if isolation not in ("sandbox", "process"):
            raise ValueError(f"isolation={isolation!r}; valid: sandbox, process")
        self.timeout, self.threads, self.isolation = timeout, threads, isolation
        self.memory = int(memory_gb * 2**30) if memory_gb else None
        self.hidden = list(hidden or [])
        self.process: subprocess.Popen | None = None
        self.conn: Connection | None = None
        self.serving: str | None = None  # the defense whose cells this worker runs

    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        sandboxed = self.isolation == "sandbox"
        paths, code = import_paths(self.hidden), packages()
        # -I leaves out what the runner added to its import path; the runner's own packages come first
        imports = [e for e in sys.path if e and Path(e).resolve() in paths]
        first = [CODE_ROOT] if sandboxed else sorted({str(p.parent) for n, p in code.items() if "." not in n})
        boot = (f"import sys; sys.path[:0] = {first + imports!r}; "
                + (f"import bdbench; bdbench.__path__.append('{CODE_ROOT}/.bdbench'); " if sandboxed else "")
                + f"from bdbench.isolation import serve; serve({theirs.fileno()}, {self.threads}, {self.memory!r}, "
                  f"{sandboxed})")
        argv = [sys.executable, "-I", "-c", boot]
        if sandboxed:
            argv = sandbox_argv(paths, code) + argv
        env = {k: os.environ[k] for k in KEPT_ENV if k in os.environ} | {"HOME": "/tmp", "TMPDIR": "/tmp"}
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(),), env=env,
                                        cwd="/tmp" if not sandboxed else None, start_new_session=True)
        theirs.close()
        self.conn = Connection(ours.detach())
        if not self.conn.poll(STARTUP_SECONDS):
            self.kill()
            raise DefenseCrashed(f"defense worker did not start within {STARTUP_SECONDS} s")
        try:
            self.conn.recv_bytes(MAX_HEADER)
        except (EOFError, OSError):
            code = self.process.wait(10)
            self.process = self.conn = None
            raise DefenseCrashed(f"defense worker ({self.isolation}) exited while starting (exit code {code}); its "
                                 f"error is above") from None

    def _exit_words(self, code: int) -> str:
        """A signal by its name; bubblewrap reports its command's death by signal N as exit code 128 + N."""
        number = -code if code < 0 else code - 128 if self.isolation == "sandbox" and code > 128 else None
        if number is None:
            return f"exit code {code}"
        try:
            return f"signal {number}, {signal.Signals(number).name}"
        except ValueError:
            return f"signal {number}"

    def kill(self) -> None:
        """End the worker and every process it started (its session; in the sandbox, its PID namespace)."""
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.process.wait()
        if self.conn is not None:
            self.conn.close()
        self.process = self.conn = None
        self.serving = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                self.conn.send_bytes(pickle.dumps(None))
                self.process.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()

    def _serve(self, defense_cfg: dict) -> str:
        """A live worker that serves this defense (another defense's code never shares a process with it)."""
        target = str(defense_cfg.get("_target_"))
        if self.serving not in (None, target):
            self.stop()
        if self.process is None or self.process.poll() is not None:
            self._start()
        self.serving = target
        return target

    def describe(self, defense_cfg: dict) -> dict:
        """``describe(defense_cfg)`` run in this worker (which then serves that defense's cells)."""
        target = self._serve(defense_cfg)
        try:
            self.conn.send_bytes(pickle.dumps(("describe", defense_cfg)))
            if not self.conn.poll(STARTUP_SECONDS):
                raise DefenseCrashed(f"defense worker did not describe {target} within {STARTUP_SECONDS} s")
            return json.loads(self.conn.recv_bytes(MAX_HEADER))["facts"]
        except (EOFError, OSError):
            code = self.process.wait(10)
            self.kill()
            raise DefenseCrashed(f"defense worker died ({self._exit_words(code)}) while importing {target}") from None
        except BaseException:
            self.kill()
            raise

    def run(self, defense_cfg: dict, model: nn.Module, clean, ctx, seed: int) -> Outcome:
        self._serve(defense_cfg)
        start = time.perf_counter()
        try:
            self.conn.send_bytes(pickle.dumps((defense_cfg, model, clean, ctx, seed)))
            if not self.conn.poll(self.timeout):
                raise DefenseCrashed(f"defense ran past worker.timeout={self.timeout} s; worker killed")
            reply = json.loads(self.conn.recv_bytes(MAX_HEADER))
            weights = weights_of(self.conn.recv_bytes()) if reply.get("status") == "ok" else None
        except (EOFError, OSError):
            code = self.process.wait(10)
            self.kill()
            raise DefenseCrashed(f"defense worker died ({self._exit_words(code)}: an abort, a crash or the OOM "
                                 f"killer) after {time.perf_counter() - start:.1f} s") from None
        except BaseException:
            self.kill()
            raise
        if reply.get("status") == "ok":
            return Outcome(weights, reply["report"], reply["peak_rss_mb"])
        self.kill()  # a failed defense may have left the process broken (threads, memory): the next cell starts fresh
        kind, message, trace, report = reply["kind"], reply["message"], reply["trace"], reply["report"]
        if kind == "FloatingPointError":
            raise RemoteDivergence(message, report)
        raise RemoteError(f"{kind}: {message}\n--- in the defense worker ---\n{trace}", report)


class RemoteError(RuntimeError):
    def __init__(self, message: str, report: dict) -> None:
        super().__init__(message)
        self.report = report


class RemoteDivergence(FloatingPointError):
    def __init__(self, message: str, report: dict) -> None:
        super().__init__(message)
        self.report = report
