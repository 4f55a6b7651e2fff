"""What became of a cell (bdbench.outcome), and that every view honours it: a model whose accuracy a defense destroyed
is never ranked or coloured as a defense, a figure never averages two settings, a data-free defense runs once."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from bdbench import figures
from bdbench.leaderboard import COLUMNS, rows, write_page
from bdbench.outcome import Rule, judge, of_record
from bdbench.report import pivot, report
from bdbench.runner import cell_path, run_cell

RULE = Rule(max_acc_drop=10.0, no_backdoor_asr=0.5)
BEFORE = {"acc": 0.85, "asr": 0.95}


@pytest.mark.parametrize("metrics, undefended, expected", [
    ({"acc": 0.82, "asr": 0.05, "collapsed": False}, BEFORE, "ok"),                 # 3 points lost: a defense
    ({"acc": 0.751, "asr": 0.0, "collapsed": False}, BEFORE, "ok"),                 # 9.9 points: still within
    ({"acc": 0.75, "asr": 0.0, "collapsed": False}, BEFORE, "ok"),                  # exactly 10 (float noise aside)
    ({"acc": 0.749, "asr": 0.0, "collapsed": False}, BEFORE, "damaged"),            # 10.1 points: damaged
    ({"acc": 0.16, "asr": 0.0, "collapsed": False}, BEFORE, "damaged"),             # NAD k=1 on BadNets, CIFAR-10
    ({"acc": 0.14, "asr": 0.68, "collapsed": True}, BEFORE, "collapsed"),           # collapse wins over damage
    ({"acc": 0.14, "asr": 0.0}, BEFORE, "collapsed"),                               # schema 2: ACC <= 1.5 x chance
    ({"acc": 0.40, "asr": 0.0, "collapsed": False}, {"acc": 0.85, "asr": 0.12}, "no backdoor"),  # nothing to remove
    ({"acc": 0.90, "asr": 0.0, "collapsed": False}, BEFORE, "ok"),                  # a gain in ACC is no damage
])
def test_the_rule_judges_points_of_accuracy_after_collapse_and_missing_backdoor(metrics, undefended, expected):
    assert judge("ok", metrics, undefended, 10, RULE) == expected


def test_diverged_and_failed_records_keep_their_status_and_the_rule_is_checked():
    assert judge("diverged", None, BEFORE, 10, RULE) == "diverged" and judge("failed", None, None, 10, RULE) == "failed"
    assert judge("ok", {"acc": 0.80, "collapsed": False}, BEFORE, 10, Rule(max_acc_drop=2)) == "damaged"
    with pytest.raises(ValueError, match=r"outcome.max_acc_drop='abc': points of clean accuracy; valid: a number in "
                                         r"0..100"):
        Rule(max_acc_drop="abc")


def test_a_cell_records_its_outcome_and_the_rule_is_not_part_of_its_identity(tiny_cfg, choices):
    cfg = tiny_cfg("defense=ft", "budget=1", "recipe.epochs=2")
    strict = tiny_cfg("defense=ft", "budget=1", "recipe.epochs=2", "outcome.max_acc_drop=0")
    assert cell_path(cfg, choices(cfg)) == cell_path(strict, choices(strict))  # judging never renames a cell
    record = run_cell(cfg, choices(cfg))
    assert record["outcome_rule"] == {"max_acc_drop": 10, "no_backdoor_asr": 0.5}
    drop = 100 * (record["undefended"]["acc"] - record["metrics"]["acc"])
    assert record["outcome"] == ("damaged" if drop > 10 else "ok") == of_record(record)


def bad_input(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    import sys

    return subprocess.run([sys.executable, "-m", "bdbench.cli", "dataset=synthetic", f"paths.records={tmp_path}/r",
                           f"paths.cache={tmp_path}/c", *overrides], capture_output=True, text=True, timeout=300)


def test_a_bad_rule_is_one_line_before_compute(tmp_path):
    done = bad_input(tmp_path, "outcome.max_acc_drop=-3")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "bdbench: error: outcome.max_acc_drop=-3: points of clean accuracy; valid: a number in 0..100"]
    assert not (tmp_path / "c").exists()


def kept_and_damaged() -> pd.DataFrame:
    """Two defenses on one BadNets model: one keeps its accuracy (ACC 82 / ASR 5), one destroys it (ACC 16 / ASR 0),
    the CIFAR-10 grid's NAD at k=1."""
    base = {"dataset": "cifar10_jpeg", "model": "wrn16_1", "recipe": "onecycle", "experiment": "cifar10_grid",
            "attack": "badnets", "budget": 1, "seed": 0, "setting": "s", "model_setting": "m", "undefended_acc": 0.85,
            "undefended_asr": 0.95, "undefended_ra": 0.0, "data_source": "real", "model_key": "k",
            "train_seconds": 60.0, "defense_seconds": 1.0, "synthesis_seconds": None, "reversal_seconds": None,
            "eval_seconds": 1.0, "cell_seconds": 2.0, "peak_rss_mb": 1.0, "cuda_mb": None}
    return pd.DataFrame([
        {**base, "defense": "kept", "status": "ok", "acc": 0.82, "asr": 0.05, "ra": 0.8, "der": 0.93,
         "record": "records/kept.json"},
        {**base, "defense": "damage", "status": "damaged", "acc": 0.16, "asr": 0.0, "ra": 0.1, "der": 0.63,
         "record": "records/damage.json"}])


