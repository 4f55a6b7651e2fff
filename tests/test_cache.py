"""The poisoned-model cache: trained once per key, verified on load, rebuilt when corrupt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bdbench import runner
from bdbench.code_versions import current_name, renamed
from bdbench.runner import run_cell
from bdbench.validate import Cell, build


def count_trainings(monkeypatch) -> list:
    calls = []
    real = runner.train

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "train", counting)
    return calls


def test_second_cell_reuses_the_poisoned_model(tiny_cfg, choices, monkeypatch):
    calls = count_trainings(monkeypatch)
    first = run_cell(cfg := tiny_cfg("attack=badnets", "defense=none"), choices(cfg))
    second = run_cell(cfg := tiny_cfg("attack=badnets", "defense=clp", "budget=0"), choices(cfg))
    assert len(calls) == 1
    assert first["cache"]["hit"] is False and second["cache"]["hit"] is True
    assert first["cache"]["key"] == second["cache"]["key"]
    assert second["undefended"] == first["undefended"]


def test_key_changes_with_what_shapes_the_model(tiny_cfg, choices, monkeypatch):
    calls = count_trainings(monkeypatch)
    a = run_cell(cfg := tiny_cfg("defense=none"), choices(cfg))
    b = run_cell(cfg := tiny_cfg("defense=none", "attack.poison_rate=0.2"), choices(cfg))
    c = run_cell(cfg := tiny_cfg("defense=none", "seed=1"), choices(cfg))
    assert len({a["cache"]["key"], b["cache"]["key"], c["cache"]["key"]}) == 3 and len(calls) == 3


def test_corrupt_entry_is_detected_and_rebuilt(tiny_cfg, choices, monkeypatch, tmp_path, caplog):
    calls = count_trainings(monkeypatch)
    record = run_cell(cfg := tiny_cfg("defense=none"), choices(cfg))
    weights = tmp_path / "cache" / "models" / record["cache"]["key"] / "weights.pt"
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte
    weights.write_bytes(bytes(blob))
    again = run_cell(cfg := tiny_cfg("defense=clp"), choices(cfg))
    assert "is corrupt" in caplog.text and len(calls) == 2 and again["cache"]["hit"] is False
    manifest = json.loads((weights.parent / "manifest.json").read_text())
    assert set(manifest["files"]) == {"weights.pt", "attack.pt"}


def test_an_entry_is_checked_against_its_key_not_only_against_itself(tiny_cfg, choices, monkeypatch, tmp_path, caplog):
    """Seed 1's whole model folder under seed 0's key loaded silently (ASR 97.49 recorded for 97.83), and a manifest
    listing no files failed the cell on every rerun. Both are now corrupt entries: removed and built again."""
    import shutil

    calls = count_trainings(monkeypatch)
    models = tmp_path / "cache" / "models"
    first = run_cell(cfg := tiny_cfg("defense=none"), choices(cfg))
    other = run_cell(cfg := tiny_cfg("defense=none", "seed=1"), choices(cfg))
    key, other_key = first["cache"]["key"], other["cache"]["key"]
    shutil.rmtree(models / key)
    shutil.copytree(models / other_key, models / key)  # manifest and all
    again = run_cell(cfg := tiny_cfg("defense=clp"), choices(cfg))
    assert "is corrupt (ValueError: its manifest is entry" in caplog.text and len(calls) == 3
    assert again["cache"]["hit"] is False and again["undefended"] == first["undefended"]
    manifest = json.loads((models / key / "manifest.json").read_text())
    manifest.update(key=key, files={})
    (models / key / "manifest.json").write_text(json.dumps(manifest))
    run_cell(cfg := tiny_cfg("defense=ft", "defense.schedule.min_steps=1", "defense.schedule.epochs=1"), choices(cfg))
    assert "its manifest lists no files" in caplog.text and len(calls) == 4
    spec_swapped = json.loads((models / key / "manifest.json").read_text())
    spec_swapped["spec"] = json.loads((models / other_key / "manifest.json").read_text())["spec"]
    (models / key / "manifest.json").write_text(json.dumps(spec_swapped))  # the key field left as it should be
    run_cell(cfg := tiny_cfg("defense=ft", "defense.schedule.min_steps=2", "defense.schedule.epochs=1"), choices(cfg))
    assert "is not what its key describes" in caplog.text and len(calls) == 5


def test_trigger_artifacts_round_trip_through_the_cache(tiny_cfg, choices):
    """A reloaded attack reproduces the undefended ASR exactly (same trigger, same poisoned indices)."""
    first = run_cell(cfg := tiny_cfg("attack=blended", "defense=none"), choices(cfg))
    cfg = tiny_cfg("attack=blended", "defense=none")
    cfg.paths.records += "-again"  # the same cell, recomputed with the model and trigger from the cache
    second = run_cell(cfg, choices(cfg))
    assert second["cache"]["hit"] and second["metrics"]["asr"] == first["metrics"]["asr"]
    state = torch.load(next(Path(cfg.paths.cache).glob("models/*/attack.pt")), weights_only=True)
    assert state["pattern"].dtype == torch.uint8 and len(state["poison_indices"]) > 0


@pytest.mark.parametrize("edited", runner.ENGINE_MODULES)
def test_an_edit_to_any_engine_module_changes_the_code_version(edited, tmp_path, monkeypatch):
    """attacks/base.py and bench/models/base.py share a file name: keyed by name, one hid the other."""
    copies = {}
    for module in runner.ENGINE_MODULES:
        copies[module] = tmp_path / module.replace(".", "/") / "source.py"
        copies[module].parent.mkdir(parents=True)
        copies[module].write_text(runner.source_file(module).read_text())
    monkeypatch.setattr(runner, "source_file", lambda module: copies.get(module) or runner.Path(module))
    before = runner.code_version()
    copies[edited].write_text(copies[edited].read_text() + "\nEDITED = True\n")  # code: behaviour, not a comment
    assert runner.code_version() == before  # this process runs the code it loaded: its keys hold
    runner.source_text.cache_clear()  # a new process reads the edited file
    assert runner.code_version() != before


RESULTS = Path(__file__).resolve().parent.parent / "results"
MANIFESTS = sorted(RESULTS.glob("*/cache/models/*/manifest.json"))


def module_of(node: dict) -> str:
    return node["_target_"].rpartition(".")[0]


@pytest.mark.parametrize("manifest", MANIFESTS, ids=[f"{m.parts[-5]}-{m.parent.name[:8]}" for m in MANIFESTS])
def test_every_published_model_keeps_its_key(manifest):
    """The cache key hashes what the code does, not its text; the models published before that keep the keys they
    were stored under (bdbench.code_versions), so nothing is trained again."""
    from hydra.utils import get_class

    spec = json.loads(manifest.read_text())["spec"]
    now = renamed(spec, current_name)  # a manifest names its components as published
    bases = [c.__module__ for c in get_class(now["attack"]["_target_"]).__mro__]  # SIG's and LC's clean_label
    modules = tuple(m for m in bases if m.startswith("bdbench.attacks.")) + \
        tuple(module_of(now[g]) for g in ("model", "dataset"))
    assert runner.code_version(modules=modules) == spec["code"]
    assert runner.sha256_json(spec)[:32] == manifest.parent.name


def test_a_comment_or_docstring_edit_keeps_every_key_and_a_code_edit_changes_it(tmp_path, monkeypatch):
    """Before, editing a comment in bench/data.py changed every key and orphaned every published model."""
    hashed = [*runner.ENGINE_MODULES, "bdbench.attacks.badnets", "bdbench.models.wrn16_1"]
    copies = {m: tmp_path / m.replace(".", "/") / "source.py" for m in hashed}
    for module, path in copies.items():
        path.parent.mkdir(parents=True)
        path.write_text(runner.source_file(module).read_text())
    monkeypatch.setattr(runner, "source_file", lambda module: copies[module])
    runner.source_text.cache_clear()
    modules = ("bdbench.attacks.badnets", "bdbench.models.wrn16_1")
    before = runner.code_version(modules=modules)
    assert before in runner.PUBLISHED.values()  # the published keys' version, through the frozen table
    for module, path in copies.items():  # a docstring and a comment in every hashed module
        text = path.read_text()
        path.write_text(text.replace('"""', '"""Edited. ', 1) + "\n# an edited comment\n")
        runner.source_text.cache_clear()
        assert runner.code_version(modules=modules) == before, module
    for module, path in copies.items():  # a change of behaviour in any of them: a new key
        path.write_text(path.read_text() + "\nEDITED = 1\n")
        runner.source_text.cache_clear()
        assert runner.code_version(modules=modules) != before, module
        path.write_text(path.read_text().replace("\nEDITED = 1\n", ""))
        runner.source_text.cache_clear()
    runner.source_text.cache_clear()


def test_a_data_set_outside_bench_data_keys_its_models_by_its_own_code(tiny_cfg, tmp_path, monkeypatch):
    """A data set in its own module (bdbench.datasets) is part of its models' keys: an edit to its reader re-keys its
    models, and a data set in bdbench.data (an engine module already) adds nothing, so the published keys hold."""
    gtsrb = tmp_path / "gtsrb.py"
    gtsrb.write_text(runner.source_file("bdbench.datasets.gtsrb").read_text())
    real = runner.source_file
    monkeypatch.setattr(runner, "source_file",
                        lambda module: gtsrb if module == "bdbench.datasets.gtsrb" else real(module))
    runner.source_text.cache_clear()
    def key(*overrides: str) -> runner.ModelKey:  # no files of these data sets here: the parts the key reads
        cfg = tiny_cfg(*overrides, "model=cifar_cnn")
        return runner.model_key(Cell(cfg=cfg, choices={}, dataset=build(cfg.dataset), attack=build(cfg.attack),
                                     recipe=None, synthesis=None, rule=None, facts={}, device=cpu, precision="fp32"))

    cpu = torch.device("cpu")
    spec = key("dataset=gtsrb")
    plain = runner.code_version(modules=("bdbench.attacks.badnets", "bdbench.models.cifar_cnn"))
    assert spec.key_spec["code"] == runner.code_version(modules=("bdbench.attacks.badnets", "bdbench.models.cifar_cnn",
                                                                  "bdbench.datasets.gtsrb")) != plain
    gtsrb.write_text(gtsrb.read_text() + "\nEDITED = 1\n")
    runner.source_text.cache_clear()
    assert key("dataset=gtsrb").key != spec.key
    cifar = key("dataset=cifar10")
    assert cifar.key_spec["code"] == plain
    runner.source_text.cache_clear()


def test_the_move_into_one_namespace_keeps_every_digest():
    """The modules were three top-level packages (bench, attacks, defenses) when the published models were made: a
    module's code under those names and under bdbench hashes alike, while a string that only looks like a package
    path (an entry-point group) stays what it says, and any other name change is a change."""
    new = runner.source_file("bdbench.attacks.base").read_text()
    old = (new.replace("from bdbench.attacks.", "from attacks.").replace("from bdbench.", "from bench.")
           .replace('builtins="bdbench.attacks"', 'builtins="attacks"'))
    assert old != new and 'group="bdbench.attacks"' in old
    assert runner.behaviour(old) == runner.behaviour(new)
    assert runner.behaviour(new.replace('group="bdbench.attacks"', 'group="attacks"')) != runner.behaviour(new)
    assert runner.behaviour(new.replace("from bdbench.", "from elsewhere.", 1)) != runner.behaviour(new)
    assert runner.sha256_json({"a": {"_target_": "bdbench.attacks.badnets.BadNets"}}) == \
        runner.sha256_json({"a": {"_target_": "attacks.badnets.BadNets"}})
    published = runner.sha256_json({"_target_": "bench.data.CIFAR10"})
    assert runner.sha256_json({"_target_": "bdbench.data.CIFAR10"}) == published
    assert runner.sha256_json({"_target_": "elsewhere.data.CIFAR10"}) != published
    names = ("attacks.sig.SIG", "bench.data.CIFAR10", "defenses.ft.FT", "torch.optim.SGD")
    assert [current_name(n) for n in names] == \
        ["bdbench.attacks.sig.SIG", "bdbench.data.CIFAR10", "bdbench.defenses.ft.FT", "torch.optim.SGD"]


def test_engine_modules_include_both_base_files():
    files = {runner.source_file(m).relative_to(runner.source_file("bdbench").parent.parent).as_posix()
             for m in runner.ENGINE_MODULES}
    assert {"attacks/base.py", "bench/models/base.py"} <= files


def test_a_corrupt_synthetic_set_is_detected_and_rebuilt(tiny_cfg, choices, tmp_path, caplog):
    """Flipped bytes in the budget-0 set were loaded silently (a cell went to ACC 9.7, recorded as ok)."""
    first = run_cell(cfg := tiny_cfg("defense=ft", "budget=0", "defense.schedule.min_steps=20"), choices(cfg))
    (blob,) = (tmp_path / "cache" / "synthetic").glob("*/set.pt")
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    Path(cfg.paths.records, f"{first['cell']['id']}.json").unlink()
    again = run_cell(cfg, choices(cfg))
    assert "synthetic cache entry" in caplog.text and "is corrupt" in caplog.text
    assert again["synthesis"]["cache_hit"] is False and again["metrics"] == first["metrics"]


def test_cache_and_records_take_the_users_umask(tiny_cfg, choices, tmp_path):
    """Temp files are 0600 and temp folders 0700: renamed into place as they were, a group could not read a
    shared cache."""
    import os
    import stat

    old = os.umask(0o002)
    try:
        record = run_cell(cfg := tiny_cfg("defense=none"), choices(cfg))
    finally:
        os.umask(old)
    entry = tmp_path / "cache" / "models" / record["cache"]["key"]
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)
    assert mode(entry) == 0o775 and mode(entry / "weights.pt") == 0o664 and mode(entry / "manifest.json") == 0o664
    assert mode(Path(cfg.paths.records, f"{record['cell']['id']}.json")) == 0o664


@pytest.mark.parametrize("channels_last", [True, False])
def test_the_poisoned_model_comes_in_the_recipes_memory_format_trained_or_cached(tiny_cfg, choices, monkeypatch,
                                                                                channels_last):
    """Before, channels_last applied on CUDA only (1.44x slower WRN-16-1 steps on the CPU), and a model from the
    cache came back contiguous even there: its defenses and evaluation ran on other kernels than a fresh one's."""
    seen = []
    real = runner.evaluate

    def spy(model, *args, **kwargs):
        conv = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        seen.append(conv.weight.is_contiguous(memory_format=torch.channels_last))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(runner, "evaluate", spy)
    monkeypatch.setattr(runner, "_UNDEFENDED", {})  # a new process: no model measured yet
    trained = run_cell(cfg := tiny_cfg("defense=none", f"recipe.channels_last={channels_last}"), choices(cfg))
    cached = run_cell(cfg := tiny_cfg("defense=clp", "budget=0", f"recipe.channels_last={channels_last}"), choices(cfg))
    assert trained["cache"]["hit"] is False and cached["cache"]["hit"] is True
    assert seen == [channels_last] * 4  # undefended after training and from the cache, then after each defense


