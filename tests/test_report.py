"""``bdbench report``: mean ± std over seeds with n, problems listed not dropped, same bytes twice."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from bdbench.fsutil import sha256_json
from bdbench.records import identity, read_record
from bdbench.report import report
from bdbench.runner import run_cell


def place(folder: Path, rec: dict, name: str) -> Path:
    """A hand-changed record at a path of its own cell (a record's file name is its cell's name and config digest)."""
    stem = f"{name}-{sha256_json(identity(rec['config']))[:10]}"
    path = folder / f"{stem}.json"
    path.write_text(json.dumps({**rec, "cell": {**rec["cell"], "id": stem}}))
    return path


def test_report_tables_figures_and_problems(tiny_cfg, choices, tmp_path):
    for seed in (0, 1):
        for defense, budget in (("none", 1), ("clp", 0), ("ft", 1)):
            run_cell(cfg := tiny_cfg(f"seed={seed}", f"defense={defense}", f"budget={budget}", "recipe.epochs=2",
                                     "monitor.test_every=1"), choices(cfg))
    records = Path(cfg.paths.records)
    (records / "old.json").write_text(json.dumps({"schema_version": 1, "status": "ok"}))
    (records / "failed.json").write_text(json.dumps({"schema_version": 3, "status": "failed",
                                                      "error": "Traceback\nFloatingPointError: diverged"}))
    ok = json.loads(next(records.glob("*-none-kany-s0-*.json")).read_text())
    cell = {**ok["cell"], "defense": "nad", "id": "nad-cell"}
    (records / "nad-cell.json").write_text(json.dumps({"schema_version": 3, "status": "diverged", "cell": cell,
                                                   "error": "Traceback\nFloatingPointError: nad diverged: loss nan"}))
    for path in records.glob("*-s1-*.json"):  # two seeds' models with equal metrics are still two models
        rec = json.loads(path.read_text())
        path.write_text(json.dumps({**rec, "undefended": ok["undefended"]}))
    out = report(records, tmp_path / "report", data_root="unused", cache_root=cfg.paths.cache)
    assert "± 0.0 (n=2)" in (out / "tables" / "undefended.md").read_text()
    assert (out / "figures" / "gallery_synthetic.png").is_file()  # the trigger, from the cached attack
    asr = (out / "tables" / "asr.md").read_text()
    assert "*ASR (%), mean ± std over seeds (finished/run); k = clean images per class (any k: a data-free defense, " \
           "run once per poisoned model); outcomes: damaged: clean ACC more than 10 points below the undefended " \
           "model; no backdoor: the poisoned model's own ASR below 50%. dataset: Synthetic; model: CNN " \
           "(Fashion-MNIST); recipe: reference; experiment: -*" in asr  # constant columns: one caption line
    assert "| BadNets | CLP |" in asr  # display names
    assert "(2/2)" in asr and "±" in asr and "| any k | k=1 |" in asr  # data-free: one column, not one per k
    assert "| BadNets | nad | diverged (0/1) | – |" in asr  # not a gap (a record without display names: its name)
    cells = (out / "tables" / "cells.csv").read_text().splitlines()
    assert len(cells) == 1 + 7
    training = pd.read_csv(out / "tables" / "training.csv")  # one row per epoch of each seed's model, not per cell
    assert training[["seed", "epoch"]].values.tolist() == [[0, 1], [0, 2], [1, 1], [1, 2]]
    assert training["test_acc"].notna().all() and (training["minutes"].diff()[[1, 3]] > 0).all()
    problems = (out / "problems.md").read_text()
    assert "6 cells ran to the end: " in problems and "3 records not used" in problems
    assert "schema 1" in problems and "failed: FloatingPointError: diverged" in problems
    for stem in ("asr_heatmap_synthetic_fmnist_cnn_reference_k1", "acc_vs_asr_synthetic_fmnist_cnn_reference",
                 "asr_vs_budget_synthetic_fmnist_cnn_reference", "time_synthetic_fmnist_cnn_reference",
                 "training_synthetic_fmnist_cnn_reference"):  # time: where the sweep's went
        assert (out / "figures" / f"{stem}.png").is_file(), stem
    assert not list((out / "figures").glob("*.pdf")) and not list((out / "figures").glob("*.svg"))  # on request only
    every = lambda: {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    built = every()
    report(records, tmp_path / "report", data_root="unused", cache_root=cfg.paths.cache)
    assert every() == built  # unchanged records, unchanged bytes: a rebuild commits nothing (docs/artifacts.md)
    papers = report(records, tmp_path / "papers", data_root="unused", cache_root=cfg.paths.cache,
                    formats=("png", "pdf", "svg"))
    assert {p.suffix for p in (papers / "figures").glob("asr_heatmap_*")} == {".png", ".pdf", ".svg"}
    before = {p.name: p.read_bytes() for p in (out / "tables").iterdir()}
    report(records, tmp_path / "report", cache_root=str(tmp_path / "empty-cache"))  # no models: tables all the same
    assert "gallery synthetic | not drawn: FileNotFoundError" in (out / "problems.md").read_text()
    assert {p.name: p.read_bytes() for p in (out / "tables").iterdir()} == before


def test_report_refuses_rows_that_mix_settings(tiny_cfg, choices, tmp_path):
    """Same names, different recipe (one run with ``recipe.epochs=1``): averaged before, flagged in problems.md only.
    Now neither is shown anywhere: the row goes to problems.md with the reason, and the other rows stay."""
    for epochs in (1, 2):
        run_cell(cfg := tiny_cfg("defense=ft", "budget=1", f"recipe.epochs={epochs}"), choices(cfg))
    run_cell(cfg := tiny_cfg("attack=blended", "defense=ft", "budget=1", "recipe.epochs=2"), choices(cfg))
    out = report(Path(cfg.paths.records), tmp_path / "report", cache_root=str(tmp_path / "none"))
    problems = (out / "problems.md").read_text()
    assert "refused: 2 records of 2 kinds of poisoned model in one attack row" in problems
    asr = (out / "tables" / "asr.md").read_text()
    assert "| Blended (noise) | FT |" in asr and "| BadNets |" not in asr
    assert "BadNets" not in (out / "tables" / "undefended.md").read_text()


def test_captions_name_the_recipe_values_one_attack_trains_with_apart_from_the_rest(tiny_cfg, choices, tmp_path):
    """The CIFAR-10 grid's WaNet trains 100 epochs under the recipe name the other attacks train 50 with; the
    captions said "recipe: onecycle" alone, as if one schedule served every attack."""
    run_cell(cfg := tiny_cfg("defense=none", "budget=1", "recipe.epochs=1"), choices(cfg))
    records = Path(cfg.paths.records)
    rec = json.loads(next(records.glob("*.json")).read_text())
    for attack, shown, epochs in (("blended", "Blended (noise)", 1), ("wanet", "WaNet", 3)):
        recipe = rec["config"]["recipe"]
        recipe = {**recipe, "epochs": epochs, "scheduler": {**recipe["scheduler"], "T_max": epochs}}
        place(records, {**rec, "cell": {**rec["cell"], "attack": attack}, "display": {**rec["display"], "attack": shown},
                        "config": {**rec["config"], "recipe": recipe}}, attack)
    out = report(records, tmp_path / "report", cache_root=str(tmp_path / "none"))
    for table in ("asr", "acc", "ra", "der", "undefended", "cost", "walltime"):  # T_max follows epochs: named once
        caption = (out / "tables" / f"{table}.md").read_text().splitlines()[0]
        assert "recipe: reference" in caption and caption.endswith(". recipe values that differ by attack: epochs 1 "
                                                                   "(WaNet: 3)*"), table
    assert "recipe values that differ by attack: epochs 1 (WaNet: 3)" in (out / "tables" / "asr.tex").read_text()


def test_every_table_cell_counts_finished_seeds_and_names_the_rest(tiny_cfg, choices, tmp_path):
    """Before, a mean over the finished seeds alone read like a result of all of them (FT on BadNets at k=1
    showed 100 with two of three seeds diverged), and a collapsed model's low ASR read like a defense."""
    for seed in (0, 1, 2):
        run_cell(cfg := tiny_cfg(f"seed={seed}", "defense=clp", "budget=0", "recipe.epochs=2"), choices(cfg))
    records = Path(cfg.paths.records)
    paths = sorted(records.glob("*.json"))
    diverged = json.loads(paths[1].read_text())
    paths[1].write_text(json.dumps({**diverged, "status": "diverged", "metrics": None, "error": "loss nan"}))
    collapsed = json.loads(paths[2].read_text())
    collapsed["metrics"].update(acc=0.1, asr=0.0, collapsed=True)
    paths[2].write_text(json.dumps(collapsed))
    out = report(records, tmp_path / "report", cache_root=str(tmp_path / "none"))
    asr = (out / "tables" / "asr.md").read_text()
    first_metrics = json.loads(paths[0].read_text())["metrics"]
    first = first_metrics["asr"] * 100
    assert f"| BadNets | CLP | {first:.1f} (1/3; collapsed 1, diverged 1) |" in asr  # not averaged with 0.0
    only_collapsed = {**collapsed, "cell": {**collapsed["cell"], "defense": "ft"},
                      "display": {**collapsed["display"], "defense": "FT"}}
    place(records, only_collapsed, "extra")
    asr = (report(records, tmp_path / "report2", cache_root=str(tmp_path / "none")) / "tables" / "asr.md").read_text()
    assert "| BadNets | FT | collapsed (0/1) |" in asr
    no_backdoor = {**only_collapsed, "cell": {**collapsed["cell"], "defense": "nad", "seed": 3}, "seed": 3,  # its model
                   "display": {**collapsed["display"], "defense": "NAD"},
                   "undefended": {**collapsed["undefended"], "asr": 0.124}, "metrics": first_metrics}  # WaNet, WRN-16-1
    place(records, no_backdoor, "no-backdoor")
    out = report(records, tmp_path / "report3", cache_root=str(tmp_path / "none"))
    asr = (out / "tables" / "asr.md").read_text()
    assert "| BadNets | NAD | no backdoor (0/1) |" in asr  # a low ASR after a defense, but there was none to remove
    models = pd.Series([json.loads(paths[i].read_text())["undefended"]["asr"] for i in (0, 2)] + [0.124]) * 100
    assert f"{models.mean():.1f} ± {models.std():.1f} (n=3)" in (out / "tables" / "undefended.md").read_text()
    assert ("4 cells ran to the end: 1 finished, 0 damaged, 2 collapsed, 1 no backdoor (damaged: clean ACC more than "
            "10 points below the undefended model; no backdoor: the poisoned model's own ASR below 50%); 0 groups of "
            "cells refused (mixed settings); 1 records not used") in (out / "problems.md").read_text()