def test_a_damaged_cell_is_marked_in_tables_and_never_coloured_or_filled_in_figures():
    cells = kept_and_damaged()
    asr = pivot(cells, "asr").set_index("defense")
    assert asr.loc["damage", "k=1"] == "0.0 damaged (0/1)" and asr.loc["kept", "k=1"] == "5.0 (1/1)"
    values, labels = figures.cell_grid(cells, "asr")
    assert pd.isna(values.loc["badnets", "damage"]) and labels.loc["badnets", "damage"] == "0\ndamaged"
    assert values.loc["badnets", "kept"] == pytest.approx(5.0) and values.loc["badnets", "undefended"] == 95.0
    lines = figures.budget_lines(cells, {}, RULE)[0].data.set_index("defense")
    assert lines.loc["damage", "shown"] == "damaged" and lines.loc["kept", "shown"] == "ok"
    assert lines.loc["damage", "acc"] == pytest.approx(16.0)  # ACC is drawn beside ASR, not left out
    scatter = figures.scatter(cells, {}, RULE)[0].data.set_index("defense")
    assert scatter.loc["damage", "shown"] == "damaged"


def write_records(tmp_path: Path, cells: pd.DataFrame) -> Path:
    root = tmp_path / "sweep"
    (root / "records").mkdir(parents=True)
    for record in cells["record"]:
        (root / record).write_text(json.dumps({"config": {"defense": record}}))
    return root


def test_a_damaged_cell_ranks_below_a_kept_one_in_the_leaderboard(tmp_path):
    cells = kept_and_damaged()
    root = write_records(tmp_path, cells)
    table = {r["defense"]: r for r in rows(cells, {}, root, root / "report")}
    assert (table["kept"]["rank"], table["damage"]["rank"]) == (0, 1)
    assert (table["damage"]["outcome"], table["damage"]["acc"], table["damage"]["asr"]) == ("damaged", 16.0, 0.0)


