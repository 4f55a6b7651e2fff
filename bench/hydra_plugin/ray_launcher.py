"""A Hydra launcher that runs each job as a Ray task: ``hydra/launcher=ray`` (pip install -e ".[ray]").

Hydra's own Ray plugin (hydra-ray-launcher 1.2.2) pins ``cloudpickle<3``, which breaks joblib (the parallel
launcher) in the same environment; this one uses nothing but Ray's task API. A job is composed here, in the
driver, and run on a worker the way Hydra's joblib launcher runs one (``run_job`` with the job's config); the
worker starts in the driver's folder where it exists, so relative paths mean the same on a one-machine cluster
and on one whose nodes share the file system. ``ray.get`` of a batch is the dependency between the poisoned-model
jobs and the cells (bench/hydra_plugin/sweeper.py).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


def _run(hydra_context: Any, task_function: Any, config: DictConfig, cwd: str) -> JobReturn:
    """One job on a Ray worker (module-level: Ray pickles it by reference)."""
    from hydra.core.hydra_config import HydraConfig

    if os.path.isdir(cwd):
        os.chdir(cwd)
    setup_globals()
    HydraConfig.instance().set_config(config)
    return run_job(hydra_context=hydra_context, task_function=task_function, config=config,
                   job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")


class RayLauncher(Launcher):
    """Jobs as Ray tasks of ``cpus_per_task`` CPUs and ``gpus_per_task`` GPUs on the cluster at ``address`` (null:
    a local one started here, with ``init``'s arguments to ``ray.init``; they are not used to join a cluster)."""

    logs = "the output above (Ray keeps every worker's log in /tmp/ray/session_latest/logs on its node)"

    def __init__(self, address: str | None = None, cpus_per_task: int = 1, gpus_per_task: float = 0,
                 max_retries: int = 0, init: dict | None = None) -> None:
        self.address, self.cpus_per_task, self.gpus_per_task = address, cpus_per_task, gpus_per_task
        self.max_retries, self.init = max_retries, dict(init or {})
        self.config: DictConfig | None = None
        self.hydra_context: Any = None
        self.task_function: Any = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import ray

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        if not ray.is_initialized():
            # Ray folds lines that differ only in numbers into one ("[repeated 2x]"): each cell's line is its own
            os.environ.setdefault("RAY_DEDUP_LOGS", "0")
            ray.init(address=self.address, **(self.init if self.address is None else {}))
        log.info("Ray: launching %d jobs on %s", len(job_overrides), ray.get_runtime_context().gcs_address)
        remote = ray.remote(_run).options(num_cpus=self.cpus_per_task, num_gpus=self.gpus_per_task,
                                          max_retries=self.max_retries)
        refs = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(config):
                config.hydra.job.id, config.hydra.job.num = f"ray_{idx}", idx
            refs.append(remote.remote(self.hydra_context, self.task_function, config, os.getcwd()))
        return ray.get(refs)
