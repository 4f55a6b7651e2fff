"""Records: one atomic JSON per cell with the agreed fields; finished cells are skipped, broken ones rerun."""

from __future__ import annotations

import json
import logging
import os
import platform
from pathlib import Path

import pytest
import torch

from bdbench.records import SCHEMA_VERSION
from bdbench.runner import run_cell
from conftest import compose_cell


def test_record_has_the_agreed_fields(tiny_cfg, choices):
    record = run_cell(cfg := tiny_cfg("attack=badnets", "defense=ft", "budget=2"), choices(cfg))
    files = list(Path(cfg.paths.records).glob("*.json"))
    assert len(files) == 1 and files[0].stem == record["cell"]["id"]
    on_disk = json.loads(files[0].read_text())
    assert on_disk["schema_version"] == SCHEMA_VERSION and on_disk["status"] == "ok"
    assert set(on_disk["metrics"]) == {"acc", "asr", "ra", "der", "top_class_share", "collapsed"}
    assert set(on_disk["undefended"]) >= {"acc", "asr", "ra"}
    assert on_disk["data_source"] == "real" and on_disk["defense_images"] == 20
    assert on_disk["defense"]["steps"] >= 300
    assert set(on_disk["timings"]) >= {"train", "defense", "eval", "total"}
    assert on_disk["peak_memory"]["rss_mb"] > 0
    assert on_disk["env"]["packages"]["torch"] and "git" in on_disk["env"]
    assert on_disk["config"]["defense"]["_target_"] == "bdbench.defenses.ft.FineTuning"
    assert "paths" not in on_disk["config"]
    assert on_disk["cell"]["attack"] == "badnets" and on_disk["seed"] == 0
    assert not list(Path(cfg.paths.records).glob(".*.tmp"))  # no temp file left behind


def test_existing_record_is_skipped_and_broken_one_rerun(tiny_cfg, choices, caplog):
    caplog.set_level(logging.INFO)
    cfg = tiny_cfg("defense=clp", "budget=0")
    first = run_cell(cfg, choices(cfg))
    assert first["data_source"] == "none"  # CLP is data-free: no synthetic set at k = 0
    path = Path(cfg.paths.records) / f"{first['cell']['id']}.json"
    mtime = path.stat().st_mtime_ns
    assert run_cell(cfg, choices(cfg)) == json.loads(path.read_text())
    assert path.stat().st_mtime_ns == mtime and "record exists" in caplog.text
    path.write_text('{"schema_version": 1, "metr')  # a half-written record from a killed process
    assert run_cell(cfg, choices(cfg))["status"] == "ok"
    assert json.loads(path.read_text())["metrics"] == first["metrics"]


def test_budget_zero_uses_synthetic_images_for_data_hungry_defenses(tiny_cfg, choices):
    record = run_cell(cfg := tiny_cfg("defense=ft", "budget=0"), choices(cfg))
    assert record["data_source"] == "synthetic" and record["defense_images"] == 20  # per_class=2
    assert record["synthesis"]["method"] == "deepinversion" and 0 <= record["synthesis"]["syn_to_target"] <= 1


class Diverging:
    """A defense whose loss goes non-finite (instantiated by ``_target_: test_records.Diverging``)."""

    data_free = True

    def apply(self, model, clean, ctx):
        raise FloatingPointError("toy diverged: loss nan at step 3 of 300 (lr=0.1)")

    def report(self):
        return {"steps": 3}


def test_a_diverged_defense_is_a_finished_result_not_a_crash(tiny_cfg, choices):
    from bdbench import runner

    cfg = tiny_cfg("attack=badnets", "budget=1", "recipe.epochs=1")
    cfg.defense = {"_target_": "test_records.Diverging"}
    record = runner.run_cell(cfg, {**choices(cfg), "defense": "none"})  # no exception: the sweep goes on
    assert record["status"] == "diverged" and "loss nan" in record["error"] and record["defense"] == {"steps": 3}
    assert "DIVERGED" in runner.summary(record)
    again = runner.run_cell(cfg, {**choices(cfg), "defense": "none"})
    assert again == {"schema_version": SCHEMA_VERSION, **record}  # read back, not run again: divergence is deterministic