def test_heatmap_cells_without_a_number_say_why():
    """A cell that never ran was drawn white, like ASR 0; a collapsed one read as a low ASR. Now only finished
    cells get a number (a colour); the others say what became of them, and the undefended column comes first."""
    from bdbench.figures import cell_grid

    cells = pd.DataFrame({"attack": ["a", "a", "b"], "defense": ["x", "y", "x"], "status": ["ok", "collapsed", "ok"],
                          "asr": [0.5, 0.0, 0.9], "undefended_asr": [0.99, 0.99, 0.8]})
    values, labels = cell_grid(cells, "asr")
    assert list(values.columns) == ["undefended", "x", "y"]
    assert labels.loc["a", "x"] == "50" and labels.loc["a", "y"] == "collapsed" and labels.loc["b", "y"] == "n/a"
    assert values.loc["a", "undefended"] == 99.0 and pd.isna(values.loc["a", "y"]) and pd.isna(values.loc["b", "y"])


def test_tables_are_numeric_in_csv_and_compile_in_latex(tmp_path):
    """The CSV twin of a table holds numbers (mean, std, finished, run, outcomes), not strings like "97.2 (n=1)";
    the LaTeX is booktabs with every underscore, percent sign and ℓ∞ escaped, and compiles where pdflatex is."""
    import shutil
    import subprocess

    import pandas as pd

    from bdbench.report import latex, numeric, present

    df = pd.DataFrame({"dataset": ["d"] * 3, "model": ["m"] * 3, "recipe": ["r"] * 3, "experiment": ["-"] * 3,
                       "attack": ["badnets"] * 3, "defense": ["linf_pruning"] * 3, "budget": [1] * 3, "seed": [0, 1, 2],
                       "status": ["ok", "ok", "diverged"], "asr": [0.5, 0.7, None]})
    numbers = numeric(df, "asr")
    row = numbers.iloc[0]
    assert (row["mean"], row["std"], row["finished"], row["run"], row["diverged"]) == (60.0, round(20 ** 0.5 * 10 ** 0.5, 4), 2, 3, 1)
    assert numbers[["finished", "run", "diverged"]].dtypes.eq("int64").all()
    shown, caption = present(df[["dataset", "model", "attack", "defense"]].head(1),
                             {("defense", "linf_pruning"): "ℓ∞ pruning", ("dataset", "d"): "Data_set"})
    assert list(shown.columns) == ["attack", "defense"] and caption == "dataset: Data_set; model: m"
    tex = latex(shown.assign(**{"k=1": ["60.0 ± 14.1 (2/3; diverged 1)"]}), "ASR (%) on " + caption)
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"badnets" in tex
    assert r"$\ell_\infty$ pruning" in tex and r"$\pm$" in tex and r"ASR (\%) on dataset: Data\_set" in tex
    assert "_" not in tex.replace(r"\_", "").replace(r"\ell_", "")  # no bare underscore anywhere
    if shutil.which("pdflatex"):
        (tmp_path / "t.tex").write_text("\\documentclass{article}\\usepackage{booktabs}\\begin{document}\n"
                                        + tex + "\\end{document}\n")
        done = subprocess.run(["pdflatex", "-halt-on-error", "-interaction=nonstopmode", "t.tex"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout[-2000:]


def test_wall_time_counts_each_model_once_and_every_phase_of_its_cells():
    """The README's wall time is this table: training once per poisoned model (three cells share model m1, trained
    in 120 s), each other phase summed over the cells, the total = training + the cells' time outside training."""
    import pandas as pd

    from bdbench.report import wall_time

    df = pd.DataFrame({"dataset": ["d"] * 4, "model": ["m"] * 4, "recipe": ["r"] * 4, "experiment": ["e"] * 4,
                       "seed": [0, 0, 0, 1], "attack": ["a"] * 4, "model_key": ["m1", "m1", "m1", "m2"],
                       "train_seconds": [120.0, 120.0, 120.0, 60.0], "synthesis_seconds": [30.0, None, None, None],
                       "reversal_seconds": [None, 6.0, None, None], "defense_seconds": [12.0, 18.0, 6.0, 6.0],
                       "eval_seconds": [6.0, 6.0, 6.0, 6.0], "cell_seconds": [48.0, 30.0, 12.0, 12.0]})
    table = wall_time(df).set_index("seed")
    assert table.loc["0", ["cells", "training", "synthesis", "reversal", "defenses", "evaluation", "total"]].tolist() \
        == [3, 2.0, 0.5, 0.1, 0.6, 0.3, 3.5]  # (120 + 48 + 30 + 12) / 60
    assert table.loc["all", ["cells", "training", "total"]].tolist() == [4, 3.0, 4.7]  # (180 + 102) / 60


def test_time_to_accuracy_is_the_first_measured_epoch_that_reaches_it():
    """Minutes are summed training seconds (test passes excluded); unmeasured epochs never count; a model that never
    reaches the target says so (None), and the final row is the last epoch's."""
    from bdbench.report import time_to, training_rows

    def rec(seed: int, accs: list) -> dict:
        return {"cell": {"dataset": "d", "model": "m", "recipe": "r", "experiment": "e", "attack": "a", "seed": seed},
                "cache": {"key": f"k{seed}"},
                "training": [{"epoch": e + 1, "seconds": 60.0, "acc": 0.5, "test_seconds": 9.0,
                              **({} if a is None else {"test_acc": a, "test_asr": 0.9})} for e, a in enumerate(accs)]}

    rows = training_rows(rec(0, [None, 0.80, 0.86, 0.87])) + training_rows(rec(1, [0.5, 0.84]))
    table = time_to(pd.DataFrame(rows), 85).set_index("seed")
    assert table.loc[0, ["epoch to 85 %", "min to 85 %", "epochs", "min", "ACC"]].tolist() == [3, 3.0, 4, 4.0, 87.0]
    assert pd.isna(table.loc[1, "epoch to 85 %"]) and table.loc[1, "ACC"] == 84.0


def test_a_published_sweep_keeps_its_cache_beside_its_records(tiny_cfg, choices, tmp_path, monkeypatch):
    """``paths.cache=results/<sweep>/cache``: the cache's manifests are no records, and the gallery draws the
    trigger from that cache without being told where it is."""
    sweep = tmp_path / "sweep"
    cfg = tiny_cfg("defense=clp", "budget=1", "recipe.epochs=2")
    cfg.paths.records, cfg.paths.cache = str(sweep / "records"), str(sweep / "cache")
    run_cell(cfg, choices(cfg))
    assert list((sweep / "cache").rglob("manifest.json"))
    monkeypatch.delenv("BDBENCH_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)  # no .cache/bdbench here: the gallery can only come from sweep/cache
    out = report(sweep, data_root="unused")
    assert "1 cells ran to the end: 1 finished" in (out / "problems.md").read_text()
    assert "0 records not used" in (out / "problems.md").read_text()
    assert (out / "figures" / "gallery_synthetic.png").is_file()


def test_a_record_copied_over_another_cells_file_is_not_that_cell(tiny_cfg, choices, tmp_path):
    """A record copied over another cell's path counted as that cell: the table showed FT's numbers twice and the other
    cell not at all. Now the report lists it as a problem and a sweep runs the cell again."""
    for defense in ("ft", "clp"):
        run_cell(cfg := tiny_cfg(f"defense={defense}", "budget=1", "recipe.epochs=1"), choices(cfg))
    records = Path(cfg.paths.records)
    ft, clp = (next(records.glob(f"*-{name}-*.json")) for name in ("ft", "clp"))
    clp.write_text(ft.read_text())
    assert read_record(clp) is None and read_record(ft) is not None
    out = report(records, tmp_path / "report", cache_root=str(tmp_path / "none"))
    assert f"not this file's cell: it names cell {ft.stem}, not {clp.stem}" in (out / "problems.md").read_text()
    assert "(1/1)" in (out / "tables" / "asr.md").read_text() and "(2/2)" not in (out / "tables" / "asr.md").read_text()