def test_a_second_cell_of_the_model_triggers_no_test_image_again(tiny_cfg, choices, monkeypatch):
    from bdbench.attacks.badnets import BadNets

    calls = []
    real = BadNets.apply_trigger

    def counting(self, x):
        calls.append(len(x))
        return real(self, x)

    monkeypatch.setattr(BadNets, "apply_trigger", counting)
    first = run_cell(cfg := tiny_cfg("defense=none"), choices(cfg))
    triggered = len(calls)  # training's poisoning and undefended evaluation, then the cell's evaluation
    second = run_cell(cfg := tiny_cfg("defense=clp", "budget=0"), choices(cfg))
    assert len(calls) == triggered and second["cache"]["hit"] is True
    assert first["metrics"] == first["undefended"] | {"der": first["metrics"]["der"]}


def test_an_edited_manifest_is_a_corrupt_entry_and_an_unsealed_one_is_sealed_on_first_read(tmp_path, caplog):
    """manifest.json was outside every hash: undefended metrics edited there went into every record of the model."""
    from bdbench.cache import Store

    store = Store(tmp_path, "models")
    store.store("k", {"weights": {"w": torch.ones(2)}}, {"undefended": {"acc": 0.9, "asr": 0.99}})
    path = tmp_path / "models" / "k" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["undefended"]["asr"] = 0.5
    path.write_text(json.dumps(manifest))
    assert store.load("k") is None and "its manifest was changed after it was written" in caplog.text
    assert not path.exists()  # removed, to be built again
    store.store("k", {"weights": {"w": torch.ones(2)}}, {"undefended": {"acc": 0.9, "asr": 0.99}})
    legacy = json.loads(path.read_text())
    del legacy["seal"]  # as written before manifests were sealed
    path.write_text(json.dumps(legacy))
    assert store.load("k").manifest["undefended"]["asr"] == 0.99 and "seal" in json.loads(path.read_text())
    legacy["undefended"]["asr"] = 0.1
    path.write_text(json.dumps({**legacy, "seal": json.loads(path.read_text())["seal"]}))
    assert store.load("k") is None


