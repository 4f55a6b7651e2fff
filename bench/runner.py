"""One cell: a Hydra config in, a trustworthy record out (docs/design.md, "One cell").

data -> poisoned model (cache hit, or train and store) -> the defender's clean images (or a
synthetic set at k = 0) -> defense on a copy -> ACC / ASR / RA / DER -> one atomic JSON record.
"""

from __future__ import annotations

import ast
import atexit
import copy
import dataclasses
import hashlib
import functools
import importlib.util
import io
import logging
import resource
import sys
import time
import tokenize
import traceback
from pathlib import Path
from typing import Any, NamedTuple

import torch
from hydra.utils import get_class
from omegaconf import DictConfig

from bdbench import oracle, outcome, records
from bdbench.records import identity
from bdbench.code_versions import ADMITTED, NEUTRAL, PUBLISHED, published_name
from bdbench.augment import Augment
from bdbench.cache import ModelCache, Store
from bdbench.checkpoints import load_checkpoint
from bdbench.columns import ANY
from bdbench.data import DataBundle, ImageSet
from bdbench.device import memory_format
from bdbench.errors import ConfigError
from bdbench.weights import load_weights
from bdbench.fsutil import sha256_file, sha256_json
from bdbench.isolation import DefenseWorker, builtin, describe, resolve_isolation
from bdbench.metrics import der, evaluate, predict
from bdbench.seeding import defense_seed, derive, generator
from bdbench.train import train
from bdbench.validate import Cell, build, checked, display_name, strip_descriptive
from bdbench.defenses.base import CleanData, DefenseContext, shared_step  # the interface, never a concrete defense

log = logging.getLogger(__name__)

# The engine's own modules that shape a trained model; an edit to the code (not the comments) of any invalidates
# the cache.
ENGINE_MODULES = ("bdbench.train", "bdbench.data", "bdbench.augment", "bdbench.models.base", "bdbench.attacks.base",
                  "bdbench.metrics",  # metrics: the cache stores the undefended model's metrics
                  "bdbench.device")   # precision and memory format of training


