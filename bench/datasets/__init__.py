"""Data sets added after the first published grids, one per module.

``bench.data`` holds the readers the published models were trained from (its code is part of their cache keys);
a data set here keys its own models by its own module (``bench.runner.code_version``), so adding one re-keys
nothing else.
"""
