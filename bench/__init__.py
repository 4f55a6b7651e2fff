"""bdbench engine: data, models, training, metrics, cache, records, runner and CLI.

The engine knows the Attack and Defense interfaces and their registries, never a concrete method.
"""

from omegaconf import OmegaConf

from bdbench.seeding import target_of_seed

__version__ = "0.1.0"

# ${target_of_seed:${seed},${dataset.num_classes}}: the published grids' target label (conf/experiment/).
OmegaConf.register_new_resolver("target_of_seed", target_of_seed, replace=True)
# ${sum:${recipe.epochs},1}: a length that follows another key (conf/recipe/onecycle.yaml).
OmegaConf.register_new_resolver("sum", lambda *terms: sum(terms), replace=True)


def _register_hydra_plugins() -> None:
    """Hydra finds ``hydra_plugins.bdbench`` by walking the hydra_plugins namespace; an editable install
    maps it through setuptools' import hook, which that walk cannot list, so register them by hand too."""
    from hydra.core.plugins import Plugins
    from hydra_plugins.bdbench import BdbenchSearchPathPlugin
    from hydra_plugins.bdbench.ray_launcher import RayLauncher
    from hydra_plugins.bdbench.sweeper import SkipRecordedSweeper

    Plugins.instance().register(BdbenchSearchPathPlugin)
    Plugins.instance().register(SkipRecordedSweeper)
    Plugins.instance().register(RayLauncher)


_register_hydra_plugins()