def source_file(module: str) -> Path:
    """Where a module's source lives (importlib's answer, so plugin packages count as well)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ImportError(f"no source for module {module}")
    return Path(spec.origin)


@functools.cache
def source_text(path: Path) -> str:
    """A source file as this process first read it: the code it runs. A sweep that runs for hours while its
    files are edited keeps its keys (it re-read them per cell, and retrained models under new keys)."""
    return path.read_text()


def behaviour(source: str) -> str:
    """What a module does, without what it says: its text with comments (``tokenize``) and docstrings (``ast``)
    cut out and blank lines dropped, so an edit to a comment or a docstring keeps every cache key and an edit to the
    code changes it. Text, not an AST dump: the dump's fields change between Python versions, the code does not.
    bdbench's own package paths read as published (``published_name``): in dotted names (imports) and in a registry's
    ``builtins=``, the only places its code names them."""
    lines = source.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))

    def at(row: int, col: int, in_bytes: bool = False) -> int:
        line = lines[row - 1] if row <= len(lines) else ""
        return starts[row - 1] + (len(line.encode()[:col].decode()) if in_bytes else col)

    edits = []  # (start, end, what replaces it)
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    for i, t in enumerate(tokens):
        if t.type == tokenize.COMMENT:
            edits.append((at(*t.start), at(*t.end), ""))
        elif t.type == tokenize.NAME and t.string == "bdbench" and not (i and tokens[i - 1].string == "."):
            end, name = t.end, "bdbench"
            if i + 2 < len(tokens) and tokens[i + 1].string == "." and tokens[i + 2].type == tokenize.NAME:
                if published_name(f"bdbench.{tokens[i + 2].string}") != f"bench.{tokens[i + 2].string}":
                    end, name = tokens[i + 2].end, f"bdbench.{tokens[i + 2].string}"
            edits.append((at(*t.start), at(*end), published_name(name)))
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body and \
                isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and \
                isinstance(body[0].value.value, str):
            doc = body[0]
            edits.append((at(doc.lineno, doc.col_offset, True), at(doc.end_lineno, doc.end_col_offset, True), ""))
        if isinstance(node, ast.keyword) and node.arg == "builtins" and isinstance(node.value, ast.Constant) and \
                isinstance(node.value.value, str):
            value = node.value
            start, end = at(value.lineno, value.col_offset, True), at(value.end_lineno, value.end_col_offset, True)
            quote = source[start]
            edits.append((start, end, f"{quote}{published_name(value.value)}{quote}"))
    kept, last = [], 0
    for start, end, replacement in sorted(edits):
        kept.append(source[last:max(last, start)] + replacement)
        last = max(last, end)
    kept.append(source[last:])
    return "\n".join(line.rstrip() for line in "".join(kept).splitlines() if line.strip())


def code_version(*objects: Any, modules: tuple[str, ...] = ()) -> str:
    """Hash of what the engine's training code and the modules defining ``objects`` (their classes and every base
    class outside the standard library: SIG's and LC's shared selection lives in ``bdbench.attacks.clean_label``) or
    named in ``modules`` do, keyed by module name (as published): two files called ``base.py`` in different packages
    are two keys, never one. A version whose code is what the cache's published entries were made with is their
    original key (``PUBLISHED``)."""
    defining = {c.__module__ for o in objects for c in type(o).__mro__}
    names = set(ENGINE_MODULES) | {m for m in defining if m.partition(".")[0] not in sys.stdlib_module_names} | \
        set(modules)
    version = sha256_json({published_name(m): module_version(m) for m in sorted(names)})
    return PUBLISHED.get(version, version)


def module_version(module: str) -> str:
    """The digest of what one module does; after an admitted edit (``bdbench.code_versions.ADMITTED``), the digest of
    the code it stands for."""
    digest = hashlib.sha256(behaviour(source_text(source_file(module))).encode()).hexdigest()
    admitted = ADMITTED.get(module, {})
    while digest in admitted:
        digest = admitted[digest]
    return digest


def cell_budget(cfg: DictConfig) -> int | str:
    """The cell's budget: ``ANY`` for a data-free defense, so every budget of a sweep maps to one cell, run once per
    poisoned model."""
    return ANY if defense_facts(cfg).get("data_free") else int(cfg.budget)


def cell_names(cfg: DictConfig, choices: dict[str, Any]) -> dict[str, Any]:
    names = {g: str(choices[g]) for g in ("dataset", "model", "attack", "defense", "recipe")}
    return {**names, "experiment": str(choices.get("experiment") or "-"), "budget": cell_budget(cfg),
            "seed": int(cfg.seed)}


# where and how it runs, how it is judged, what else is measured beside it
NOT_IDENTITY = ("paths", "device", "hydra", "worker", "monitor", "outcome", "stage", "oracle")


def without_neutral(config: dict) -> dict:
    """A config without the keys added after models and records were published, where they hold the value those
    were made with (``bdbench.code_versions.NEUTRAL``): the published cells and models keep their names and keys."""
    config = copy.deepcopy(config)
    for group, later in NEUTRAL.items():
        node = config.get(group)
        for key, value in later.items():
            if isinstance(node, dict) and key in node and node[key] == value:
                del node[key]
    return config


def cell_config(cfg: DictConfig) -> dict:
    """The resolved config of a cell, without where files live, which device runs it or how it is judged, or a
    later key at its published value; a data-free defense's budget is ``ANY``."""
    config = {key: strip_descriptive(cfg[key]) for key in cfg if key not in NOT_IDENTITY}
    return without_neutral({**config, "budget": cell_budget(cfg)})


def cell_setting(cfg: DictConfig) -> str:
    """What one table row averages over: the cell's config with seed and budget set aside. Both are fixed before
    the config resolves, so a value drawn from the seed (the published grids' target label) is not a setting."""
    canon = copy.deepcopy(cfg)
    canon.seed, canon.budget = 0, 0
    return sha256_json(identity({k: v for k, v in cell_config(canon).items() if k not in ("seed", "budget")}))[:12]


