"""Hydra's basic sweeper, less the jobs whose record is already written.

``bdbench -m`` composes and validates every job before the first one starts (bench/cli.py); that pass also
reads each job's record. Hydra's basic sweeper would then compose every job twice more (once to check the batch,
once to launch it) only for the runner to read the record and skip it: 0.5 s a cell, 3.6 min for a finished
432-cell grid. This sweeper leaves those jobs out of the batches it hands the launcher, so re-running a finished
sweep costs the validation pass alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

# The override lists (as sorted tuples) of the jobs whose record exists; set by bench.cli before the sweep starts.
RECORDED: set[tuple[str, ...]] = set()


def job_key(overrides: Iterable[str]) -> tuple[str, ...]:
    """A job's identity as its overrides, independent of their order."""
    return tuple(sorted(overrides))


class SkipRecordedSweeper(BasicSweeper):
    """Launches only the jobs not in ``RECORDED``; job numbers stay those of the full sweep's order."""

    def get_job_batch(self) -> Sequence[Sequence[str]]:
        return [job for job in super().get_job_batch() if job_key(job) not in RECORDED]
