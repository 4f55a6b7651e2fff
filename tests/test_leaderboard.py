"""The HTML leaderboard: a row per cell with links to its records and its config, sortable and filterable in a
real browser (headless Chromium, where installed), and an index of every published sweep."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from bdbench.leaderboard import rows, write_index, write_page

DEFENSES = ["ft", "clp", "linf_pruning"]


def cells(tmp_path: Path) -> pd.DataFrame:
    """Two seeds of three defenses on one attack, one seed diverged; each with a record file."""
    records = tmp_path / "sweep" / "records"
    records.mkdir(parents=True)
    out = []
    for d, defense in enumerate(DEFENSES):
        for seed in (0, 1):
            name = f"{defense}-s{seed}.json"
            (records / name).write_text(json.dumps({"config": {"defense": {"_target_": defense, "lr": 0.01 * d}}}))
            diverged = defense == "ft" and seed == 1
            out.append({"dataset": "fashion_mnist", "model": "fmnist_cnn", "recipe": "reference", "experiment": "-",
                        "attack": "badnets", "defense": defense, "budget": 1, "seed": seed,
                        "status": "diverged" if diverged else "ok", "asr": None if diverged else 0.1 + 0.3 * d,
                        "acc": None if diverged else 0.9 - 0.1 * d, "der": None if diverged else 0.5,
                        "undefended_asr": 0.99, "undefended_acc": 0.91, "record": f"records/{name}",
                        "isolation": "process" if defense == "clp" and seed == 1 else "sandbox"})
    return pd.DataFrame(out)


def test_rows_pool_seeds_count_outcomes_and_link_records(tmp_path):
    table = {r["defense"]: r for r in rows(cells(tmp_path), {("defense", "linf_pruning"): "ℓ∞ pruning"},
                                            tmp_path / "sweep", tmp_path / "sweep" / "report")}
    assert set(table) == {"ft", "clp", "ℓ∞ pruning"}
    assert table["ft"]["n"] == "1/2, diverged 1" and table["ft"]["asr"] == 10.0  # the diverged seed is not averaged
    assert table["ℓ∞ pruning"]["asr"] == 70.0 and table["clp"]["undefended_asr"] == 99.0
    assert table["clp"]["records"] == ["../records/clp-s0.json", "../records/clp-s1.json"]
    assert table["ℓ∞ pruning"]["config"] == {"defense": {"_target_": "linf_pruning", "lr": 0.02}}
    assert table["clp"]["isolation"] == "process, sandbox" and table["ft"]["isolation"] == "sandbox"  # seeds' isolations


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def dom(page: Path, fragment: str) -> str:
    done = subprocess.run([chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--dump-dom",
                           f"file://{page}#{fragment}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(chromium() is None, reason="no chromium (Debian: apt-get install chromium)")
def test_the_page_sorts_and_filters_in_a_browser(tmp_path):
    page = write_page(cells(tmp_path), {}, tmp_path / "sweep", tmp_path / "sweep" / "report", [], [], "test")
    body = dom(page, "sort=-asr")
    table = body.split('id="rows"')[1].split("</tbody>")[0]
    order = re.findall(r"<td class=\"\">(ft|clp|linf_pruning)</td>", table)
    assert order == ["linf_pruning", "clp", "ft"]  # a row per defense, highest ASR first
    order = re.findall(r"<td class=\"\">(ft|clp|linf_pruning)</td>", dom(page, "sort=asr").split('id="rows"')[1])
    assert order == ["clp", "linf_pruning", "ft"]  # FT's second seed diverged: its row ranks below, whatever the sort
    filtered = dom(page, "sort=asr&defense=clp").split('id="rows"')[1].split("</tbody>")[0]
    assert re.findall(r"<td class=\"\">(ft|clp|linf_pruning)</td>", filtered) == ["clp"]
    shot = tmp_path / "page.png"
    subprocess.run([chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,800",
                    f"--screenshot={shot}", f"file://{page}"], capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 10_000


def test_index_links_every_published_sweep(tmp_path):
    for name in ("a_sweep", "b_sweep"):
        write_page(cells(tmp_path / name), {}, tmp_path / name / "sweep", tmp_path / name / "report", [], [], name)
    index = write_index(tmp_path).read_text()
    assert 'href="a_sweep/report/index.html"' in index and 'href="b_sweep/report/index.html"' in index
    assert "6 cells: 5 finished, 1 diverged" in index