def model_identity(cfg: DictConfig) -> str:
    """What decides a cell's poisoned model, read from its config alone (no model built): cells with the same
    identity share one model. The cache key (``model_key``) adds the code and the precision of a device."""
    return sha256_json({**{g: strip_descriptive(cfg[g]) for g in ("dataset", "model", "attack", "recipe")},
                        "seed": int(cfg.seed)})


def model_stage(cell: Cell) -> str:
    """``stage=model``: the cell's poisoned model trained (or found) in the cache, nothing else and no record; the
    first batch of a sweep on a cluster launcher. A failure is logged, not raised: the cells that need the model
    train it again and record the failure as theirs."""
    cfg = cell.cfg
    start = time.perf_counter()
    try:
        data = cell.dataset.load(cfg.paths.data, cell.device, cfg.paths.cache)
        _, _, info = poisoned_model(cell, data)
    except Exception as exc:
        log.error("model stage failed (%s: %s); the cells that need this model will record it", type(exc).__name__,
                  exc, exc_info=True)
        return f"poisoned model: failed ({type(exc).__name__}: {exc}); its cells will try again"
    return (f"poisoned model {info['key'][:12]}: {'found in the cache' if info['hit'] else 'trained'} "
            f"({time.perf_counter() - start:.0f} s)")


class ModelKey(NamedTuple):
    """The cache key of a cell's poisoned model and what it digests."""

    key: str
    key_spec: dict


def model_key(cell: Cell) -> ModelKey:
    """The cache key of a cell's poisoned model, from its config, code and precision (no model built, no data read).
    The code is the engine's, the attack's, the model's and the data set's module (one outside bdbench.data keys by
    its own)."""
    cfg, attack = cell.cfg, cell.attack
    model_module = get_class(cfg.model._target_).__module__
    key_spec = {**{g: strip_descriptive(cfg[g]) for g in ("dataset", "model", "attack", "recipe")},
                "seed": int(cfg.seed), "precision": cell.precision,
                "code": code_version(attack, cell.dataset, modules=(model_module,))}
    key_spec = without_neutral(key_spec)
    key_spec["dataset"].pop("download", None)
    for key in getattr(attack, "source_files", ()):  # files an attack reads into the model it trains: their contents
        if isinstance(key_spec["attack"].get(key), str):
            key_spec["attack"][key] = sha256_file(Path(key_spec["attack"][key]))
    if attack.checkpoint:  # a model trained elsewhere is the file's content, wherever the file lies
        for key in ("checkpoint", *attack.trigger_files):  # e.g. WaNet's field: its warp, from a file too
            if getattr(attack, key):
                key_spec["attack"][key] = sha256_file(Path(getattr(attack, key)))
        for trained_here in ("recipe", "seed"):
            key_spec.pop(trained_here)
    return ModelKey(sha256_json(key_spec)[:32], key_spec)


@dataclasses.dataclass
class EpochMonitor:
    """``train``'s ``on_epoch`` hook: adds clean test ACC and ASR (and the seconds they took, which are not training
    time) to every ``every``-th epoch's row and the last one's. Returns None: it never stops training."""

    every: int | None
    epochs: int
    test: Any
    attack: Any
    batch_size: int
    precision: str

    def __call__(self, row: dict, model: torch.nn.Module) -> None:
        if not self.every or (row["epoch"] % self.every and row["epoch"] != self.epochs):
            return
        start = time.perf_counter()
        metrics = evaluate(model, self.test, self.attack, self.batch_size, self.precision)
        row.update(test_acc=metrics["acc"], test_asr=metrics["asr"], test_seconds=time.perf_counter() - start)
        log.info("epoch %d: clean test ACC %.4f, ASR %s", row["epoch"], metrics["acc"],
                 "-" if metrics["asr"] is None else f"{metrics['asr']:.4f}")