def test_one_damaged_seed_sinks_its_row_below_rows_whose_every_seed_finished(tmp_path):
    """The Fashion-MNIST board's first row was ARGD on BadNets at k=10: one seed of three finished (81.5 / 2.7),
    two damaged the model. A row is as good as its worst seed."""
    cells = kept_and_damaged()
    lucky = cells.iloc[[1, 1, 1]].assign(defense="lucky", seed=[0, 1, 2], status=["ok", "damaged", "damaged"],
                                         acc=[0.815, 0.50, 0.48], asr=[0.027, 0.01, 0.02], der=[0.95, 0.8, 0.8],
                                         record=["records/l0.json", "records/l1.json", "records/l2.json"])
    cells = pd.concat([cells, lucky], ignore_index=True)
    root = write_records(tmp_path, cells)
    table = {r["defense"]: r for r in rows(cells, {}, root, root / "report")}
    assert table["lucky"]["rank"] == 1 > table["kept"]["rank"] and table["lucky"]["outcome"] == "damaged (2/3 seeds)"
    assert table["lucky"]["acc"] == 81.5 and table["lucky"]["n"] == "1/3, damaged 2"  # the finished seed's numbers


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(shutil.which("node") is None, reason="no node to run the page's own comparator (Debian: apt-get install nodejs; .ci/run installs it); the Python-side ranking is checked without it")
def test_no_sort_of_the_page_lifts_a_damaged_cell_above_a_kept_one(tmp_path):
    """The page's own comparator (its script, run by node) over every column, ascending and descending."""
    cells = kept_and_damaged()
    root = write_records(tmp_path, cells)
    page = write_page(cells, {}, root, root / "report", [], [], "test", RULE).read_text()
    script = page.split("<script>", 1)[1].split("function state()", 1)[0]  # constants and the comparator
    data = page.split('id="cells">', 1)[1].split("</script>", 1)[0]
    script = script.replace('const cells = JSON.parse(document.getElementById("cells").textContent);', "")
    check = script + f"""
const cells = {data};
const out = [];
for (const [key, , kind] of COLUMNS) for (const desc of [false, true]) {{
  const order = [...cells].sort((a, b) => compareRows(a, b, key, desc, kind)).map(c => c.defense);
  out.push([key, desc, order]);
}}
const d = DEFAULT_SORT.replace(/^-/, "");
out.push(["default", DEFAULT_SORT, [...cells].sort((a, b) => compareRows(a, b, d, DEFAULT_SORT.startsWith("-"),
  "num")).map(c => c.defense)]);
console.log(JSON.stringify(out));"""
    (tmp_path / "check.js").write_text(check)
    done = subprocess.run(["node", str(tmp_path / "check.js")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    orders = json.loads(done.stdout)
    assert len(orders) == 2 * len(COLUMNS) + 1
    assert all(order == ["kept", "damage"] for _, _, order in orders), orders


@pytest.mark.skipif(chromium() is None, reason="no chromium (Debian: apt-get install chromium)")
def test_the_default_view_in_a_browser_puts_the_kept_cell_first(tmp_path):
    cells = kept_and_damaged()
    root = write_records(tmp_path, cells)
    page = write_page(cells, {}, root, root / "report", [], [], "test", RULE)
    for sort in ("", "sort=asr"):  # the default (DER) and the sort that used to put the destroyed model first
        done = subprocess.run([chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--dump-dom",
                               f"file://{page}#{sort}"], capture_output=True, text=True, timeout=120)
        body = done.stdout.split('id="rows"')[1].split("</tbody>")[0]
        assert re.findall(r"<td class=\"\">(kept|damage)</td>", body) == ["kept", "damage"], sort
        assert 'class="damaged"' in body


def test_a_smoke_record_and_a_full_record_never_share_a_number(tiny_cfg, choices, tmp_path):
    """A new user's folder: the same attack, defense and budget once in full and once under ``experiment=smoke``.
    Before, one heatmap cell was their mean (76 from 52.7 and 99.8) and so was the undefended column."""
    for extra in ((), ("experiment=smoke", "dataset.subset.train=1200", "dataset.subset.test=400")):
        run_cell(cfg := tiny_cfg("defense=ft", "budget=1", "recipe.epochs=2", *extra), choices(cfg))
    records = Path(cfg.paths.records)
    found = [json.loads(p.read_text()) for p in sorted(records.glob("*.json"))]
    assert len(found) == 2 and {r["cell"]["experiment"] for r in found} == {"-", "smoke"}
    out = report(records, tmp_path / "report", cache_root=str(tmp_path / "none"))
    heatmaps = sorted((out / "figures").glob("asr_heatmap_*.png"))
    assert [p.stem for p in heatmaps] == ["asr_heatmap_synthetic_fmnist_cnn_reference_k1",
                                          "asr_heatmap_synthetic_fmnist_cnn_reference_smoke_k1"]
    from bdbench.report import load

    cells = load(records)[0]
    for plan in figures.heatmaps(cells, {}, RULE):  # every number drawn is one record's own
        experiment = "smoke" if "_smoke_" in plan.stem else "-"
        own = next(r for r in found if r["cell"]["experiment"] == experiment)
        shown = plan.data.set_index(["attack", "level_1"])
        assert shown.loc[("badnets", "ft"), "asr"].split("\n")[0] == f"{100 * own['metrics']['asr']:.0f}"
        assert shown.loc[("badnets", "undefended"), "asr"] == f"{100 * own['undefended']['asr']:.0f}"
    undefended = pd.read_csv(out / "tables" / "undefended.csv")
    assert sorted(undefended["experiment"].unique()) == ["-", "smoke"] and (undefended["run"] == 1).all()


def test_a_data_free_defense_runs_once_per_poisoned_model(tiny_cfg, choices):
    """CLP and ``none`` use no images: before, a grid ran them at every budget and showed four identical columns."""
    first = run_cell(cfg := tiny_cfg("defense=clp", "budget=0", "recipe.epochs=2"), choices(cfg))
    assert first["cell"]["budget"] == "any" and first["data_source"] == "none" and first["defense_images"] == 0
    paths = {cell_path(c, choices(c)) for c in (tiny_cfg("defense=clp", f"budget={k}", "recipe.epochs=2")
                                                for k in (0, 1, 10))}
    assert len(paths) == 1 and next(iter(paths)).name.startswith("synthetic-fmnist_cnn-badnets-clp-kany-s0-")
    again = run_cell(cfg := tiny_cfg("defense=clp", "budget=10", "recipe.epochs=2"), choices(cfg))
    assert again["timings"] == first["timings"]  # read back, not run again: the same record
    ft = [cell_path(c, choices(c)) for c in (tiny_cfg("defense=ft", f"budget={k}") for k in (0, 1))]
    assert ft[0] != ft[1]  # a defense that uses images is a cell per budget
