"""``bdbench report DIR``: records in, paper tables and figures out.

Reads every record under DIR into pandas and writes, under DIR/report (or --out):
  tables/<metric>.{md,tex}      ACC, ASR, RA, DER as mean ± std over seeds, per attack x defense (rows) and
                                budget (columns), display names, the columns that hold one value on every
                                row in the caption line; every cell says how many seeds finished of how
                                many ran, and what became of the others (bdbench.outcome: damaged, collapsed, no
                                backdoor, diverged, failed): none is averaged in; a cell whose every seed was
                                damaged shows its number marked "damaged". Data-free defenses have one column,
                                "any k". LaTeX: booktabs through pandas' Styler, escaped
  tables/<metric>.csv           the same as numbers: mean, std, finished, run and each outcome's count
  tables/undefended.*           the poisoned models' own ACC / ASR / RA per attack
  tables/cost.*                 defense wall time and peak memory
  tables/walltime.*             minutes per seed and attack from an empty cache (training once per model,
                                synthesis, reversal, defenses, evaluation) and in all
  tables/training.csv           each poisoned model's training curve, per epoch: minutes trained, train ACC
                                and, where ``monitor.test_every`` measured them, clean test ACC and ASR
  tables/cells.csv              one row per record (the long format everything above is built from);
                                failed cells appear in the tables as "failed" / "diverged" with their count
  index.html                    the HTML leaderboard (bdbench.leaderboard): a sortable, filterable table of
                                every cell with links to its records and config, the figures and galleries
  problems.md                   records that are failed, unreadable or of another schema, cells refused because
                                one row would mix settings, the cells that ran on synthetic data, figures
                                not drawn
  figures/                      (bdbench.figures; PNG, PDF, SVG) ASR and ACC heatmaps per budget with the
                                undefended column, ACC-ASR scatter, ASR against budget, where the time went
                                (training per attack, each defense, synthesis, reversal, evaluation), the
                                poisoned models' test ACC and ASR against training minutes, and
                                the trigger gallery of each data set when the records' poisoned models are in
                                the cache (``--cache``) and the data under ``--data``
Tables are sorted and formatted deterministically, so the same records give the same bytes. Every figure carries the
digest of the numbers it draws (``bdbench.figures.Figure.digest``), so a committed picture is checked against its
records without drawing it.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from bdbench import figures as draw
from bdbench.columns import ANY, KEYS, NAMED, SETTING, budget_key, budget_label, data_free, named
from bdbench.code_versions import current_name, renamed
from bdbench.fsutil import sha256_json
from bdbench.leaderboard import write_page
from bdbench.outcome import DAMAGED, NOT_OK, OK, RAN, Rule, configured, of_record
from bdbench.records import READABLE_SCHEMAS, misplaced

METRICS = ["acc", "asr", "ra", "der"]
LABELS = {"acc": "ACC", "asr": "ASR", "ra": "RA", "der": "DER"}


def display_names(rec: dict) -> dict[tuple[str, str], str]:
    """(group, config name) -> what tables and figures call it: the record's display section (schema 4), else the
    config name."""
    cell, shown = rec["cell"], rec.get("display") or {}
    return {(g, cell[g]): shown.get(g, cell[g]) for g in NAMED}


def model_setting(rec: dict) -> str | None:
    """What makes two poisoned models of one attack row comparable: the data set, model, attack and recipe configs,
    the attack's target set aside (the published grids draw it from the seed; a cell's own ``setting`` tells two
    fixed targets apart). None for a record without a config (it compares with nothing)."""
    config = rec.get("config")
    if not config:
        return None
    attack = {k: v for k, v in (config.get("attack") or {}).items() if k != "target"}
    dataset = {k: v for k, v in (config.get("dataset") or {}).items() if k != "download"}
    return sha256_json({"dataset": dataset, "model": config.get("model"), "attack": attack,
                        "recipe": config.get("recipe")})[:12]


def isolation_of(rec: dict) -> str | None:
    """How the cell's defense ran (bdbench.isolation); records from before the sandbox say it through
    ``peak_memory.isolated`` (a worker process, or the runner's own). None for a cell that failed before it."""
    if "isolation" in rec:
        return rec["isolation"]
    isolated = (rec.get("peak_memory") or {}).get("isolated")
    return None if isolated is None else "process" if isolated else "none"


def budget_of(rec: dict) -> int | str:
    """A cell's budget; a data-free defense's cell recorded at a number by an older version is "any" like today's."""
    budget = rec["cell"]["budget"]
    target = ((rec.get("config") or {}).get("defense") or {}).get("_target_")
    return ANY if str(budget) != ANY and target and data_free(target) else budget


def load(root: str | Path, triggers: dict | None = None, names: dict | None = None, curves: list | None = None,
         recipes: dict | None = None, rule: Rule | None = None) -> tuple[pd.DataFrame, list[dict]]:
    """(one row per cell that has a record, one entry per record that is not a cell); every cell is judged by
    ``rule`` (default: the configured one, bdbench.outcome) into its ``status``. ``triggers`` collects
    one (dataset config, attack config, cache key, model config) per data set and attack, for the gallery;
    ``names`` collects the display names; ``curves`` one row per epoch of each poisoned model's training
    (``training_curves``); ``recipes`` each attack's flattened recipe config per sweep setting (``recipe_note``)."""
    root = Path(root)
    rule = rule or configured()
    rows, problems = [], []
    names = {} if names is None else names
    for path in sorted(root.rglob("*.json")):
        if {"report", "cache"} & set(path.relative_to(root).parts):  # a sweep's report and published cache
            continue
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            problems.append({"record": str(path.relative_to(root)), "problem": f"unreadable ({type(exc).__name__})"})
            continue
        if rec.get("schema_version") not in READABLE_SCHEMAS:
            readable = ", ".join(map(str, READABLE_SCHEMAS))
            problems.append({"record": str(path.relative_to(root)),
                             "problem": f"schema {rec.get('schema_version')} (this version reads {readable})"})
            continue
        wrong = misplaced(path, rec)
        if wrong:
            problems.append({"record": str(path.relative_to(root)), "problem": f"not this file's cell: {wrong}"})
            continue
        if "config" in rec:  # a record written before the namespace names its components as today's code does
            rec["config"] = renamed(rec["config"], current_name)
        recipe = (rec.get("config") or {}).get("recipe")
        if recipes is not None and "cell" in rec and isinstance(recipe, dict):
            key = tuple(rec["cell"][k] for k in (*SETTING, "attack"))
            if key not in recipes:  # one per poisoned model's setting, not one per cell
                recipes[key] = pd.json_normalize(recipe).iloc[0]
        if rec.get("status") != "ok":
            error = (rec.get("error") or "").strip().splitlines()
            problems.append({"record": str(path.relative_to(root)),
                             "problem": f"{'diverged' if rec.get('status') == 'diverged' else 'failed'}: "
                                        f"{error[-1] if error else '?'}"})
            if "cell" in rec:  # the tables say the cell failed, rather than leave a gap
                cell = rec["cell"]
                names.update(display_names(rec))
                rows.append({**{k: cell[k] for k in KEYS}, "budget": budget_of(rec), "seed": cell["seed"],
                             "status": of_record(rec, rule), "setting": cell["setting"],
                             "model_setting": model_setting(rec), "isolation": isolation_of(rec),
                             "record": str(path.relative_to(root))})
            continue
        cell, m, u = rec["cell"], rec["metrics"], rec["undefended"]
        names.update(display_names(rec))
        if triggers is not None and cell["attack"] != "none":
            triggers.setdefault(cell["dataset"], {}).setdefault(
                cell["attack"], (rec["config"]["dataset"], rec["config"]["attack"], rec["cache"]["key"],
                                 rec["config"]["model"]))
        if curves is not None:
            curves += training_rows(rec)
        rows.append({**{k: cell[k] for k in KEYS}, "budget": budget_of(rec), "seed": cell["seed"],
                     "status": of_record(rec, rule), "setting": cell["setting"],
                     "model_setting": model_setting(rec), "isolation": isolation_of(rec),
                     "data_source": rec["data_source"], **{k: m.get(k) for k in METRICS},
                     **{f"undefended_{k}": u.get(k) for k in ("acc", "asr", "ra")},
                     # a reference code's test-set choice where a run measured it (bdbench.oracle): reproduction
                     # pages read it; no table, figure or leaderboard does
                     **({f"oracle_{k}": rec["oracle"]["metrics"][k] for k in ("acc", "asr")}
                        if rec.get("oracle") else {}),
                     "defense_seconds": rec["timings"].get("defense"),
                     **{f"{phase}_seconds": rec["timings"].get(phase) for phase in ("synthesis", "reversal", "eval")},
                     "cell_seconds": rec["timings"]["total"] - rec["timings"].get("train", 0.0),
                     "model_key": rec["cache"]["key"], "train_seconds": rec["cache"]["train_seconds"],
                     "peak_rss_mb": rec["peak_memory"]["rss_mb"],
                     "cuda_mb": rec["peak_memory"].get("cuda_mb"), "record": str(path.relative_to(root))})
    df = pd.DataFrame(rows)
    if df.empty:
        return df, problems
    repeated = df.assign(budget=df["budget"].astype(str)).duplicated(KEYS + ["budget", "seed", "setting"])
    for record in df.loc[repeated, "record"]:  # an older grid ran a data-free defense once per budget
        problems.append({"record": record, "problem": "repeats a data-free cell of another budget (an older version "
                                                      "ran it at every budget): the first record is used"})
    return df[~repeated].reset_index(drop=True), problems


def training_rows(rec: dict) -> list[dict]:
    """One row per epoch of the record's poisoned-model training: the minutes trained so far (test passes not
    counted) and, where ``monitor.test_every`` measured them, clean test ACC and ASR (%)."""
    cell, minutes, rows = rec["cell"], 0.0, []
    for row in rec.get("training") or []:
        minutes += row["seconds"] / 60
        rows.append({"dataset": cell["dataset"], "model": cell["model"], "recipe": cell["recipe"],
                     "experiment": cell["experiment"], "attack": cell["attack"], "seed": cell["seed"], "model_key": rec["cache"]["key"],
                     "epoch": row["epoch"], "minutes": minutes, "train_acc": 100 * row["acc"],
                     "test_acc": None if row.get("test_acc") is None else 100 * row["test_acc"],
                     "test_asr": None if row.get("test_asr") is None else 100 * row["test_asr"]})
    return rows


def training_frame(rows: list[dict]) -> pd.DataFrame:
    """``load``'s training rows as a frame, each model once (its cells all carry the same history)."""
    return pd.DataFrame(rows).drop_duplicates(["model_key", "epoch"]) if rows else pd.DataFrame()


def time_to(curves: pd.DataFrame, target: float) -> pd.DataFrame:
    """Per poisoned model (attack x seed): the first measured epoch whose clean test ACC reaches ``target`` (%),
    the minutes trained until then (None: never reached), and the final epoch's ACC, ASR and minutes."""
    rows = []
    for (dataset, model, recipe, attack, seed), part in curves.groupby(
            ["dataset", "model", "recipe", "attack", "seed"]):
        measured, last = part.dropna(subset=["test_acc"]), part.iloc[-1]
        hit = measured[measured["test_acc"] >= target]
        rows.append({"dataset": dataset, "model": model, "recipe": recipe, "attack": attack, "seed": seed,
                     f"epoch to {target:g} %": None if hit.empty else int(hit["epoch"].iloc[0]),
                     f"min to {target:g} %": None if hit.empty else round(hit["minutes"].iloc[0], 1),
                     "epochs": int(last["epoch"]), "min": round(last["minutes"], 1),
                     "ACC": last["test_acc"], "ASR": last["test_asr"]})
    return pd.DataFrame(rows)


def mean_std(values: pd.Series, scale: float = 100.0, digits: int = 1) -> str:
    v = values.dropna() * scale
    if v.empty:
        return "–"
    if len(v) == 1:
        return f"{v.iloc[0]:.{digits}f} (n=1)"
    return f"{v.mean():.{digits}f} ± {v.std():.{digits}f} (n={len(v)})"


def mean_text(values: pd.Series, digits: int) -> str:
    return f"{values.iloc[0]:.{digits}f}" if len(values) == 1 else \
        f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def summarize(group: pd.DataFrame, column: str, scale: float, digits: int, finished: tuple[str, ...] = (OK,)
              ) -> str:
    """mean ± std of the finished cells, then (finished/run; what became of the others), e.g.
    ``97.2 ± 1.0 (2/3; diverged 1)`` or ``collapsed (0/1)``: a failure is never averaged in, never hidden. A cell
    whose seeds all ran but lost their accuracy keeps its number, marked: ``9.4 damaged (0/1)``."""
    done = group.loc[group["status"].isin(finished), column].dropna() * scale
    others = group.loc[~group["status"].isin(finished), "status"].value_counts().sort_index()
    tally = f"{len(done)}/{len(group)}" + ("; " + ", ".join(f"{s} {n}" for s, n in others.items()) if len(others) else "")
    if done.empty:
        damaged = group.loc[group["status"] == DAMAGED, column].dropna() * scale
        if len(damaged) and DAMAGED not in finished:
            return f"{mean_text(damaged, digits)} {DAMAGED} ({tally.split(';')[0] if len(others) == 1 else tally})"
        return f"{others.index[0]} ({tally.split(';')[0]})" if len(others) == 1 else f"– ({tally})"
    return f"{mean_text(done, digits)} ({tally})"


def recipe_note(recipes: dict, names: dict) -> str:
    """The recipe values on which the attacks of one sweep setting differ under one recipe name (a named
    deviation, such as WaNet's 100 epochs on WRN-16-1), e.g. "recipe values that differ by attack: epochs 50
    (WaNet: 100)": the caption's "recipe: onecycle" alone would claim one schedule for every attack. The value
    most attacks share comes first; a key that varies exactly as one named before it (the scheduler's
    total_steps with epochs) is left out."""
    index = pd.MultiIndex.from_tuples(recipes.keys(), names=[*SETTING, "attack"])
    table = pd.DataFrame(recipes.values(), index=index).astype(str)
    groups, notes = table.groupby(level=SETTING), []
    for setting, part in groups:
        part = part.droplevel(SETTING)
        varying = part.loc[:, part.nunique() > 1]
        patterns = pd.Series([tuple(pd.factorize(varying[key])[0]) for key in varying])
        varying = varying.loc[:, ~patterns.duplicated().to_numpy()]
        where = " / ".join(names.get((g, v), v) for g, v in zip(SETTING, setting)) + ": " if len(groups) > 1 else ""
        for key, values in varying.items():
            base = Counter(values).most_common(1)[0][0]
            others = ", ".join(f"{names.get(('attack', a), a)}: {v}" for a, v in values.items() if v != base)
            notes.append(f"{where}{key} {base} ({others})")
    return "recipe values that differ by attack: " + "; ".join(notes) if notes else ""


def pivot(df: pd.DataFrame, column: str, scale: float = 100.0, digits: int = 1,
          finished: tuple[str, ...] = (OK,)) -> pd.DataFrame:
    """Rows: data set, model, recipe, attack, defense; columns: budget ("any k" first: the data-free defenses'
    one cell); cells: mean ± std of the finished seeds and the count of each outcome (a defense that diverges,
    collapses or damages the model is a result, not a gap)."""
    table = (df.assign(budget=df["budget"].astype(str)).groupby(KEYS + ["budget"])[["status", column]]
             .apply(lambda g: summarize(g, column, scale, digits, finished)).unstack("budget").sort_index())
    table = table[sorted(table.columns, key=budget_key)]
    table.columns = [budget_label(k) for k in table.columns]
    return table.fillna("–").reset_index()


def numeric(df: pd.DataFrame, column: str, scale: float = 100.0, finished: tuple[str, ...] = (OK,),
            keys: list[str] = KEYS + ["budget"]) -> pd.DataFrame:
    """The machine-readable twin of a table: per row key, mean and std of the finished cells (in %), how many
    finished of how many ran, and how many had each other outcome. Numbers only (budget "any": data-free)."""
    if "budget" in keys:
        df = df.assign(budget=df["budget"].astype(str))
    def stats(group: pd.DataFrame) -> pd.Series:
        done = group["status"].isin(finished)
        values = group.loc[done, column].dropna().astype(float) * scale
        return pd.Series({"mean": round(values.mean(), 4) if len(values) else float("nan"),
                          "std": round(values.std(), 4) if len(values) > 1 else float("nan"),
                          "finished": int(done.sum()), "run": len(group),
                          **{status: int((group["status"] == status).sum()) for status in OUTCOMES}})

    table = df.groupby(keys)[["status", column]].apply(stats).reset_index()
    if "budget" in keys:
        table = table.sort_values([*[k for k in keys if k != "budget"], "budget"],
                                  key=lambda c: c.map(budget_key) if c.name == "budget" else c, kind="stable")
    return table.astype({c: int for c in ("finished", "run", *OUTCOMES)}).reset_index(drop=True)


OUTCOMES = NOT_OK


def wall_time(df: pd.DataFrame) -> pd.DataFrame:
    """Minutes per seed and attack, each phase a column, and a total per sweep setting (the row ``all``)."""
    def minutes(group: pd.DataFrame) -> pd.Series:
        training = group.drop_duplicates("model_key")["train_seconds"].sum()
        phases = {p: group[f"{p}_seconds"].fillna(0).sum() for p in ("synthesis", "reversal", "defense", "eval")}
        spent = (pd.Series({"training": training, **phases, "total": training + group["cell_seconds"].sum()})
                 / 60).round(1)
        return pd.concat([pd.Series({"cells": len(group)}), spent]).astype(object)

    per_seed = df.groupby(SETTING + ["seed", "attack"])[list(df.columns)].apply(minutes).reset_index()
    total = df.groupby(SETTING)[list(df.columns)].apply(minutes).reset_index().assign(seed="all", attack="all")
    table = pd.concat([per_seed.astype({"seed": str}), total], ignore_index=True).astype({"cells": int})
    return table.rename(columns={"defense": "defenses", "eval": "evaluation"})


def present(table: pd.DataFrame, names: dict) -> tuple[pd.DataFrame, str]:
    """The table a reader sees: display names, and the columns that hold one value on every row (data set,
    model, recipe, experiment) moved to a caption line."""
    table = named(table, names)
    constant = [c for c in SETTING if c in table and table[c].nunique() == 1]
    caption = "; ".join(f"{c}: {table[c].iloc[0]}" for c in constant)
    return table.drop(columns=constant), caption


def markdown(table: pd.DataFrame) -> str:
    cols = [str(c) for c in table.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


LATEX = {"ℓ∞": r"$\ell_\infty$", "ℓ": r"$\ell$", "∞": r"$\infty$", "±": r"$\pm$", "–": "--", "≥": r"$\geq$"}


def escape_latex(text: str) -> str:
    """LaTeX's special characters in running text (the Styler escapes the cells and headers)."""
    special = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
               "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return "".join(special.get(c, c) for c in text)


def latex(table: pd.DataFrame, caption: str) -> str:
    """A booktabs table through pandas' Styler, every cell and header escaped for LaTeX (underscores,
    percent signs, ℓ∞, ±), so it compiles as it is: ``\\usepackage{booktabs}`` and ``\\input``."""
    styler = table.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
    tex = styler.to_latex(hrules=True, caption=escape_latex(caption) or None, position_float="centering",
                          environment="table", column_format="l" * len(table.columns))
    for text, command in LATEX.items():
        tex = tex.replace(text, command)
    return tex


def write_table(table: pd.DataFrame, folder: Path, name: str, names: dict, numbers: pd.DataFrame | None = None,
                title: str = "", note: str = "") -> None:
    """``name``.md and .tex for readers (display names, constant columns and ``note`` in the caption),
    ``name``.csv with numbers only (``numbers``, else the table itself)."""
    folder.mkdir(parents=True, exist_ok=True)
    shown, caption = present(table, names)
    caption = ". ".join(p for p in (title, caption, note) if p)
    (folder / f"{name}.md").write_text((f"*{caption}*\n\n" if caption else "") + markdown(shown))
    (numbers if numbers is not None else table).to_csv(folder / f"{name}.csv", index=False, lineterminator="\n")
    (folder / f"{name}.tex").write_text(latex(shown, caption))


def one_setting(df: pd.DataFrame) -> tuple[pd.DataFrame, list[dict]]:
    """The cells that can share a number, and a problem line for each group refused: a table cell (setting, attack,
    defense, budget) whose records come from more than one configuration, or an attack row of one setting whose
    poisoned models differ in kind (say, one seed trained with ``recipe.epochs=60``). Averaging either would
    give a number no run measured, so neither is shown anywhere; each goes to problems.md with the reason."""
    if df.empty:
        return df, []
    df = df.assign(budget_key=df["budget"].astype(str))
    checks = ((SETTING + ["attack"], "model_setting", "kinds of poisoned model in one attack row"),  # the wider first
              (KEYS + ["budget_key"], "setting", "configurations of one cell"))
    refused, problems = pd.Series(False, index=df.index), []
    for keys, column, what in checks:
        mixed = (df.groupby(keys)[column].transform("nunique") > 1) & ~refused
        for key, group in df[mixed].groupby(keys):
            problems.append({"record": " / ".join(map(str, key)),
                             "problem": f"refused: {len(group)} records of {group[column].nunique()} {what} "
                                        f"({', '.join(sorted(group[column].unique()))}); averaging them would show a "
                                        f"number no run measured: put each setting in its own folder or experiment"})
        refused |= mixed
    return df[~refused].drop(columns="budget_key"), problems


def current(node: dict) -> dict:
    """A component config from an older record, completed with the keys a later version added: a keyword the
    constructor requires and the record lacks is its published value (``bdbench.code_versions.NEUTRAL``), else null,
    as the cell's identity treats it."""
    import inspect

    from hydra.utils import get_class

    from bdbench.code_versions import NEUTRAL

    published = {k: v for later in NEUTRAL.values() for k, v in later.items()}
    cls = get_class(node["_target_"])
    params = inspect.signature(cls.__init__).parameters.values()
    return {**{p.name: published.get(p.name) for p in params
               if p.kind == p.KEYWORD_ONLY and p.default is p.empty and p.name not in node}, **node}


def gallery_source(attacks: dict) -> pd.DataFrame:
    """What a gallery draws: each attack's poisoned model, by cache key (its trigger and weights)."""
    return pd.DataFrame([{"attack": name, "model_key": key} for name, (_, _, key, _) in sorted(attacks.items())])


def galleries(triggers: dict, folder: Path, data_root: str, cache_root: str) -> list[dict]:
    """The trigger gallery of each data set from the cached attacks and poisoned models of its records (no
    training): target label and the poisoned model's prediction under each triggered image, the models' keys in
    its metadata. Returns a problem line for each data set it could not draw, saying whether the picture already
    there shows these very models (then it is kept) or not (then it is removed: a stale picture is worse than none)."""
    from bdbench.cache import ModelCache
    from bdbench.gallery import write_gallery
    from bdbench.validate import build

    cache, problems = ModelCache(cache_root), []
    for dataset, attacks in sorted(triggers.items()):
        try:
            data_cfg = next(iter(attacks.values()))[0]
            data = build({**data_cfg, "download": False}).load(data_root, "cpu", cache_root)
            spec, loaded, models = data.spec, {}, {}
            for name, (_, attack_cfg, key, model_cfg) in sorted(attacks.items()):
                entry = cache.load(key)
                if entry is None:
                    raise FileNotFoundError(f"poisoned model {key[:12]} ({name}) is not in {cache_root}")
                attack = build(current(attack_cfg))
                attack.load_state_dict(entry.attack_state)
                loaded[name] = attack
                model = build(current(model_cfg), num_classes=spec.num_classes, shape=spec.shape, mean=spec.mean,
                              std=spec.std)
                model.load_state_dict(entry.weights)
                models[name] = model
            write_gallery(data, loaded, folder / f"gallery_{dataset}.png", models=models,
                          source=draw.digest(gallery_source(attacks)))
        except Exception as exc:  # the gallery is optional: the tables never depend on it
            first = (str(exc).strip().splitlines() or [""])[0]
            path = folder / f"gallery_{dataset}.png"
            kept = path.is_file() and draw.read_digest(path) == draw.digest(gallery_source(attacks))
            if path.is_file() and not kept:
                path.unlink()
            problems.append({"record": f"gallery {dataset}", "problem": f"not drawn: {type(exc).__name__}: {first}; "
                             + ("the picture there shows these models and is kept" if kept else "no picture")})
    return problems


def published_cache(root: Path) -> str:
    """The cache a published sweep keeps beside its records (``paths.cache=results/<sweep>/cache``), else
    $BDBENCH_CACHE, else the default cache."""
    return str(root / "cache") if (root / "cache").is_dir() else os.environ.get("BDBENCH_CACHE", ".cache/bdbench")


@dataclass
class Sweep:
    """A folder of records as every view reads it: the usable cells, judged and one setting per number, and why the
    others are not shown."""

    cells: pd.DataFrame
    problems: list[dict]  # records that are no usable cell (unreadable, another schema, failed, repeated)
    refused: list[dict]   # groups of cells that would mix settings
    names: dict
    curves: pd.DataFrame
    triggers: dict
    recipes: dict


def read_sweep(root: Path, rule: Rule) -> Sweep:
    """Load, judge and refuse mixed settings (``load``, ``one_setting``); the one path to a report's numbers."""
    triggers: dict = {}
    names: dict = {}
    curves: list = []
    recipes: dict = {}
    df, problems = load(root, triggers, names, curves, recipes, rule)
    if df.empty or not df["status"].isin(RAN).any():
        raise FileNotFoundError(f"no finished records under {root} ({len(problems)} records not used: failed, "
                                f"unreadable or of another schema)")
    df, refused = one_setting(df)
    return Sweep(df, problems, refused, names, training_frame(curves), triggers, recipes)


def expected_pictures(root: str | Path) -> dict[str, str]:
    """{file name: source digest} of every picture a report of the records under ``root`` shows: each figure in
    every format, and each data set's trigger gallery. What a committed report is checked against."""
    rule = configured()
    sweep = read_sweep(Path(root), rule)
    pictures = {f"{plan.stem}.{fmt}": plan.digest for plan in draw.plans(sweep.cells, sweep.names, sweep.curves, rule)
                for fmt in draw.FORMATS}
    pictures.update({f"gallery_{dataset}.png": draw.digest(gallery_source(attacks))
                     for dataset, attacks in sweep.triggers.items()})
    return pictures


def report(root: str | Path, out: str | Path | None = None, data_root: str | None = None,
           cache_root: str | None = None, echo: Callable[[str], None] | None = None,
           formats: Sequence[str] = draw.FORMATS) -> Path:
    """Tables, figures (in ``formats``), leaderboard and problems.md from the records under ``root``; ``echo`` gets
    the closing summary (cells used, refused and why, figures not drawn and why)."""
    root = Path(root)
    out = Path(out) if out else root / "report"
    rule = configured()
    sweep = read_sweep(root, rule)
    df, names, curves, triggers, refused = sweep.cells, sweep.names, sweep.curves, sweep.triggers, sweep.refused
    unusable = len(sweep.problems)
    problems = sweep.problems + refused
    note = recipe_note(sweep.recipes, names)
    tables = out / "tables"
    outcomes = f"outcomes: {rule.words()}"
    for metric in METRICS:
        write_table(pivot(df, metric), tables, metric, names, numeric(df, metric),
                    f"{LABELS[metric]} (%), mean ± std over seeds (finished/run); k = clean images per class (any k: "
                    f"a data-free defense, run once per poisoned model); {outcomes}", note)
    models = [*SETTING, "attack"]  # one poisoned model per seed, shared by its cells
    poisoned = df[df["status"].isin(RAN)].drop_duplicates(models + ["seed"])
    undefended = (poisoned.groupby(models).agg(**{k: (f"undefended_{k}", mean_std) for k in ("acc", "asr", "ra")})
                  .reset_index())
    undefended_numbers = pd.concat([numeric(poisoned.assign(status=OK), f"undefended_{k}", keys=models)
                                    .assign(metric=k) for k in ("acc", "asr", "ra")])
    write_table(undefended, tables, "undefended", names, undefended_numbers,
                "The poisoned models before any defense (%), mean ± std over seeds", note)
    cost = pivot(df, "defense_seconds", scale=1.0, digits=2, finished=RAN).merge(
        pivot(df, "peak_rss_mb", scale=1.0, digits=0, finished=RAN), on=KEYS, suffixes=(" s", " MB"))
    cost_numbers = pd.concat([numeric(df, "defense_seconds", 1.0, RAN).assign(metric="defense_seconds"),
                              numeric(df, "peak_rss_mb", 1.0, RAN).assign(metric="peak_rss_mb")])
    write_table(cost, tables, "cost", names, cost_numbers, "Defense wall time (s) and peak memory (MB)", note)
    write_table(wall_time(df[df["status"].isin(RAN)]), tables, "walltime", names,
                title="Wall time (min) from an empty cache, per seed and attack, from the records' timings: training "
                      "once per poisoned model, the other phases summed over its cells; not counted: composing and "
                      "validating the sweep, process start-up", note=note)
    cells = df
    cells.assign(budget=cells["budget"].astype(str)).sort_values(KEYS + ["budget", "seed"], key=lambda c: c.map(
        budget_key) if c.name == "budget" else c, kind="stable").to_csv(tables / "cells.csv", index=False,
                                                                        lineterminator="\n")
    if not curves.empty:
        curves.drop(columns="model_key").sort_values(["dataset", "model", "recipe", "attack", "seed", "epoch"]).to_csv(
            tables / "training.csv", index=False, lineterminator="\n", float_format="%.4g")
    ran = df[df["status"].isin(RAN)]
    synthetic = (ran[ran["data_source"] == "synthetic"].groupby(KEYS + ["budget"])["seed"]
                 .apply(lambda s: ", ".join(map(str, sorted(s)))).reset_index(name="seeds"))
    plans = draw.plans(cells, names, curves, rule)
    stems = [draw.save(plan, out / "figures", formats) for plan in plans]
    gallery_problems = galleries(triggers, out / "figures", data_root or os.environ.get("BDBENCH_DATA", "data"),
                                 cache_root or published_cache(root))
    shown = {f"{stem}.{fmt}" for stem in stems for fmt in formats}
    shown |= {p.name for p in (out / "figures").glob("gallery_*.png")}
    for stale in sorted((out / "figures").glob("*")):  # a figure this report did not draw is not its figure
        if stale.name not in shown:
            stale.unlink()
    drawn = sorted(p.name for p in (out / "figures").glob("gallery_*.png"))
    write_page(cells, names, root, out, stems, drawn, f"bdbench: {root.resolve().name}", rule)
    counts = {s: int((df["status"] == s).sum()) for s in RAN}
    lines = [f"# Report of {root}", "", f"{len(ran)} cells ran to the end: {counts[OK]} finished, "
             + ", ".join(f"{counts[s]} {s}" for s in RAN[1:]) + f" ({rule.words()}); {len(refused)} groups of cells "
             f"refused (mixed settings); {unusable} records not used.", ""]
    if problems:
        lines += ["## Records not used, cells refused", "", markdown(pd.DataFrame(problems))]
    lines += ["## Cells whose defense ran on synthetic data (budget 0)", ""]
    lines += [markdown(synthetic)] if len(synthetic) else ["none", ""]
    if gallery_problems:
        lines += ["## Figures not drawn", "", markdown(pd.DataFrame(gallery_problems))]
    (out / "problems.md").write_text("\n".join(lines))
    if echo is not None:
        echo(f"bdbench report: {len(df)} cells used ({counts[OK]} finished, "
             + ", ".join(f"{counts[s]} {s}" for s in RAN[1:]) + f", {len(df) - len(ran)} failed or diverged); "
             f"{len(refused)} groups of cells refused (mixed settings); {unusable} records not used")
        for problem in refused:
            echo(f"  refused {problem['record']}: {problem['problem']}")
        echo(f"  {len(stems)} figures drawn ({len(stems) * len(formats)} files) and {len(drawn)} trigger "
             f"galleries present")
        for problem in gallery_problems:
            echo(f"  {problem['record']} {problem['problem']}")
    return out
