"""Plugins for real: bdbench from a wheel in a fresh virtual environment, outside the checkout, with the
example plugin (examples/bdbench-example-plugin) installed by pip and selected by name; configs found
through Hydra's search path."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import DATA, ROOT, fashion_mnist_available

PLUGIN = ROOT / "examples" / "bdbench-example-plugin"


def sh(*args, cwd: Path, timeout: int = 1800) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (args, result.stdout[-2000:], result.stderr[-3000:])
    return result


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh virtual environment holding bdbench's wheel and the example plugin, nothing editable.

    Torch and the other dependencies come from this interpreter's site-packages through a path entry (a
    plain path, so the editable install's import hook there is not loaded): the test is about bdbench's own
    packaging, not about downloading 5 GB of torch.
    """
    tmp = tmp_path_factory.mktemp("wheel")
    sh(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", ROOT,
       cwd=tmp)
    wheel = next((tmp / "dist").glob("bdbench-*.whl"))
    sh(sys.executable, "-m", "venv", tmp / "venv", cwd=tmp)
    python = tmp / "venv" / "bin" / "python"
    site = Path(sh(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    sh(python, "-m", "pip", "uninstall", "-q", "-y", "setuptools", cwd=tmp)  # venv's own is too old to build
    sh(python, "-m", "pip", "install", "-q", "--no-deps", wheel, cwd=tmp)
    sh(python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", PLUGIN, cwd=tmp)
    return tmp


def test_the_wheel_carries_every_config_under_one_import_name(venv):
    """Before, the wheel put three generic names (bench, attacks, defenses) into site-packages."""
    import zipfile

    names = zipfile.ZipFile(next((venv / "dist").glob("bdbench-*.whl"))).namelist()
    assert {n.split("/")[0] for n in names} == {"bdbench", "hydra_plugins", "bdbench-0.1.0.dist-info"}
    assert {"bdbench/attacks/badnets.py", "bdbench/defenses/anp.py", "bdbench/models/wrn16_1.py"} <= set(names)
    shipped = {n.split("bdbench/conf/", 1)[1] for n in names if n.startswith("bdbench/conf/") and n.endswith(".yaml")}
    in_tree = {p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml")}
    assert shipped == in_tree and {"hydra_plugins/bdbench/__init__.py", "hydra_plugins/bdbench/sweeper.py"} <= set(names)


def test_hydra_finds_bdbench_plugins_when_it_imports_them_first(venv):
    """Hydra's plugin scan imports ``hydra_plugins.bdbench`` before anything imports bench (``python -m hydra``,
    another tool's sweep): before, that import failed on a circular import with bench's own registration."""
    python = venv / "venv" / "bin" / "python"
    found = sh(python, "-c", "import hydra_plugins.bdbench\n"
               "from hydra.core.plugins import Plugins\nfrom hydra.plugins.sweeper import Sweeper\n"
               "print(sorted(c.__name__ for c in Plugins.instance().discover(Sweeper)))", cwd=venv).stdout
    assert "SkipRecordedSweeper" in found


def test_bdbench_list_shows_the_plugin_with_its_package(venv):
    listing = sh(venv / "venv" / "bin" / "bdbench", "list", cwd=venv).stdout
    rows = {line.split()[0]: line.split()[1] for line in listing.splitlines() if line.startswith("  ")}
    assert rows["head_ft"] == "bdbench_example" and rows["checkerboard"] == "bdbench_example"
    assert rows["resnet18_tv"] == "bdbench_example"  # a model through the bdbench.models entry point, its config found
    assert rows["ft"] == "bdbench" and rows["badnets"] == "bdbench" and rows["wrn16_1"] == "bdbench"


@pytest.mark.skipif(not fashion_mnist_available(), reason=f"Fashion-MNIST IDX files not under {DATA}")
def test_a_plugin_defense_runs_by_name_from_a_wheel_outside_the_checkout(venv):
    """What the README's plugin section says to do, exactly."""
    work = venv / "elsewhere"
    work.mkdir()
    run = sh(venv / "venv" / "bin" / "bdbench", "experiment=smoke", "defense=head_ft", "attack=checkerboard",
             f"paths.data={DATA}", cwd=work)
    record = json.loads(next((work / "records").glob("*head_ft*.json")).read_text())
    assert record["status"] == "ok" and record["cell"]["defense"] == "head_ft"
    assert record["cell"]["attack"] == "checkerboard" and record["undefended"]["asr"] > 0.8  # the backdoor took
    assert record["config"]["defense"]["_target_"] == "bdbench_example.head_ft.HeadFineTuning"
    assert "checkerboard + head_ft" in run.stdout
    assert str(ROOT) not in json.dumps(record["env"])  # nothing came from the checkout
    assert record["env"]["packages"]["bdbench-example-plugin"] == "0.1.0"  # the plugin named with its version
    assert record["isolation"] in ("sandbox", "process")  # a worker from the installed wheel, not the checkout


@pytest.mark.skipif(not fashion_mnist_available(), reason=f"Fashion-MNIST IDX files not under {DATA} (the composed "
                    "cell is validated against them)")
def test_hydra_searchpath_adds_configs_and_names_are_checked_against_it(tmp_path):
    """A config folder on ``hydra.searchpath`` is composable by name; before, the name check read conf/ only."""
    from bdbench import api
    from bdbench.errors import ConfigError

    (tmp_path / "conf" / "defense").mkdir(parents=True)
    (tmp_path / "conf" / "defense" / "ft_short.yaml").write_text("defaults:\n  - ft\n  - _self_\n\nschedule:\n  min_steps: 7\n")
    searchpath = f"hydra.searchpath=[file://{tmp_path / 'conf'}]"
    (job,) = api._jobs(["defense=ft_short", searchpath, f"paths.data={DATA}"], multirun=False)
    assert "defense=ft_short" in job
    with pytest.raises(ConfigError, match="defense=ft_short: no such defense; valid: anp, "):
        api._jobs(["defense=ft_short", f"paths.data={DATA}"], multirun=False)


def test_the_example_plugin_passes_its_own_tests(venv):
    sh(venv / "venv" / "bin" / "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", PLUGIN / "tests", cwd=venv)
