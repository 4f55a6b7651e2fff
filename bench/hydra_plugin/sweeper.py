"""Hydra's basic sweeper, less the jobs whose record is already written or whose cell an earlier job runs, in
defense-major order.

``bdbench -m`` composes and validates every job before the first one starts (bench/cli.py); that pass also
reads each job's record. Hydra's basic sweeper would then compose every job twice more (once to check the batch,
once to launch it) only for the runner to read the record and skip it: 0.5 s a cell, 3.6 min for a finished
432-cell grid. This sweeper leaves those jobs out of the batches it hands the launcher, so re-running a finished
sweep costs the validation pass alone.

On a launcher that runs jobs side by side (joblib, submitit, Ray), it first launches one ``stage=model`` job per
poisoned model that several cells share (``bdbench.records.MODEL_JOBS``) and the cells only once that batch has
returned: no cell job holds a worker (a GPU, a SLURM allocation) while it waits on another job's training lock.
"""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper


def defense_major(jobs: list) -> list:
    """The jobs with each defense's cells next to each other, defenses in the order the sweep names them: a defense
    worker serves one defense's consecutive cells (bench/isolation.py), so a row pays one worker start (a Python and
    torch import, in its sandbox), not one per cell. Hydra's own order varies the last override fastest."""
    def defense(job) -> str:
        return next((o.split("=", 1)[1] for o in job if o.split("=", 1)[0].lstrip("+~") == "defense"), "")

    first: dict[str, int] = {}
    for job in jobs:
        first.setdefault(defense(job), len(first))
    return sorted(jobs, key=lambda job: first[defense(job)])


class SkipRecordedSweeper(Sweeper):
    """Launches only the jobs not in ``bdbench.records.NOT_LAUNCHED``; job numbers stay those of the full sweep.

    It wraps Hydra's basic sweeper instead of subclassing it, and keeps no state of its own: Hydra's plugin scan
    re-executes plugin modules (its own included), so a base class or a set bound when this module was first
    imported would not be the one in use when the sweep runs.
    """

    def __init__(self, max_batch_size: int | None = None, params: dict[str, str] | None = None) -> None:
        self.max_batch_size, self.params = max_batch_size, params
        self.basic: Any = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        from omegaconf import OmegaConf

        from bdbench.records import NOT_LAUNCHED, SWEEP, job_key

        self.basic = BasicSweeper(self.max_batch_size, self.params)
        batch = self.basic.get_job_batch
        self.basic.get_job_batch = lambda: defense_major([job for job in batch() if job_key(job) not in NOT_LAUNCHED])
        self.basic.setup(hydra_context=hydra_context, task_function=task_function, config=config)
        SWEEP.update(dir=str(config.hydra.sweep.dir), launcher=type(self.basic.launcher).__name__,
                     logs=str(OmegaConf.select(config, "hydra.launcher.submitit_folder", default=None)
                              or getattr(self.basic.launcher, "logs", "")))

    def sweep(self, arguments: list[str]) -> Any:
        import logging

        from bdbench.records import MODEL_JOBS

        if MODEL_JOBS:
            logging.getLogger("bdbench").info("%d poisoned model%s first, one job each; the cells follow",
                                              len(MODEL_JOBS), "s" if len(MODEL_JOBS) > 1 else "")
            for result in self.basic.launcher.launch(MODEL_JOBS, initial_job_idx=0):
                _ = result.return_value  # a job that did not run at all (a lost node) ends the sweep here
        return self.basic.sweep(arguments)
