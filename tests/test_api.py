"""``bdbench.api``: a cell or a sweep from Python with the command line's overrides; records into pandas."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bdbench import api
from bdbench.errors import ConfigError
from bdbench.metrics import evaluate
from bdbench.validate import build
from conftest import DATA, TINY, compose_cell, fashion_mnist_available


def test_run_sweep_and_load_records(tmp_path):
    paths = [f"paths.data={DATA}", f"paths.cache={tmp_path / 'cache'}", f"paths.records={tmp_path / 'records'}",
             f"paths.output={tmp_path / 'out'}", "device=cpu"]
    record = api.run([*TINY, *paths, "defense=clp", "budget=0"])
    assert record["status"] == "ok" and record["cell"]["defense"] == "clp" and 0 <= record["metrics"]["asr"] <= 1
    again = api.run([*TINY, *paths, "defense=clp", "budget=0"])  # read back, not run again
    assert again["metrics"] == record["metrics"] and again["cache"] == record["cache"]
    records = api.sweep([*TINY, *paths, "defense=clp,none", "budget=0"])
    assert [r["cell"]["defense"] for r in records] == ["clp", "none"] and records[0]["metrics"] == record["metrics"]
    df = api.load_records(tmp_path / "records")
    assert len(df) == 2 and set(df["defense"]) == {"clp", "none"}
    assert df.loc[df["defense"] == "clp", "asr"].item() == record["metrics"]["asr"]
    path = next((tmp_path / "records").glob("*-clp-*.json"))
    on_disk = path.read_bytes()
    rerun, models = api.run([*TINY, *paths, "defense=clp", "budget=0"], return_models=True)
    assert path.read_bytes() == on_disk and rerun["metrics"] == record["metrics"]  # run again, the record kept
    cfg = compose_cell(tmp_path, [*TINY, "defense=clp", "budget=0"])
    test = build(cfg.dataset).load(cfg.paths.data, "cpu", cfg.paths.cache).test
    clean_only = SimpleNamespace(target=None)  # ACC alone
    assert evaluate(models["defended"], test, clean_only)["acc"] == record["metrics"]["acc"]
    assert evaluate(models["poisoned"], test, clean_only)["acc"] == record["undefended"]["acc"]


@pytest.mark.skipif(not fashion_mnist_available(), reason=f"Fashion-MNIST IDX files not under {DATA} (the "
                    "earlier job of the sweep is checked against them first)")
def test_bad_input_is_refused_before_any_cell_runs(tmp_path):
    with pytest.raises(ConfigError, match="budget=500 is larger than the defender pool"):
        api.sweep([*TINY, f"paths.records={tmp_path / 'records'}", "dataset=fashion_mnist", f"paths.data={DATA}",
                   "budget=1,500"])
    assert not (tmp_path / "records").exists()


def test_a_cell_is_validated_once_and_each_component_built_once_from_its_config_to_its_record(tmp_path, monkeypatch):
    """Before, validation built all six components, the poisoned model's key built four again, the runner the data
    set once more, and a job was validated twice (before the sweep and in the runner). Now validation's cell is what
    runs: one build per component, the model's architecture checked on the meta device and built with weights once."""
    from collections import Counter

    import bdbench.cli
    import bdbench.runner
    import bdbench.validate

    built, validations = Counter(), []
    real_build, real_validate = bdbench.validate.build, bdbench.validate.validate

    def counting_build(node, **kwargs):
        made = real_build(node, **kwargs)
        params = list(made.parameters()) if hasattr(made, "parameters") else []
        built[(str(node["_target_"]).rsplit(".", 1)[-1], params[0].device.type if params else "")] += 1
        return made

    def counting_validate(*args, **kwargs):
        validations.append(1)
        return real_validate(*args, **kwargs)

    for module in (bdbench.validate, bdbench.runner):
        monkeypatch.setattr(module, "build", counting_build)
    for module in (bdbench.validate, bdbench.cli):
        monkeypatch.setattr(module, "validate", counting_validate)
    paths = [f"paths.data={DATA}", f"paths.cache={tmp_path / 'cache'}", f"paths.records={tmp_path / 'records'}",
             f"paths.output={tmp_path / 'out'}", "device=cpu", "worker.isolation=none"]
    record = api.run([*TINY, *paths, "attack=badnets", "defense=ft", "budget=1", "defense.schedule.min_steps=2",
                      "defense.schedule.epochs=1"])
    assert record["status"] == "ok" and len(validations) == 1
    assert built == Counter({("Synthetic", ""): 1, ("BadNets", ""): 1, ("Recipe", ""): 1, ("DeepInversion", ""): 1,
                             ("FmnistCNN", "meta"): 1, ("FmnistCNN", "cpu"): 1, ("FineTuning", ""): 1}), built