def test_a_records_undefended_metrics_are_measured_from_the_weights_not_read_from_the_manifest(
        tiny_cfg, choices, tmp_path, caplog, monkeypatch):
    """A manifest edited and sealed again (its seal is a digest anyone can recompute) put its undefended metrics into
    every later record of the model, and into its DER."""
    from bdbench.cache import seal
    from bdbench.fsutil import atomic_write_json

    first = run_cell(cfg := tiny_cfg("attack=badnets", "defense=none"), choices(cfg))
    path = tmp_path / "cache" / "models" / first["cache"]["key"] / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["undefended"] = {**manifest["undefended"], "acc": 0.5, "asr": 0.0}
    manifest["seal"] = seal(manifest)
    atomic_write_json(path, manifest)
    monkeypatch.setattr(runner, "_UNDEFENDED", {})  # a new process
    second = run_cell(cfg := tiny_cfg("attack=badnets", "defense=clp", "budget=0"), choices(cfg))
    assert second["cache"]["hit"] is True
    assert second["undefended"]["acc"] == pytest.approx(first["undefended"]["acc"], abs=runner.DISAGREE)
    assert second["undefended"]["asr"] == pytest.approx(first["undefended"]["asr"], abs=runner.DISAGREE)
    assert "its manifest says" in caplog.text and "'acc': 0.5" in caplog.text


