"""``bdbench reproduction``: the verdict per published row is the arithmetic the page states."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from bdbench.reproduction import source_table, verdict

BLOCK = {"match": {"model": "wrn16_1", "attack": "badnets", "budget": 250},
         "rows": [{"defense": "none", "acc": 85.65, "asr": 100.0}, {"defense": "ft", "acc": 82.32, "asr": 18.13},
                  {"defense": "nad", "acc": 82.12, "asr": 3.57}, {"defense": "anp", "acc": 84.0, "asr": 1.0}]}


def cell(defense: str, seed: int, acc: float, asr: float, status: str = "ok", model: str = "wrn16_1") -> dict:
    """A row as ``bdbench.report.load`` makes it; a cell that did not finish has no metrics there."""
    row = {"model": model, "attack": "badnets", "budget": 250, "defense": defense, "seed": seed, "status": status}
    if status == "ok":
        row.update(acc=acc, asr=asr, undefended_acc=0.83 + 0.02 * seed, undefended_asr=0.99, model_key=f"m{seed}")
    return row


def test_verdicts_follow_the_stated_tolerances():
    assert verdict({"acc": -2.5, "asr": -80.0}, {"acc": -3.3, "asr": -81.9}) == "agrees"
    assert verdict({"acc": -2.5, "asr": -50.0}, {"acc": -3.3, "asr": -81.9}).startswith("direction only (ASR -50.0")
    assert verdict({"acc": -2.5, "asr": -1.0}, {"acc": -3.3, "asr": -81.9}) == "disagrees: ASR keeps, published lowers"
    assert verdict({"acc": -1.9, "asr": -80.0}, {"acc": -3.3, "asr": -81.9}) == \
        "disagrees: ACC keeps, published lowers"  # 1.9 points is within the 2-point "no change" band


def test_a_change_of_exactly_the_tolerance_is_not_decided_by_float32_noise():
    """The grid's Input-aware ANP cell at k = 250: 8,288 of 10,000 test images right after the defense, 8,488
    before, a drop of exactly 2.0 points, which the records' float32 fractions make -1.99999809."""
    drop = 100 * (np.float32(0.8288).item() - np.float32(0.8488).item())  # float32 fractions, as records hold them
    assert drop > -2.0  # the noise this guards against
    assert verdict({"acc": drop, "asr": -92.5}, {"acc": -0.31, "asr": -96.62}) == \
        "disagrees: ACC lowers, published keeps"
    row = {**cell("anp", 0, np.float32(0.8288).item(), 0.0), "undefended_acc": np.float32(0.8488).item()}
    table = source_table(BLOCK, pd.DataFrame([row])).set_index("defense")  # the page's own path, records to verdict
    assert table.loc["anp", "verdict"] == "disagrees: ACC lowers, published keeps"  # published: 85.65 -> 84.0


def test_a_table_row_averages_finished_seeds_and_counts_the_rest():
    cells = pd.DataFrame([cell("ft", 0, 0.82, 0.20), cell("ft", 1, 0.80, 0.10), cell("ft", 2, 0.1, 0.0, "diverged"),
                          cell("nad", 0, 0.82, 0.04), cell("nad", 0, 0.5, 0.5, model="other")])
    table = source_table(BLOCK, cells).set_index("defense")
    none = table.loc["none"]  # one undefended model per seed that finished a cell: seeds 0 and 1
    assert none["bdbench ACC / ASR"] == "84.0 ± 1.4 / 99.0 ± 0.0" and none["n"] == "2/2"
    assert none["verdict"] == "baseline: ACC -1.7, ASR -1.0 points"
    ft = table.loc["ft"]  # mean of the two finished seeds; the diverged one is counted, not averaged
    assert ft["bdbench ACC / ASR"] == "81.0 ± 1.4 / 15.0 ± 7.1" and ft["n"] == "2/3"
    assert ft["verdict"] == "agrees"  # changes: ASR (20-99 + 10-99)/2 = -84 vs -81.87, ACC (82-83 + 80-85)/2 = -3 vs -3.33
    assert table.loc["nad", "n"] == "1/1" and table.loc["anp", "bdbench ACC / ASR"] == "not run"


def test_a_model_without_a_backdoor_says_so_instead_of_a_defense_result():
    """WaNet on WRN-16-1 ended at 12.4 % ASR: its cells are 'no backdoor', which read as 'not run' here before."""
    rows = [{**cell("ft", 0, 0.80, 0.05), "status": "no backdoor", "undefended_asr": 0.124}]
    table = source_table(BLOCK, pd.DataFrame(rows)).set_index("defense")
    assert table.loc["ft", "bdbench ACC / ASR"] == "no backdoor 1" and table.loc["ft", "n"] == "0/1"
    assert table.loc["none", "verdict"].endswith("ASR -87.6 points; no backdoor (ASR below 50%): the defense rows "
                                                 "measure nothing")
    assert table.loc["nad", "bdbench ACC / ASR"] == "not run"


def test_the_command_writes_a_page_with_every_source_and_says_what_did_not_run(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bdbench.cli", "reproduction", "--out", str(tmp_path / "r.md")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    text = (tmp_path / "r.md").read_text()
    sources = OmegaConf.load(Path(__file__).resolve().parent.parent / "results" / "reproduction.yaml")
    assert [line[3:] for line in text.splitlines() if line.startswith("## ")] == [b.source for b in sources]
    assert "85.65 / 100.00" in text and "defense.lr0: 0.01" in text and "evaluate_by_threshold" in text
    missing = subprocess.run([sys.executable, "-m", "bdbench.cli", "reproduction", "--published", "nope.yaml"],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "--published nope.yaml: no such file" in missing.stderr
