"""The published sweeps in results/ are what their records say: ``bdbench report`` rebuilds each committed
table byte for byte from the committed records, and every committed picture carries the digest of the numbers
the records give it (figures are compared by that digest, not by their bytes, which depend on font rendering)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bdbench.figures import FORMATS, read_digest
from bdbench.metrics import collapsed
from bdbench.report import expected_pictures, report

RESULTS = Path(__file__).resolve().parent.parent / "results"
PUBLISHED = sorted(p.parent.parent for p in RESULTS.glob("*/report/tables"))


@pytest.mark.parametrize("folder", PUBLISHED, ids=[p.name for p in PUBLISHED])
def test_report_rebuilds_committed_tables(folder, tmp_path, monkeypatch):
    monkeypatch.setattr("bdbench.report.draw.plans", lambda *args: [])  # tables only: fast and exact
    monkeypatch.setattr("bdbench.report.galleries", lambda *args: [])  # needs the cache of models
    out = report(folder, tmp_path / "report")
    committed = {p.name: p.read_bytes() for p in (folder / "report" / "tables").iterdir()}
    rebuilt = {p.name: p.read_bytes() for p in (out / "tables").iterdir()}
    assert rebuilt.keys() == committed.keys()
    for name in committed:
        assert rebuilt[name] == committed[name], f"{folder.name}/report/tables/{name} differs from its records"
    # problems.md: the same records not used, the same synthetic cells (its title names the folder; whether the
    # trigger gallery could be drawn depends on the machine's model cache, not on the records)
    def records_part(text: str) -> list[str]:
        return text.split("## Figures not drawn")[0].rstrip().splitlines()[1:]

    assert records_part((out / "problems.md").read_text()) == records_part((folder / "report" / "problems.md").read_text())


@pytest.mark.parametrize("folder", PUBLISHED, ids=[p.name for p in PUBLISHED])
def test_committed_pictures_show_what_the_records_say(folder):
    """Every figure and gallery a report of the records draws is committed, carries the digest of the very numbers
    (or models) the records give it, and no other picture lies beside them: a stale figure fails here."""
    expected = expected_pictures(folder)
    committed = {p.name for p in (folder / "report" / "figures").iterdir()}
    assert committed == set(expected), f"{folder.name}: stale {sorted(committed - set(expected))}, missing " \
                                       f"{sorted(set(expected) - committed)}"
    for name, digest in expected.items():
        if name.endswith(".png"):
            assert read_digest(folder / "report" / "figures" / name) == digest, f"{folder.name}/{name} is stale"
    assert not list(RESULTS.glob("*.png")), "a picture outside a report: nothing rebuilds it"


def test_the_reproduction_figures_show_what_the_records_say(tmp_path, monkeypatch):
    """``bdbench reproduction`` draws its time-to-accuracy figures beside the page: the committed ones carry the
    digests a rebuild from the committed records gives, and no other figure lies there."""
    from bdbench.reproduction import build

    monkeypatch.chdir(RESULTS.parent)  # results/reproduction.yaml names its records relative to the checkout
    build("results/reproduction.yaml", tmp_path / "reproduction.md")
    drawn = {p.name: read_digest(p) for p in (tmp_path / "reproduction").glob("*.png")}
    committed = {p.name: read_digest(p) for p in (RESULTS / "reproduction").glob("*.png")}
    assert drawn and committed == drawn
    assert {p.name for p in (RESULTS / "reproduction").iterdir() if p.is_file()} == {
        f"{Path(name).stem}.{fmt}" for name in drawn for fmt in FORMATS}


def test_a_picture_drawn_from_other_numbers_is_caught(tmp_path):
    """The check above can fail: a figure saved with one table's digest does not match another table's."""
    import pandas as pd

    from bdbench.figures import Figure, digest, save

    plan = Figure("f", pd.DataFrame({"asr": [5.0]}), lambda: __import__("matplotlib.pyplot").pyplot.figure())
    save(plan, tmp_path)
    assert read_digest(tmp_path / "f.png") == digest(pd.DataFrame({"asr": [5.0]}))
    assert read_digest(tmp_path / "f.png") != digest(pd.DataFrame({"asr": [5.1]}))
    assert {p.suffix[1:] for p in tmp_path.iterdir()} == set(FORMATS)


def current_records(folder: Path) -> list[dict]:
    """The folder's records written under today's record schema (the CIFAR-10 folders predate it)."""
    from bdbench.records import SCHEMA_VERSION

    found = [json.loads(p.read_text()) for p in sorted((folder / "records").glob("*.json"))]
    return [r for r in found if r.get("schema_version") == SCHEMA_VERSION]


def nested_reports(report: dict) -> list[dict]:
    """A defense's report and the fine-tuning reports inside it (FP's ``finetune``, NAD's ``teacher``...)."""
    return [report] + [v for v in report.values() if isinstance(v, dict)]


def config_values(node, key: str):
    """Every value of ``key`` anywhere in a config tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from config_values(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from config_values(v, key)


CURRENT = [p for p in PUBLISHED if current_records(p)]


@pytest.mark.parametrize("folder", CURRENT, ids=[p.name for p in CURRENT])
def test_published_records_keep_the_fixes(folder):
    """What issue 15 fixed, read back from the published records: a reviewer's recount, not the code's word."""
    records = [r for r in current_records(folder) if r["status"] != "failed"]
    targets: dict[str, set[int]] = {}
    seeds: dict[str, set[int]] = {}
    for r in records:
        name, report = r["cell"]["id"], r["defense"] or {}
        if r["config"]["attack"].get("label_mode", "all_to_one") == "all_to_one":  # all-to-all has no target to favour
            targets.setdefault(r["cell"]["attack"], set()).add(r["config"]["attack"].get("target"))
            seeds.setdefault(r["cell"]["attack"], set()).add(r["cell"]["seed"])
        if "guard_curve" in report:  # every pruned prefix the guard measured passed it, the count kept included
            passed = dict(map(tuple, report["guard_curve"]))  # on a wide model the curve steps by several channels
            assert report["pruned"] in passed, name
            assert all(v >= report["guard_min"] for n, v in passed.items() if n <= report["pruned"]), name
            classes = dict(map(tuple, report.get("guard_classes_curve", [])))
            assert all(classes[n] >= report["guard_classes_min"] for n in range(report["pruned"] + 1) if n in classes), name
        if r["cell"]["defense"] == "shap_pruning" and not report.get("exceed_k_max"):
            assert report["pruned"] <= report["k_max"], name
        if r["cell"]["defense"] in ("nc", "linf_pruning", "shap_pruning"):
            assert isinstance(report.get("detected"), bool), name
            assert report["detected"] or report.get("when_undetected") == "force" or not report.get("acted"), name
        policies = set(config_values(r["config"]["defense"], "batchnorm"))
        for part in nested_reports(report):  # one BatchNorm policy, the one the config names (default: train)
            if "batchnorm" in part:
                assert part["batchnorm"] in policies, name
        m = r["metrics"]  # a collapsed model is flagged by the rule, never published as a low ASR
        assert m["collapsed"] == collapsed(m["acc"], m["top_class_share"], r["config"]["dataset"]["num_classes"]), name
    for attack, drawn in targets.items():  # the target label follows the seed: no label favoured
        assert len(drawn) == len(seeds[attack]), (attack, drawn)
