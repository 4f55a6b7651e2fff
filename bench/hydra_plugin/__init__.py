"""Hydra search path of every installed bdbench plugin: installed as ``hydra_plugins.bdbench``, where Hydra
looks for plugins, so that ``pip install`` of a plugin package is the only step before ``defense=NAME``.

A plugin package declares its classes in the entry-point groups ``bdbench.attacks`` / ``bdbench.defenses``
and ships its configs as package data, ``<package>/conf/<group>/<name>.yaml``; each such ``conf/`` folder
is appended to the search path after bdbench's own (which comes first, so a plugin cannot shadow a
built-in name).
"""

from __future__ import annotations

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class BdbenchSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        # Imported here: Hydra's plugin scan may import this package before bench, whose __init__ imports it.
        from bdbench.plugins import plugin_conf_dirs

        for package, folder in plugin_conf_dirs():
            search_path.append(provider=f"bdbench-plugin:{package}", path=f"file://{folder}")