@pytest.mark.parametrize("experiment", ["paper_grid", "cifar10_grid", "paper_grid_gpu"])
def test_published_grids_draw_the_target_from_the_seed(experiment, tmp_path):
    """Every published grid used target 0 for every seed, so a defense that guessed label 0 looked right."""
    targets = {}
    for seed in (0, 1, 2):
        cfg = compose_cell(tmp_path, [f"experiment={experiment}", f"seed={seed}", "attack=badnets"])
        targets[seed] = cfg.attack.target
        assert isinstance(targets[seed], int) and 0 <= targets[seed] < cfg.dataset.num_classes
    assert len(set(targets.values())) == 3 and targets == {0: 4, 1: 7, 2: 0}
    assert compose_cell(tmp_path, ["attack=badnets"]).attack.target == 0  # a single cell keeps the default
    assert compose_cell(tmp_path, [f"experiment={experiment}", "attack=badnets", "attack.target=3"]).attack.target == 3


def test_seeds_of_a_grid_share_a_setting_and_a_changed_key_does_not(tmp_path):
    """The report averages the seeds of a row only when they share a setting. The setting hashed the resolved
    config, so the target label drawn from the seed made every row of paper_grid read as mixed settings."""
    from bdbench.runner import cell_setting

    def setting(*overrides: str) -> str:
        return cell_setting(compose_cell(tmp_path, ["experiment=paper_grid", "attack=badnets", "defense=ft", *overrides]))

    assert setting("seed=0", "budget=10") == setting("seed=1", "budget=10") == setting("seed=2", "budget=1")
    assert setting("seed=0") != setting("seed=0", "defense.schedule.min_steps=7")  # a real change of setting still shows
    assert setting("seed=0") != setting("seed=1", "attack.target=3")  # so does a target set by hand


@pytest.mark.parametrize("experiment", ["paper_grid", "cifar10_grid", "paper_grid_gpu"])
def test_published_grids_run_both_readings_of_ar_purification(experiment, tmp_path):
    """The default row was the code sketch alone, which measures fine-tuning plus an L1 term."""
    from omegaconf import OmegaConf

    from bdbench.validate import CONF_DIR

    grid = OmegaConf.load(CONF_DIR / "experiment" / f"{experiment}.yaml").hydra.sweeper.params.defense.split(",")
    assert {"ar_purification", "ar_purification_code"} <= set(grid)
    variants = {name: compose_cell(tmp_path, [f"experiment={experiment}", f"defense={name}"]).defense.variant
                for name in ("ar_purification", "ar_purification_code")}
    assert variants == {"ar_purification": "neuron", "ar_purification_code": "code"}


@pytest.mark.parametrize("experiment", ["paper_grid", "cifar10_grid", "paper_grid_gpu"])
def test_published_grids_run_fine_tuning_on_bs_ar_schedule_as_its_control(experiment, tmp_path):
    """Without it no row separated what AR adds from the 500 steps of fine-tuning it runs."""
    from omegaconf import OmegaConf

    from bdbench.validate import CONF_DIR

    grid = OmegaConf.load(CONF_DIR / "experiment" / f"{experiment}.yaml").hydra.sweeper.params.defense.split(",")
    assert "ft_ar_control" in grid
    cell = lambda name: compose_cell(tmp_path, [f"experiment={experiment}", f"defense={name}"]).defense
    control, ar = cell("ft_ar_control"), cell("ar_purification")
    assert control.schedule == ar.neuron_schedule and control.augment == ar.augment


def test_records_name_the_commit_the_process_started_with(monkeypatch):
    """A sweep runs for hours; a commit made meanwhile must not be named as the code of its later records."""
    import subprocess

    from bdbench import records

    started = records.environment(__import__("torch").device("cpu"))["git"]
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("git asked again")))
    assert records.environment(__import__("torch").device("cpu"))["git"] == started


def test_records_name_the_cpu_their_timings_were_measured_on():
    """Timings from two CPUs are not comparable (a republish spread over sessions ran on more than one):
    the record names the CPU model and the cores the process may use, not just ``x86_64``."""
    from bdbench.records import environment

    device = environment(torch.device("cpu"))["device"]
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.is_file() else []
    expected = names[0] if names else platform.processor() or platform.machine()  # no model name: ARM, not Linux
    assert expected and device["cpu"] == device["name"] == expected
    assert device["cores"] == len(os.sched_getaffinity(0)) and device["threads"] >= 1
