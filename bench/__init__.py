"""bdbench engine: data, models, training, metrics, cache, records, runner and CLI.

The engine knows the Attack and Defense interfaces and their registries, never a concrete method.
"""

__version__ = "0.1.0"