def poisoned_model(cell: Cell, data: DataBundle) -> tuple[torch.nn.Module, Any, dict]:
    """The poisoned model and its attack (the cell's), from the cache or trained once under the key's lock."""
    cfg, spec, device = cell.cfg, data.spec, cell.device
    attack, recipe, precision = cell.attack, cell.recipe, cell.precision
    key, key_spec = model_key(cell)
    model = cell.new_model()
    cache = ModelCache(cfg.paths.cache)
    with cache.lock(key):
        entry = cache.load(key)
        hit = entry is not None
        if entry is None:
            start = time.perf_counter()
            checkpoint = cache.training_checkpoint(key)  # train()'s state between epochs, gone once the model is stored
            if attack.checkpoint:
                log.info("cache miss %s: loading %s", key[:12], attack.checkpoint)
                source, history = load_checkpoint(model, attack.checkpoint), []
                source.update({key: {"path": str(getattr(attack, key)), "sha256": key_spec["attack"][key]}
                               for key in attack.trigger_files if getattr(attack, key)})
                attack.build(spec.shape)  # the trigger is the config's; no training set is poisoned here
                model.to(device).eval()
            else:
                log.info("cache miss %s: training %s on %s (%d epochs)", key[:12], cfg.attack._target_, spec.name,
                         recipe.epochs)
                train_set = attack.prepare(data.train, data.poisonable(), generator(cfg.seed, "poison"))
                monitor = EpochMonitor(cfg.monitor.test_every, recipe.epochs, data.test, attack, recipe.eval_batch_size,
                                       precision)
                prepared = time.perf_counter() - start
                history = train(model, train_set, attack, recipe, spec.augment, generator(cfg.seed, "train", device),
                                on_epoch=monitor, checkpoint=checkpoint)
                source = {"source": "trained"}
            seconds = prepared + history[-1]["elapsed"] if history else 0.0
            undefended = {**evaluate(model, data.test, attack, recipe.eval_batch_size, precision),
                          **attack.extra_metrics(model, data.test, recipe.eval_batch_size, precision)}
            entry = cache.store(key, {k: v.cpu() for k, v in model.state_dict().items()}, attack.state_dict(),
                                {"spec": key_spec, "history": history, "train_seconds": seconds, "source": source,
                                 "undefended": undefended, "attack_report": attack.report()})
            checkpoint.remove()
        else:
            log.info("cache hit %s", key[:12])
            model.load_state_dict(entry.weights)
            attack.load_state_dict(entry.attack_state)
    # Defenses and evaluation run in the recipe's memory format, whether the model was trained here or loaded.
    model.to(device=device, memory_format=memory_format(recipe.channels_last)).eval()
    attack.to(device)
    undefended = entry.manifest["undefended"]
    if hit:
        undefended = measured_undefended(key, entry.manifest, model, attack, data.test, recipe.eval_batch_size,
                                         precision)
    # The attack's report is the one written at training time: a reloaded attack has no training history.
    info = {"key": key, "hit": hit, "train_seconds": entry.manifest["train_seconds"],
            "source": entry.manifest.get("source", {"source": "trained"}),
            "undefended": undefended, "history": entry.manifest["history"],
            "attack_report": entry.manifest["attack_report"]}
    return model, attack, info


_UNDEFENDED: dict[tuple[str, str], dict] = {}
DISAGREE = 0.002  # of a metric (20 of 10,000 test images): more than another CPU's float path moves it


def measured_undefended(key: str, manifest: dict, model: torch.nn.Module, attack: Any, test: ImageSet, batch_size: int,
                        precision: str) -> dict:
    """A cached model's own ACC, ASR and RA, measured from its weights (once a process), not copied from its
    manifest: a record's numbers before and after a defense then come from one evaluation path, and a manifest
    edited and sealed again cannot put its numbers into records. A disagreement with the manifest is logged."""
    ident = (key, manifest["files"]["weights.pt"])
    if ident not in _UNDEFENDED:
        measured = {**evaluate(model, test, RememberedTrigger(attack, key), batch_size, precision),
                    **attack.extra_metrics(model, test, batch_size, precision)}
        recorded = manifest["undefended"]
        apart = [name for name, value in measured.items() if isinstance(value, float) and
                 (not isinstance(recorded.get(name), float) or abs(value - recorded[name]) > DISAGREE)]
        if apart:
            log.warning("model %s: its manifest says %s, its weights give %s; the records take the measured ones",
                        key[:12], {n: recorded.get(n) for n in apart}, {n: measured[n] for n in apart})
        _UNDEFENDED[ident] = measured
    return _UNDEFENDED[ident]


