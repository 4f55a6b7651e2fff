"""bdbench from Python (notebooks, scripts): the same overrides as the command line, records back.

    from bdbench.api import run, sweep, load_records
    record = run(["attack=blended", "defense=clp", "budget=0", "paths.data=../shared/data"])
    records = sweep(["attack=badnets,blended", "defense=ft,clp", "paths.data=../shared/data"])
    df = load_records("records")          # one row per finished cell: ACC, ASR, RA, DER, ...
    record, models = run([...], return_models=True)   # also the poisoned and the defended model

Every job is composed and validated before the first one runs, as on the command line. Metrics (ACC, ASR, RA,
DER) are fractions in [0, 1] in records and data frames; the command line and the tables print them in percent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd
from torch import nn
from hydra import compose, initialize_config_dir

from bdbench.runner import run_cell
from bdbench.validate import CONF_DIR


def _jobs(overrides: Sequence[str], multirun: bool) -> list[list[str]]:
    from bdbench.cli import expand_jobs, validate_jobs

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        jobs = expand_jobs(list(overrides), multirun)
        validate_jobs(jobs)
    return jobs


def _run(job: list[str], models: dict[str, nn.Module] | None = None) -> dict:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=job, return_hydra_config=True)
    return run_cell(cfg, dict(cfg.hydra.runtime.choices), models)


def run(overrides: Sequence[str] = (), return_models: bool = False
        ) -> dict | tuple[dict, dict[str, nn.Module]]:
    """Run one cell (or read its existing record) and return its record. With ``return_models`` also
    ``{"poisoned": ..., "defended": ...}`` (the defended model is the one the record's metrics were measured on; the
    cell then runs even where its record exists, and leaves that record as it is)."""
    (job,) = _jobs(overrides, multirun=False)
    if not return_models:
        return _run(job)
    models: dict[str, nn.Module] = {}
    return _run(job, models), models


def sweep(overrides: Sequence[str] = ()) -> list[dict]:
    """Run every cell of a sweep (``a=x,y`` overrides and an experiment's sweeper params), in order."""
    return [_run(job) for job in _jobs(overrides, multirun=True)]


def load_records(folder: str | Path) -> pd.DataFrame:
    """The records under ``folder`` as one row per cell (the long table ``bdbench report`` builds on)."""
    from bdbench.report import load

    return load(Path(folder))[0]