def test_an_edit_to_an_attacks_base_class_rekeys_its_models(tmp_path, monkeypatch):
    """SIG and LC draw their images in ``bdbench.attacks.clean_label``: the key hashed only the module of the attack's
    own class, so an edit to their shared selection kept every SIG and LC model's key."""
    shared = tmp_path / "clean_label.py"
    shared.write_text(runner.source_file("bdbench.attacks.clean_label").read_text())
    real = runner.source_file
    monkeypatch.setattr(runner, "source_file", lambda m: shared if m == "bdbench.attacks.clean_label" else real(m))
    runner.source_text.cache_clear()
    sig, badnets = build_attack("sig"), build_attack("badnets")
    before = runner.code_version(sig), runner.code_version(badnets)
    shared.write_text(shared.read_text() + "\nEDITED = 1\n")
    runner.source_text.cache_clear()
    assert runner.code_version(sig) != before[0] and runner.code_version(badnets) == before[1]
    runner.source_text.cache_clear()


def build_attack(name: str):
    from conftest import configured

    return configured("attack", f"attack={name}")


def test_an_admitted_edit_keeps_the_published_keys_and_only_an_admissible_module_is_admitted(tmp_path, monkeypatch):
    """``bdbench.code_versions.ADMITTED``: a module's digest after an edit that leaves the published models alone stands
    for the digest before it; any other edit still re-keys, and a module that shapes training is never admitted."""
    from bdbench import code_versions

    assert set(code_versions.ADMITTED) <= set(code_versions.ADMISSIBLE)
    never = {"bdbench.train", "bdbench.augment", "bdbench.device", "bdbench.models.base"}
    assert not never & set(code_versions.ADMISSIBLE)
    # the data module only with a digest of every published data set to check its edits against (slow tier)
    names = {json.loads(m.read_text())["spec"]["dataset"]["name"]
             for m in (Path(__file__).parent.parent / "results").glob("*/cache/models/*/manifest.json")}
    assert names and names <= set(code_versions.PUBLISHED_DATA)
    copy = tmp_path / "blended.py"
    copy.write_text(runner.source_file("bdbench.attacks.blended").read_text())
    real = runner.source_file
    monkeypatch.setattr(runner, "source_file", lambda m: copy if m == "bdbench.attacks.blended" else real(m))
    runner.source_text.cache_clear()
    modules = ("bdbench.attacks.blended", "bdbench.models.wrn16_1")
    published, before = runner.code_version(modules=modules), runner.module_version("bdbench.attacks.blended")
    assert published in code_versions.PUBLISHED.values()
    copy.write_text(copy.read_text() + "\nEDITED = 1\n")
    runner.source_text.cache_clear()
    edited = runner.module_version("bdbench.attacks.blended")
    assert runner.code_version(modules=modules) != published
    monkeypatch.setitem(code_versions.ADMITTED, "bdbench.attacks.blended", {edited: before})
    assert runner.code_version(modules=modules) == published
    copy.write_text(copy.read_text() + "\nEDITED_AGAIN = 1\n")  # a second edit, not admitted: a new key
    runner.source_text.cache_clear()
    assert runner.code_version(modules=modules) != published
    runner.source_text.cache_clear()


