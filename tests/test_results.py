"""The published sweeps in results/ are what their records say: ``bdbench report`` rebuilds each committed
table byte for byte from the committed records (figures are not compared: they carry metadata)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.report import report

RESULTS = Path(__file__).resolve().parent.parent / "results"
PUBLISHED = sorted(p.parent.parent for p in RESULTS.glob("*/report/tables"))


@pytest.mark.parametrize("folder", PUBLISHED, ids=[p.name for p in PUBLISHED])
def test_report_rebuilds_committed_tables(folder, tmp_path, monkeypatch):
    monkeypatch.setattr("bench.report.figures", lambda *args: [])  # tables only: fast and exact
    monkeypatch.setattr("bench.report.galleries", lambda *args: [])  # needs the cache of models
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