class RememberedTrigger:
    """The attack as the cell's evaluation sees it: triggered test images are kept for the poisoned model.

    Every cell of a poisoned model triggers the same test images with the same trigger. For Input-aware that is
    two generator passes per image: 13.5 s of a Fashion-MNIST cell's 14.6 s of evaluation, 8 of a seed's 10 min of
    evaluation (the published grid's records). The model's cache key fixes the trigger, and a batch is compared
    in full before its triggered copy is reused, so every metric is the one a fresh pass gives. Only the last
    model's images are kept (a sweep runs a model's cells one after another).
    """

    _key: str | None = None
    _seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __init__(self, attack: Any, key: str) -> None:
        self.attack, self.target, self.backdoor_labels = attack, attack.target, attack.backdoor_labels
        if RememberedTrigger._key != key:
            RememberedTrigger._key, RememberedTrigger._seen = key, []

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        for seen, triggered in RememberedTrigger._seen:
            if seen.shape == x.shape and seen.device == x.device and torch.equal(seen, x):
                return triggered
        triggered = self.attack.apply_trigger(x)
        RememberedTrigger._seen.append((x.clone(), triggered))
        return triggered


_WORKERS: dict[tuple, DefenseWorker] = {}


def defense_worker(settings: DictConfig, paths: DictConfig) -> DefenseWorker:
    """This process's defense worker for these settings (started on first use, stopped at exit); the sandbox
    hides the data, the cache, the records and the output folder."""
    hidden = tuple(Path(p).absolute() for p in (paths.data, paths.cache, paths.records, paths.output))
    isolation = resolve_isolation(settings.isolation)
    key = (settings.timeout, settings.threads, settings.memory_gb, isolation, hidden)
    if key not in _WORKERS:
        _WORKERS[key] = DefenseWorker(settings.timeout, settings.threads or torch.get_num_threads(), settings.memory_gb,
                                      isolation, list(hidden))
        atexit.register(_WORKERS[key].stop)
    return _WORKERS[key]


_FACTS: dict[str, dict] = {}


def defense_facts(cfg: DictConfig) -> dict:
    """``bdbench.isolation.describe`` of the cell's defense (its settings' error, data-free, shared steps), once per
    config in this process: in the runner for bdbench's own defenses, in the cell's defense worker for a plugin's,
    so a plugin's module is never imported here (unless ``worker.isolation=none``, which runs the defense here too)."""
    node = strip_descriptive(cfg.defense)
    isolation = resolve_isolation(cfg.worker.isolation)
    key = sha256_json([node, isolation == "none"])
    if key not in _FACTS:
        if builtin(node) or isolation == "none":
            _FACTS[key] = describe(node)
        else:
            _FACTS[key] = defense_worker(cfg.worker, cfg.paths).describe(node)
    return _FACTS[key]


def cell_path(cfg: DictConfig, choices: dict[str, Any]) -> Path:
    """Where a cell's record lives: named by the cell, unique by its resolved config."""
    return records.record_path(cfg.paths.records, cell_names(cfg, choices), sha256_json(identity(cell_config(cfg))))


def run_cell(cfg: DictConfig, choices: dict[str, Any], models: dict[str, torch.nn.Module] | None = None) -> dict:
    """Run one cell (or return its existing record) and write its record atomically.

    Bad input raises ConfigError before any compute. Any other failure, in any phase (data, training the
    poisoned model, synthesis, defense, evaluation), becomes a ``failed`` record and is returned: a sweep
    goes on. One process runs a cell at a time: a second one waits on the cell's lock and reads the record.
    ``models``, when given, receives the ``poisoned`` and ``defended`` models: the cell then runs even where its
    record exists (which stays as it is) and the record returned is this run's.
    """
    cell = checked(cfg, choices)
    path = cell_path(cfg, choices)
    existing = records.read_record(path)
    if existing is not None and models is None:
        log.info("record exists, skipping: %s", path)
        return existing
    with ModelCache(cfg.paths.cache).lock(f"cell-{path.stem}"):
        existing = records.read_record(path)
        if existing is not None and models is None:
            log.info("record written by another process meanwhile, skipping: %s", path)
            return existing
        return _run_cell(cell, path, models, write=existing is None)


