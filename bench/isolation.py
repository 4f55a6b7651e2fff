"""Each defense runs in a worker process of its own: it receives the model, the clean images, the context and
its own resolved config, and nothing else; it answers with data alone: a JSON header (status, report, peak memory)
and the repaired weights as ``torch.save`` bytes, which the runner reads with ``weights_only`` into its own model
class. Nothing the worker sends is unpickled, so no object a defense made (a model class whose ``forward`` reads
the evaluator's frames, say) ever runs in the runner. The worker is started with ``spawn`` (no copy of the runner's
memory), before it hears of any cell: the test set, the attack (target, trigger, poisoned indices), Hydra's
state, the run's command line and the cache and record paths are never in it, whatever a defense walks
(frames, the garbage collector, module globals, ``sys.argv``, the environment). The worker also isolates
crashes: a defense that segfaults, aborts, runs out of memory or runs past ``worker.timeout`` becomes a
failed cell and the sweep goes on; a fresh worker takes the next cell. Its peak memory is the defense's own.

One worker serves the cells of a process in turn (starting one costs a Python and torch import, ~2.5 s on
2 CPU cores: per cell it would add ~18 minutes to the Fashion-MNIST grid).
"""

from __future__ import annotations

import io
import json
import logging
import os
import resource
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

from multiprocessing import spawn

import torch
import torch.multiprocessing as mp
from torch import nn

from bench.device import retain_freed_memory

log = logging.getLogger(__name__)


class DefenseCrashed(RuntimeError):
    """The worker died (a signal, an abort, the kernel's OOM killer) or ran past its time."""


@dataclass
class Outcome:
    weights: dict[str, torch.Tensor]
    report: dict[str, Any]
    peak_rss_mb: float


MAX_HEADER = 64 * 2**20  # a report is kilobytes; more is not a report


def _send(conn, header: dict, weights: dict[str, torch.Tensor] | None = None) -> None:
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


def _end_when_orphaned(runner: int) -> None:
    """A runner killed by a signal runs no clean-up, and the worker reads its pipe only between cells: without
    this it would compute the cell it holds to the end (minutes, on cores the next sweep needs) for no reader."""
    while os.getppid() == runner:
        time.sleep(1)
    os._exit(0)


def _serve(conn, threads: int, memory_bytes: int | None, runner: int) -> None:
    """The worker's loop: (defense config, model, clean, context) in, (model, report, peak memory) out."""
    threading.Thread(target=_end_when_orphaned, args=(runner,), daemon=True, name="orphan-watch").start()
    sys.argv = ["bdbench-defense-worker"]  # already so (_bare_preparation_data); kept for other start paths
    for name in [k for k in os.environ if k.startswith("BDBENCH_")]:
        del os.environ[name]  # where the cache and data live
    torch.set_num_threads(threads)
    retain_freed_memory()
    if memory_bytes:
        resource.setrlimit(resource.RLIMIT_DATA, (memory_bytes, memory_bytes))
    from hydra.utils import instantiate

    _send(conn, {"status": "ready"})  # worker.timeout counts a defense's time, not this process's start-up
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the runner is gone (a killed sweep): nothing left to serve, nothing to report
            return
        if message is None:
            return
        defense_cfg, model, clean, ctx, seed = message
        _reset_peak_rss()
        try:
            torch.manual_seed(seed)
            defense = instantiate(defense_cfg)
            repaired = defense.apply(model, clean, ctx)
            _send(conn, {"status": "ok", "report": defense.report(), "peak_rss_mb": _peak_rss_mb()},
                  repaired.state_dict())
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the runner as text
            report = {}
            try:
                report = defense.report()
            except Exception:
                pass
            _send(conn, {"status": "error", "kind": type(exc).__name__, "message": str(exc),
                         "trace": traceback.format_exc(limit=8), "report": report})
        del message, model, clean


def _bare_preparation_data(name: str) -> dict:
    """What spawn hands a new process, less what the worker must not have or cannot use: the runner's main
    module (spawn re-runs it, globals and all), its command line, and its start method (inside a joblib
    worker that is 'loky', which a plain process cannot set)."""
    data = _original_preparation_data(name)
    for key in ("init_main_from_path", "init_main_from_name", "start_method"):
        data.pop(key, None)
    data["sys_argv"] = ["bdbench-defense-worker"]
    return data


_original_preparation_data = spawn.get_preparation_data


STARTUP_SECONDS = 300  # spawning and importing torch and bench (~3 s on 2 idle cores)


class DefenseWorker:
    """A spawned worker for defenses; ``run`` raises what the defense raised (FloatingPointError stays one),
    or DefenseCrashed when the process died or timed out."""

    def __init__(self, timeout: float | None, threads: int, memory_gb: float | None) -> None:
        self.timeout, self.threads = timeout, threads
        self.memory = int(memory_gb * 2**30) if memory_gb else None
        self.process = None
        self.conn = None

    def _start(self) -> None:
        context = mp.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, self.threads, self.memory, os.getpid()),
                                       daemon=True, name="bdbench-defense-worker")
        original = spawn.get_preparation_data
        spawn.get_preparation_data = _bare_preparation_data
        try:
            self.process.start()
        finally:
            spawn.get_preparation_data = original
        child.close()
        if not self.conn.poll(STARTUP_SECONDS):
            self.process.kill()
            self.process = self.conn = None
            raise DefenseCrashed(f"defense worker did not start within {STARTUP_SECONDS} s")
        self.conn.recv_bytes(MAX_HEADER)

    def stop(self) -> None:
        if self.process is not None and self.process.is_alive():
            try:
                self.conn.send(None)
                self.process.join(5)
            except OSError:
                pass
            if self.process.is_alive():
                self.process.kill()
        self.process = self.conn = None

    def run(self, defense_cfg: dict, model: nn.Module, clean, ctx, seed: int) -> Outcome:
        if self.process is None or not self.process.is_alive():
            self._start()
        start = time.perf_counter()
        try:
            self.conn.send((defense_cfg, model, clean, ctx, seed))
            ready = self.conn.poll(self.timeout)
            if not ready:
                raise DefenseCrashed(f"defense ran past worker.timeout={self.timeout} s; worker killed")
            reply = json.loads(self.conn.recv_bytes(MAX_HEADER))
            weights = weights_of(self.conn.recv_bytes()) if reply.get("status") == "ok" else None
        except (EOFError, OSError, BrokenPipeError, ConnectionResetError):
            self.process.join(1)
            code = self.process.exitcode
            self.process = self.conn = None
            raise DefenseCrashed(f"defense worker died (exit code {code}, e.g. a signal, an abort or the OOM "
                                 f"killer) after {time.perf_counter() - start:.1f} s") from None
        except DefenseCrashed:
            self.process.kill()
            self.process = self.conn = None
            raise
        if reply.get("status") == "ok":
            return Outcome(weights, reply["report"], reply["peak_rss_mb"])
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
