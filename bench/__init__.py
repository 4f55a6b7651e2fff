"""bdbench engine: data, models, training, metrics, cache, records, runner and CLI.

The engine knows the Attack and Defense interfaces and their registries, never a concrete method.
"""

from omegaconf import OmegaConf

from bench.seeding import target_of_seed

__version__ = "0.1.0"

# ${target_of_seed:${seed},${dataset.num_classes}}: the published grids' target label (conf/experiment/).
OmegaConf.register_new_resolver("target_of_seed", target_of_seed, replace=True)