def _run_cell(cell: Cell, path: Path, models: dict | None = None, write: bool = True) -> dict:
    cfg, device, precision = cell.cfg, cell.device, cell.precision
    names, config = cell_names(cfg, cell.choices), cell_config(cfg)
    setting = cell_setting(cfg)
    display = {g: display_name(cfg, g, names[g]) for g in ("dataset", "model", "attack", "defense")}
    record: dict[str, Any] = {"cell": {**names, "id": path.stem, "setting": setting}, "display": display,
                              "config": config, "seed": int(cfg.seed)}
    timings: dict[str, float] = {}
    phase, defense = "data", None
    start = t = time.perf_counter()
    try:
        data = cell.dataset.load(cfg.paths.data, device, cfg.paths.cache)
        timings["data"] = time.perf_counter() - start

        phase, t = "train", time.perf_counter()
        model, attack, cache_info = poisoned_model(cell, data)
        timings["train"] = time.perf_counter() - t
        undefended = cache_info["undefended"]

        spec, facts = data.spec, cell.facts
        ctx = DefenseContext(num_classes=spec.num_classes, input_shape=spec.shape, device=device, seed=int(cfg.seed),
                             precision=precision)
        k = 0 if names["budget"] == ANY else int(cfg.budget)
        real = data.budget(k, int(cfg.seed))
        clean = CleanData(real.x.float().div(255), real.y.clone(), source="real" if k > 0 else "none")
        synthesis: dict | None = None
        if k == 0 and not facts["data_free"]:
            phase, t = "synthesis", time.perf_counter()
            clean, synthesis = synthetic_set(cell, model, attack, cache_info["key"], spec.defense_augment, ctx)
            timings["synthesis"] = time.perf_counter() - t

        shared, shared_info = {}, {}
        for name in facts["shared"]:  # steps several defenses share (bdbench.defenses.base.register_shared)
            phase, t = name, time.perf_counter()
            shared[name], shared_info[name] = shared_result(cfg, name, model, clean, cache_info["key"], ctx)
            timings[name] = time.perf_counter() - t
        # The defense's own seed: the runner's steps above ran on the cell's seed, which can name the target
        secret = defense_seed(ModelCache(cfg.paths.cache).salt(cache_info["key"]), int(cfg.seed))
        ctx = dataclasses.replace(ctx, shared=shared, seed=secret)
        record.update({"data_source": clean.source, "defense_images": len(clean), "undefended": undefended,
                       "defense_seed": secret,
                       **shared_info,
                       "attack": cache_info["attack_report"], "synthesis": synthesis,
                       "cache": {k_: cache_info[k_] for k_ in ("key", "hit", "train_seconds", "source")},
                       "training": cache_info["history"]})
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        phase, t = "defense", time.perf_counter()
        seed = derive(secret, "defense")
        isolation = resolve_isolation(cfg.worker.isolation)
        if isolation != "none":
            outcome = defense_worker(cfg.worker, cfg.paths).run(strip_descriptive(cfg.defense), copy.deepcopy(model),
                                                                clean, ctx, seed)
            weights, report, peak_rss = outcome.weights, outcome.report, outcome.peak_rss_mb
        else:
            torch.manual_seed(seed)
            defense = build(cfg.defense)
            weights = defense.apply(copy.deepcopy(model), clean, ctx).state_dict()
            report, peak_rss = defense.report(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        repaired = load_weights(copy.deepcopy(model), weights)  # evaluated in the runner's own model class
        timings["defense"] = time.perf_counter() - t
        if models is not None:
            models.update(poisoned=model, defended=repaired)

        phase, t = "eval", time.perf_counter()
        metrics = evaluate(repaired, data.test, RememberedTrigger(attack, cache_info["key"]),
                           cell.recipe.eval_batch_size, precision)
        metrics["der"] = der(undefended, metrics)
        timings["eval"] = time.perf_counter() - t
        candidates = report.pop("candidates", None)
        if cfg.oracle.acc_ratio is not None:
            phase, t = "oracle", time.perf_counter()
            record["oracle"] = oracle.select(
                model, candidates, undefended, float(cfg.oracle.acc_ratio),
                lambda m: evaluate(m, data.test, RememberedTrigger(attack, cache_info["key"]),
                                   cell.recipe.eval_batch_size, precision)) if candidates else None
            timings["oracle"] = time.perf_counter() - t
    except ConfigError:
        raise  # bad input: one line and exit code 2, no record
    except Exception as exc:
        timings[phase] = time.perf_counter() - t
        if isinstance(exc, FloatingPointError) and phase == "defense":  # a finished cell whose result is "diverged"
            record.update(status="diverged", error=f"FloatingPointError: {exc}", metrics=None,
                          defense=getattr(exc, "report", None) or (defense.report() if defense else {}),
                          timings=timings,
                          env=records.environment(device))
            record.update(judged(record, cell.rule))
            if write:
                records.write_record(path, record)
            log.warning("defense diverged (%s); record written: %s", exc, path)
            return record
        record.update(status="failed", phase=phase, error=traceback.format_exc(limit=8), timings=timings,
                      env=records.environment(device))
        record.update(judged(record, cell.rule))
        if write:
            records.write_record(path, record)
        log.error("cell failed in phase %s (%s: %s); record written: %s", phase, type(exc).__name__, exc, path)
        return record
    timings["total"] = time.perf_counter() - start
    record.update(
        status="ok",
        metrics=metrics,
        defense=report,
        timings=timings,
        isolation=isolation,
        peak_memory={"rss_mb": peak_rss, "isolated": isolation != "none",
                     "cuda_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None},
        env=records.environment(device),
    )
    record.update(judged(record, cell.rule))
    if write:
        records.write_record(path, record)
        log.info("record written: %s", path)
    return record


def judged(record: dict, rule: outcome.Rule) -> dict:
    """The record's outcome under the cell's rule, and the rule itself (bdbench.outcome)."""
    return {"outcome": outcome.of_record(record, rule), "outcome_rule": dataclasses.asdict(rule)}


def synthetic_set(cell: Cell, model, attack, poisoned_key: str, augment: Augment, ctx: DefenseContext
                  ) -> tuple[CleanData, dict]:
    """The budget-0 set of a poisoned model: synthesized once per (model, synthesis config, seed) and
    shared by every defense of that model, like the model itself."""
    cfg, synthesizer = cell.cfg, cell.synthesis
    key = sha256_json({"model": poisoned_key, "synthesis": strip_descriptive(cfg.synthesis), "seed": int(cfg.seed),
                       "precision": ctx.precision, "code": code_version(synthesizer)})[:32]
    cache = ModelCache(cfg.paths.cache)
    with cache.lock(f"synthetic-{key}"):
        entry = cache.load_synthetic(key)
        if entry is None:
            clean = synthesizer(copy.deepcopy(model), ctx)
            stats = {**synthesizer.stats, **_synthesis_diagnostics(model, clean, attack, augment, ctx)}
            entry = {"x": clean.x.cpu(), "y": clean.y.cpu(), "stats": stats}
            cache.store_synthetic(key, entry)
            return clean, {**stats, "cache_hit": False}
    log.info("synthetic set from the cache (%s)", key[:12])
    return (CleanData(entry["x"].to(ctx.device), entry["y"].to(ctx.device), source="synthetic"),
            {**entry["stats"], "cache_hit": True})


def shared_result(cfg: DictConfig, name: str, model, clean: CleanData, poisoned_key: str, ctx: DefenseContext):
    """The result of the shared step ``cfg.defense[name]`` on a poisoned model and a cell's clean images, computed
    once and kept in the verified cache: NC, ℓ∞ and ShapPruning at one budget share one trigger reversal (each used
    to reverse every label again). Returns (result, {key, reused, seconds})."""
    step = build(cfg.defense[name])
    how = shared_step(type(step))
    augment = cfg.defense.get("augment")
    digest = hashlib.sha256(clean.x.detach().cpu().numpy().tobytes() + clean.y.cpu().numpy().tobytes()).hexdigest()
    key = sha256_json({"model": poisoned_key, "clean": digest, "source": clean.source,
                       name: strip_descriptive(cfg.defense[name]),
                       "augment": strip_descriptive(augment) if augment is not None else None,
                       "seed": int(cfg.seed), "precision": ctx.precision, "code": code_version(step)})[:32]
    store = Store(cfg.paths.cache, how.kind)
    start = time.perf_counter()
    with ModelCache(cfg.paths.cache).lock(f"{name}-{key}"):
        entry = store.load(key)
        if entry is None:
            result = step(copy.deepcopy(model).eval(), clean, build(augment) if augment is not None else None, ctx)
            fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
            store.store(key, {name: {k: v.cpu() if torch.is_tensor(v) else v for k, v in fields.items()}}, {})
            return result, {"key": key, "reused": False, "seconds": time.perf_counter() - start}
    fields = {k: v.to(ctx.device) if torch.is_tensor(v) else v for k, v in entry.objects[name].items()}
    return how.result(**fields), {"key": key, "reused": True, "seconds": time.perf_counter() - start}


def _synthesis_diagnostics(model, clean, attack, augment: Augment, ctx) -> dict:
    """``syn_to_target`` (docs/defense_methods.md §1.4): the evaluator's warning that the synthetic set carries the
    trigger: non-target syntheses that the backdoored model puts in the target class after a crop."""
    if attack.target is None:
        return {"syn_to_target": None}
    wanted = attack.backdoor_labels(clean.y)
    keep = clean.y != wanted
    x = Augment(crop_padding=augment.crop_padding, hflip=False)(clean.x[keep], ctx.generator("syn_to_target"))
    pred = predict(model, (x * 255).round().to(torch.uint8))
    rate = (pred == wanted[keep]).float().mean().item()
    if rate > 0.2:
        log.warning("syn_to_target = %.2f > 0.2: the synthetic set may carry the trigger", rate)
    return {"syn_to_target": rate}


def summary(record: dict) -> str:
    """One line for the terminal: ACC / ASR before and after."""
    fmt = lambda v: "  -  " if v is None else f"{100 * v:5.1f}"
    c = record["cell"]
    if record["status"] == "failed":
        error = (record.get("error") or "").strip().splitlines()
        return (f"{c['dataset']} {c['model']} {c['attack']} + {c['defense']} k={c['budget']} seed={c['seed']}: "
                f"FAILED in phase {record.get('phase', '?')} ({error[-1] if error else '?'})")
    u, m = record["undefended"], record["metrics"]
    if record["status"] == "diverged":
        return (f"{c['dataset']} {c['model']} {c['attack']} + {c['defense']} k={c['budget']} seed={c['seed']}: "
                f"DIVERGED ({record['error']})")
    der_ = m.get("der")
    return (f"{c['dataset']} {c['model']} {c['attack']} + {c['defense']} k={c['budget']} seed={c['seed']}: "
            f"ACC {fmt(u['acc'])} -> {fmt(m['acc'])}  ASR {fmt(u['asr'])} -> {fmt(m['asr'])}  "
            f"RA {fmt(u['ra'])} -> {fmt(m['ra'])}  DER {fmt(der_)}  "
            f"({'no data: data-free' if record['data_source'] == 'none' else record['data_source'] + ' data'})"
            + {"collapsed": "  COLLAPSED (one class or chance: not a defense)",
               "damaged": f"  DAMAGED (ACC more than {record.get('outcome_rule', {}).get('max_acc_drop')} points "
                          f"below the undefended model: not a defense)",
               "no backdoor": "  NO BACKDOOR (the poisoned model's own ASR is low: nothing to remove)"}.get(
                record.get("outcome") or outcome.of_record(record), ""))


def fail(message: str) -> None:
    print(f"bdbench: error: {message}", file=sys.stderr)
    sys.exit(2)
