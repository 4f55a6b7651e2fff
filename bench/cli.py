"""``bdbench``: run a cell or a Hydra sweep of cells.

    bdbench [overrides]           one cell (Hydra run)
    bdbench -m [overrides]        a sweep (Hydra multirun); cells whose record exists are skipped
    bdbench list [overrides]      the attacks, defenses, models, data sets and experiments it can compose
    bdbench gallery [overrides]   the trigger gallery of one data set, every attack (cached models; says what
                                  it would train and for how long first; --help)
    bdbench report DIR [--out DIR] [--data DIR] [--cache DIR] [--index]
                                  tables (mean ± std over seeds), figures and the HTML leaderboard from the
                                  records under DIR (--help)
    bdbench reproduction [--published FILE] [--out FILE]
                                  published rows beside bdbench's cells (results/reproduction.md; --help)
    bdbench --version             bdbench's version
    bdbench perf NAME [k=v ...]   a benchmark (conf/perf/NAME.yaml), written to results/perf/

Every job of a sweep is composed and validated before the first one starts: a bad value ends the
command with one line that names it and the valid ones, exit code 2, no traceback.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import sys
import time
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import get_args_parser
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from bdbench import records
from bdbench.code_versions import published_name
from bdbench.device import resolve_device, retain_freed_memory
from bdbench.errors import ConfigError
from bdbench.runner import cell_path, fail, model_stage, run_cell, summary
from bdbench.validate import CONF_DIR, GROUPS, Cell, check_choice, checked, keep_checked, validate

log = logging.getLogger("bdbench")


def expand_jobs(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override list of every job Hydra will launch, sweeper params of the config included."""
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    searchpath = [o.input_line for o in parsed if o.key_or_group == "hydra.searchpath"]
    for o in parsed:  # Hydra refuses these only when it launches, after every job was validated
        if o.is_sweep_override() and o.key_or_group.startswith("hydra."):
            key = o.key_or_group.rpartition(".")[2]
            raise ConfigError(f"{o.input_line}: Hydra cannot sweep its own config; valid: {key}="
                              f"{','.join(o.sweep_string_iterator())} (it replaces the experiment's list for {key})")
    for o in parsed:  # unknown config names first: the clearest message
        if o.key_or_group in GROUPS:
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
            for value in values:
                check_choice(o.key_or_group, value, searchpath)
    if not multirun:
        return [overrides]
    first = [o.input_line if not o.is_sweep_override()
             else f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" for o in parsed]
    base = compose("config", overrides=first, return_hydra_config=True)
    params = [f"{k}={v}" for k, v in (OmegaConf.select(base, "hydra.sweeper.params") or {}).items()]
    return BasicSweeper.split_arguments(parser.parse_overrides(params + overrides), None)[0]


def explain(exc: HydraException, overrides: list[str]) -> ConfigError:
    """One line for a composition error; for a key the config does not have, the keys that node does have."""
    match = re.match(r"Could not override '([^']+)'", str(exc))
    if match:
        key = match.group(1)
        parent = key.rpartition(".")[0]
        try:
            cfg = compose("config", overrides=[o for o in overrides if o.lstrip("+~").split("=")[0] != key])
            node = OmegaConf.select(cfg, parent) if parent else cfg
        except HydraException:
            node = None
        if OmegaConf.is_dict(node):
            valid = sorted(k for k in node.keys() if not str(k).startswith("_"))
            return ConfigError(f"{key}: no such key; valid: {', '.join(f'{parent}.{k}' if parent else k for k in valid)}")
    return ConfigError(str(exc).strip().splitlines()[0])


def validate_jobs(jobs: list[list[str]], cells: list[Cell] | None = None) -> list[Path]:
    """Compose and validate every job (inside an initialized Hydra); their record paths (and their cells, into
    ``cells`` when given). The cells are kept for the jobs that run in this process (``bdbench.validate.checked``).
    Raises ConfigError."""
    try:
        checked_data: set[tuple] = set()
        paths, made = [], []
        for job in jobs:
            try:
                cfg = compose("config", overrides=list(job), return_hydra_config=True)
            except HydraException as exc:
                raise explain(exc, list(job)) from None
            data_key = (cfg.hydra.runtime.choices.dataset, cfg.paths.data)
            made.append(validate(cfg, cfg.hydra.runtime.choices, check_data=data_key not in checked_data))
            checked_data.add(data_key)
            paths.append(cell_path(cfg, cfg.hydra.runtime.choices))
        keep_checked(made)
        if cells is not None:
            cells.extend(made)
        return paths
    except HydraException as exc:
        raise ConfigError(str(exc).strip().splitlines()[0]) from None


def prevalidate(argv: list[str]) -> list[Path] | None:
    """Compose and validate every job before any compute; their record paths (None when no record will be written).
    A sweep's jobs whose record exists, or whose cell an earlier job of the sweep runs (a data-free defense at
    every budget is one cell), go into ``records.NOT_LAUNCHED``: it does not launch them. Raises ConfigError."""
    args = get_args_parser().parse_args(argv)
    if args.multirun and (args.cfg or args.info):  # Hydra ends this in a traceback
        raise ConfigError(f"--{'cfg' if args.cfg else 'info'} shows one cell and cannot be combined with -m; valid: "
                          f"bdbench --cfg job [overrides] (one job of the sweep: its overrides without -m)")
    if args.help or args.hydra_help or args.cfg or args.info or args.shell_completion:
        return None
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        try:
            jobs = expand_jobs(args.overrides, args.multirun)
        except HydraException as exc:
            raise explain(exc, args.overrides) from None
        cells: list[Cell] = []
        paths = validate_jobs(jobs, cells)
    configs = [cell.cfg for cell in cells]
    if all(cfg.stage == "model" for cfg in configs):  # models into the cache (each once): no record to read back
        from bdbench.runner import model_identity

        records.NOT_LAUNCHED.clear()
        seen_models: set[str] = set()
        for job, cfg in zip(jobs, configs):
            model = model_identity(cfg)
            if model in seen_models:
                records.NOT_LAUNCHED.add(records.job_key(job))
            seen_models.add(model)
        return None
    if args.multirun:
        records.NOT_LAUNCHED.clear()
        seen: set[Path] = set()
        for job, path in zip(jobs, paths):
            if path in seen or records.read_record(path) is not None:
                records.NOT_LAUNCHED.add(records.job_key(job))
            seen.add(path)
        launched = [(job, cell) for job, cell in zip(jobs, cells) if records.job_key(job) not in records.NOT_LAUNCHED]
        records.MODEL_JOBS[:] = model_jobs(launched) if launched and several_workers(configs[0]) else []
    return paths


def several_workers(cfg: DictConfig) -> bool:
    """Whether the sweep's launcher runs jobs side by side (joblib, submitit, Ray): anything but Hydra's basic one."""
    return not str(OmegaConf.select(cfg, "hydra.launcher._target_", default="")).endswith(".BasicLauncher")


def model_jobs(launched: list[tuple[list[str], Cell]]) -> list[list[str]]:
    """One ``stage=model`` job per poisoned model that two or more launched cells share and the cache lacks.
    The cache is looked up with this machine's device: a login node without the GPU its jobs run on computes
    another precision's key, and the model job then finds the model in seconds instead of skipping."""
    from bdbench.cache import ModelCache
    from bdbench.runner import model_identity, model_key

    groups: dict[str, list[tuple[list[str], Cell]]] = {}
    for job, cell in launched:
        groups.setdefault(model_identity(cell.cfg), []).append((job, cell))
    wanted = []
    for members in groups.values():
        job, cell = members[0]
        if len(members) < 2:  # one cell trains its own model: no other job waits for it
            continue
        if not ModelCache(cell.cfg.paths.cache).path(model_key(cell).key).is_dir():
            wanted.append([o for o in job if not o.lstrip("+~").startswith(("hydra.", "hydra/", "stage="))]
                          + ["stage=model"])
    return wanted


def closing(paths: list[Path], seconds: float) -> tuple[str, bool]:
    """The closing line of a sweep, read from its records (any launcher) and judged by ``bdbench.outcome``, and
    whether every cell ran to the end. A data-free cell that several jobs share counts once."""
    import json

    from bdbench.outcome import FAILED, NOT_OK, OK, of_record

    counts: dict[str, int] = {}
    failed: list[Path] = []
    cells = list(dict.fromkeys(paths))
    for path in cells:
        try:
            status = of_record(json.loads(path.read_text()))
        except (OSError, ValueError):
            status = "missing"
        counts[status] = counts.get(status, 0) + 1
        if status == FAILED:
            failed.append(path)
    ran = len(cells) - counts.get(FAILED, 0) - counts.get("missing", 0)
    line = (f"bdbench: {len(cells)} cells: {ran} ran to the end ({counts.get(OK, 0)} finished, "
            + ", ".join(f"{counts.get(s, 0)} {s}" for s in NOT_OK if s != FAILED)
            + f"), {counts.get(FAILED, 0)} failed, {counts.get('missing', 0)} missing; {seconds / 60:.1f} min")
    if records.SWEEP:  # a sweep: what was launched where, and where to look
        skipped = len(cells) - (len(paths) - len(records.NOT_LAUNCHED))
        logs = records.SWEEP["logs"].replace("%j", "<job id>") or "the output above"
        line += (f"\nbdbench: {len(cells) - skipped} cells launched ({records.SWEEP['launcher']}"
                 + (f", after {len(records.MODEL_JOBS)} poisoned-model jobs" if records.MODEL_JOBS else "")
                 + f"), {skipped} skipped (their record was there); logs: {logs}; multirun.yaml: {records.SWEEP['dir']}")
        line += "".join(f"\nbdbench: failed: {path} (its record holds the error)" for path in failed[:10])
        if len(failed) > 10:
            line += f"\nbdbench: and {len(failed) - 10} more failed records"
    return line, ran == len(cells)


def spread_over_gpus(job_num: int, device: str) -> None:
    """Parallel workers (joblib launcher) on a machine with several GPUs: job n uses GPU n mod count."""
    import torch

    if device in ("auto", "cuda") and torch.cuda.device_count() > 1:
        torch.cuda.set_device(job_num % torch.cuda.device_count())


def share_cores(hydra_cfg) -> int | None:
    """Parallel workers on a CPU each get cores / workers torch threads: two processes with 2 threads each on 2
    cores ran a training step 7x slower than one (0.505 s against 0.069 s). A submitit job (SLURM, or its local
    executor) gets the ``cpus_per_task`` it asked for. Returns the threads set, or None outside such a launcher."""
    import torch

    cpus = OmegaConf.select(hydra_cfg, "launcher.cpus_per_task", default=None)
    if cpus:
        torch.set_num_threads(int(cpus))
        return int(cpus)
    n_jobs = OmegaConf.select(hydra_cfg, "launcher.n_jobs", default=None)
    if not n_jobs or n_jobs == 1:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = cores if n_jobs < 0 else min(n_jobs, cores)
    threads = max(1, cores // workers)
    torch.set_num_threads(threads)
    return threads


class Progress:
    """'cell i of n' with what was skipped and failed so far and an ETA from the cells that ran (this
    process's cells; a parallel launcher's workers each count their own)."""

    def __init__(self) -> None:
        self.total, self.start, self.done, self.ran, self.skipped, self.failed = 0, time.perf_counter(), 0, 0, 0, 0

    def before(self) -> None:
        if self.total > 1:
            eta = ""
            if self.ran:
                per_cell = (time.perf_counter() - self.start) / self.ran
                eta = f", ETA {per_cell * (self.total - self.done) / 60:.0f} min at {per_cell:.0f} s a cell run"
            log.info("cell %d of %d (%d skipped, %d failed so far%s)", self.done + 1, self.total, self.skipped,
                     self.failed, eta)

    def after(self, record: dict, written_before: bool, seconds: float) -> None:
        self.done += 1
        if written_before:  # read back, not run: not a measure of the time a cell takes
            self.skipped += 1
            self.start += seconds
        else:
            self.ran += 1
        self.failed += record.get("status") == "failed"


PROGRESS = Progress()


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def run(cfg: DictConfig) -> None:
    share_cores(HydraConfig.get())
    spread_over_gpus(OmegaConf.select(HydraConfig.get(), "job.num", default=0) or 0, cfg.device)
    if cfg.stage == "model":
        print(model_stage(checked(cfg, dict(HydraConfig.get().runtime.choices))), flush=True)
        return
    PROGRESS.before()
    start, wall = time.perf_counter(), time.time()
    try:
        record = run_cell(cfg, dict(HydraConfig.get().runtime.choices))
    except ConfigError as exc:
        fail(str(exc))
    path = Path(cfg.paths.records) / f"{record['cell']['id']}.json"
    PROGRESS.after(record, path.is_file() and path.stat().st_mtime < wall, time.perf_counter() - start)
    print(summary(record), flush=True)


def gallery_plan(cells: dict[str, Cell]) -> list[str]:
    """What ``gallery`` will do before it does it: per attack, whether its poisoned model is in the cache or must
    train, and for how long, estimated from the cache's models of the same data set and model."""
    import json

    from bdbench.cache import ModelCache
    from bdbench.runner import model_key

    lines = []
    for name, cell in cells.items():
        cfg, made = cell.cfg, model_key(cell)
        cache = ModelCache(cfg.paths.cache)
        if (cache.path(made.key) / "manifest.json").is_file():
            lines.append(f"  {name:<12} cached ({made.key[:12]})")
            continue
        per_epoch = []
        for manifest in cache.root.glob("models/*/manifest.json"):
            try:
                other = json.loads(manifest.read_text())
                same = (other["spec"]["dataset"]["name"] == cfg.dataset.name
                        and published_name(other["spec"]["model"]["_target_"]) == published_name(cfg.model._target_))
                if same and other.get("history"):
                    per_epoch.append(other["train_seconds"] / len(other["history"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        epochs = int(cfg.recipe.epochs)
        guess = (f"about {sorted(per_epoch)[len(per_epoch) // 2] * epochs / 60:.0f} min, from {len(per_epoch)} "
                 f"cached model(s) of this data set and model" if per_epoch else "time unknown: no model of this "
                 "data set and model in the cache yet")
        lines.append(f"  {name:<12} trains first: {epochs} epochs, {guess}")
    return lines


def gallery_command(args: list[str]) -> None:
    """``bdbench gallery [overrides]``: one PNG of clean and triggered test images for every configured attack."""
    import argparse

    from bdbench.gallery import gallery
    from bdbench.validate import missing_values, options

    parser = argparse.ArgumentParser(
        prog="bdbench gallery", description="Draw one data set's test images, clean and under every attack's "
        "trigger, with the target label and the poisoned model's prediction under each. Each attack's trigger "
        "comes from its cached poisoned model; a model that is not cached trains first (the command says which "
        "and for about how long before it starts). Writes <paths.output>/gallery/<dataset>.png.",
        epilog="example: bdbench gallery dataset=fashion_mnist paths.data=../shared/data")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for a cell")
    overrides = parser.parse_args(args).overrides
    names = [a for a in options("attack") if a != "none"]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        try:
            cfgs = {a: compose("config", overrides=[*overrides, f"attack={a}"], return_hydra_config=True) for a in names}
            # An attack whose config needs the user's files (input_aware_file: ???) has no trigger to draw without them.
            needs = {a: [k for k in missing_values(cfg) if k.startswith("attack.")] for a, cfg in cfgs.items()}
            cells = {a: validate(cfg, cfg.hydra.runtime.choices) for a, cfg in cfgs.items() if not needs[a]}
        except HydraException as exc:
            raise explain(exc, overrides) from None
    left_out = [f"{a} (needs {', '.join(keys)})" for a, keys in needs.items() if keys]
    print("bdbench gallery: " + ", ".join(cells) + (f"; left out: {'; '.join(left_out)}" if left_out else "") + "\n"
          + "\n".join(gallery_plan(cells)), flush=True)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    print(gallery(cells))


def help_text() -> str:
    """``bdbench --help``: the subcommands, then the config groups and their options."""
    from bdbench.validate import options

    lines = [__doc__.strip(), "", "Config groups (bdbench GROUP=NAME; bdbench list describes each):"]
    lines += [f"  {group:<11} {', '.join(options(group))}" for group in GROUPS]
    lines += ["", "Hydra's own options: bdbench --hydra-help"]
    return "\n".join(lines)


def perf_command(args: list[str]) -> None:
    """``bdbench perf NAME [key=value ...]``: the benchmark ``conf/perf/NAME.yaml``, written to results/perf/."""
    benchmarks = sorted(p.stem for p in (CONF_DIR / "perf").glob("*.yaml"))
    if args[:1] in (["-h"], ["--help"]):
        print("usage: bdbench perf NAME [key=value ...]  (results go to results/perf/)\n\nbenchmarks:")
        for name in benchmarks:
            print(f"  {name:<12} {describe('perf', name)[1].split(']: ', 1)[-1]}")
        return
    if not args or args[0] not in benchmarks:
        raise ConfigError(f"usage: bdbench perf NAME [key=value ...]; valid names: {', '.join(benchmarks)}")
    cfg = OmegaConf.merge(OmegaConf.load(CONF_DIR / "perf" / f"{args[0]}.yaml"), OmegaConf.from_dotlist(args[1:]))
    from bdbench import perf

    device = resolve_device(cfg.device)
    benchmark = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("device", "out")])
    result = instantiate(benchmark, device=device, _convert_="all")
    print(perf.write(result, args[0], Path(cfg.out), device))


LISTED = ("attack", "defense", "model", "dataset", "experiment")


def describe(group: str, name: str) -> tuple[str, str]:
    """(where the config comes from, its first comment line) for ``conf/<group>/<name>.yaml``."""
    from bdbench.plugins import plugin_conf_dirs

    for source, folder in [("bdbench", CONF_DIR), *plugin_conf_dirs()]:
        path = folder / group / f"{name}.yaml"
        if path.is_file():
            first = next((line for line in path.read_text().splitlines()
                          if line.startswith("#") and not line.startswith("# @package")), "#")
            return source, first.lstrip("#").strip()
    return "hydra.searchpath", ""


def list_command(overrides: list[str]) -> str:
    """``bdbench list``: what can be composed, group by group, with its package and description."""
    from bdbench.validate import options

    if overrides[:1] in (["-h"], ["--help"]):
        return ("usage: bdbench list [override ...]\n\nEvery attack, defense, model, data set and experiment that "
                "composes (built-in and from installed plugin packages), with where it comes from and what it is.")
    lines = []
    for group in LISTED:
        lines.append(f"{group}:")
        for name in options(group, overrides):
            source, text = describe(group, name)
            lines.append(f"  {name:<22} {source:<24} {text}")
    return "\n".join(lines)


def report_command(args: list[str]) -> None:
    """``bdbench report DIR [--out DIR] [--data DIR] [--cache DIR]``: tables and figures from records."""
    import argparse

    parser = argparse.ArgumentParser(prog="bdbench report", description="Tables (mean ± std over seeds, with "
                                     "finished/run per cell) and figures from the records under DIR.")
    parser.add_argument("records", metavar="DIR", help="a folder of records (searched recursively)")
    parser.add_argument("--out", help="where the report goes (default: DIR/report)")
    parser.add_argument("--data", help="data root, for the trigger gallery (default: $BDBENCH_DATA)")
    parser.add_argument("--cache", help="model cache, for the trigger gallery (default: DIR/cache if it "
                        "exists, else $BDBENCH_CACHE)")
    parser.add_argument("--index", action="store_true", help="also rebuild the index page of the folder above DIR "
                        "(results/index.html: a link to every sweep's report/index.html)")
    parser.add_argument("--formats", default="png", help="figure formats, comma-separated, of png, pdf, svg "
                        "(default: png, what the repository keeps; pdf and svg for papers)")
    parser.add_argument("legacy_out", nargs="?", help=argparse.SUPPRESS)  # ``bdbench report DIR OUT`` still works
    parsed = parser.parse_args(args)
    for value in (parsed.records, parsed.legacy_out):
        if value and "=" in value:
            raise ConfigError(f"bdbench report {value}: not a folder (report takes no overrides); valid: "
                              f"bdbench report DIR [--out DIR] [--data DIR] [--cache DIR]")
    from bdbench.figures import FORMATS, PAPER_FORMATS
    from bdbench.report import report

    formats = [f.strip() for f in parsed.formats.split(",") if f.strip()]
    if not formats or set(formats) - {*FORMATS, *PAPER_FORMATS}:
        raise ConfigError(f"--formats {parsed.formats}: valid: a comma-separated list of "
                          f"{', '.join((*FORMATS, *PAPER_FORMATS))}")

    try:
        print(report(parsed.records, parsed.out or parsed.legacy_out, data_root=parsed.data, cache_root=parsed.cache,
                     echo=print, formats=formats))
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    if parsed.index:
        from bdbench.leaderboard import write_index

        print(write_index(Path(parsed.records).resolve().parent))


def reproduction_command(args: list[str]) -> None:
    """``bdbench reproduction [--published FILE] [--out FILE]``: published rows beside bdbench's cells."""
    import argparse

    parser = argparse.ArgumentParser(prog="bdbench reproduction", description="Published ACC / ASR rows beside "
                                     "bdbench's cells on the closest setting it runs, with a verdict per row.")
    parser.add_argument("--published", default="results/reproduction.yaml",
                        help="the published rows and their stand-in cells (default: %(default)s)")
    parser.add_argument("--out", default="results/reproduction.md", help="the table (default: %(default)s)")
    parsed = parser.parse_args(args)
    if not Path(parsed.published).is_file():
        raise ConfigError(f"--published {parsed.published}: no such file; valid: a YAML list of sources "
                          f"(results/reproduction.yaml in the repository)")
    from bdbench.reproduction import build

    print(build(parsed.published, parsed.out))


COMMANDS = ("list", "gallery", "perf", "report", "reproduction")


def check_command(argv: list[str]) -> None:
    """A first word that is neither a subcommand nor an override (``key=value``, ``+key``, ``~key``, an option) is a
    misspelt subcommand: one line with the closest, before Hydra reads it as an override it cannot parse."""
    first = argv[0] if argv else ""
    if first and first not in COMMANDS and "=" not in first and not first.startswith(("-", "+", "~")):
        close = difflib.get_close_matches(first, COMMANDS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"no command {first!r}; {hint}commands: {', '.join(COMMANDS)}, or key=value overrides "
                          f"(bdbench --help)")


def command_completions(line: str) -> list[str]:
    """The subcommands that complete the first word of a command line (``COMP_LINE``); Hydra's shell completion,
    which ``bdbench -sc install=bash`` installs, adds the overrides after them."""
    words = line.split()
    if len(words) == 1 and line.endswith(" "):
        return list(COMMANDS)
    if len(words) == 2 and not line.endswith(" "):
        return [c for c in COMMANDS if c.startswith(words[1])]
    return []


def main() -> None:
    argv = sys.argv[1:]
    retain_freed_memory()  # before any tensor: every command trains, defends or times models
    if argv[:1] in (["-sc"], ["--shell-completion"]) and any(a.startswith("query=") for a in argv[1:]):
        line = os.environ.get("COMP_LINE", "")
        print(" ".join(command_completions(line)), end=" ", flush=True)
        if line.split()[1:2] and line.split()[1] in COMMANDS:  # a subcommand's arguments are not overrides
            return
    try:
        check_command(argv)
        if argv[:1] == ["list"]:
            print(list_command(argv[1:]))
            return
        if argv[:1] == ["gallery"]:
            gallery_command(argv[1:])
            return
        if argv[:1] == ["perf"]:
            perf_command(argv[1:])
            return
        if argv[:1] == ["report"]:
            report_command(argv[1:])
            return
        if argv[:1] == ["reproduction"]:
            reproduction_command(argv[1:])
            return
        if argv in (["--help"], ["-h"]):
            print(help_text())
            return
        if argv[:1] == ["--version"]:
            from bdbench import __version__

            print(f"bdbench {__version__}")
            return
        paths = prevalidate(argv)
    except ConfigError as exc:
        fail(str(exc))
    start = time.perf_counter()
    PROGRESS.total, PROGRESS.start = len(paths or []) - len(records.NOT_LAUNCHED), start
    if records.NOT_LAUNCHED:
        cells = len(set(paths or []))
        repeats = len(paths or []) - cells
        print(f"{len(records.NOT_LAUNCHED) - repeats} of {cells} cells have a record"
              + (f"; {repeats} jobs repeat an earlier job's cell (a data-free defense at another budget)"
                 if repeats else "") + ": not launched",
              flush=True)
    run()
    if paths is not None:
        line, ok = closing(paths, time.perf_counter() - start)
        if len(paths) > 1:
            print(line, flush=True)
        if not ok:
            sys.exit(1)


if __name__ == "__main__":
    main()