PUBLISHED_GRIDS = [("cifar10_jpeg", "cifar10_grid", seed, attack) for seed in (0, 1) for attack in ("badnets", "blended")] + \
    [("cifar10_jpeg", "cifar10_grid", 0, attack) for attack in ("wanet", "input_aware")] + \
    [("fashion_mnist", "paper_grid", seed, attack) for seed in (0, 1, 2)
     for attack in ("badnets", "blended", "wanet", "input_aware")]


@pytest.mark.parametrize("sweep, experiment, seed, attack", PUBLISHED_GRIDS)
def test_the_published_grids_composed_today_find_their_models(sweep, experiment, seed, attack, tmp_path):
    """A config key added since (``attack.image: null``, ``attack.label_mode: all_to_one``) or an admitted edit must
    not re-key a published model or rename a published cell: the grid's CLP cell (its first defense), composed from
    conf/ as the documented command composes it, names its committed record, and its model's key is the one that
    record used (with a new key left in, every published cell ran again). The record, not the cache folder: the
    CIFAR-10 Input-aware model is over the 5 MB line and not in a clone's working tree."""
    from conftest import compose_cell

    cfg = compose_cell(tmp_path, [f"experiment={experiment}", f"seed={seed}", f"attack={attack}", "defense=clp"])
    cell = Cell(cfg=cfg, choices={}, dataset=build(cfg.dataset), attack=build(cfg.attack), recipe=None,
                synthesis=None, rule=None, facts={}, device=torch.device("cpu"), precision="fp32")
    cfg.paths.records = str(RESULTS / sweep / "records")
    record = runner.cell_path(cfg, dict(cfg.hydra.runtime.choices))
    assert record.is_file()
    assert json.loads(record.read_text())["cache"]["key"] == runner.model_key(cell).key
