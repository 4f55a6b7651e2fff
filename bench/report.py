"""``bdbench report DIR``: records in, paper tables and figures out.

Reads every record under DIR into pandas and writes, under DIR/report (or --out):
  tables/<metric>.{md,csv,tex}  ACC, ASR, RA, DER as mean ± std over seeds with n, per data set x model x
                                recipe x attack x defense (rows) and budget (columns); every cell
                                says how many seeds finished of how many ran, and what became of the
                                others (diverged, failed, collapsed): none is averaged in
  tables/undefended.*           the poisoned models' own ACC / ASR / RA per attack
  tables/cost.*                 defense wall time and peak memory
  tables/cells.csv              one row per record (the long format everything above is built from);
                                failed cells appear in the tables as "failed" / "diverged" with their count
  problems.md                   records that are failed, unreadable or of another schema, and the cells
                                that ran on synthetic data
  figures/                      ASR heatmaps per budget, ACC-ASR scatter, ASR against budget, where the
                                time went (training per attack, each defense, synthesis, reversal,
                                evaluation), and the
                                trigger gallery of each data set when the records' poisoned models are in
                                the cache (``BDBENCH_CACHE``) and the data under ``BDBENCH_DATA``
Tables are sorted and formatted deterministically, so the same records give the same bytes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from bench.metrics import COLLAPSE_CHANCE_FACTOR  # noqa: E402
from bench.records import READABLE_SCHEMAS  # noqa: E402

KEYS = ["dataset", "model", "recipe", "experiment", "attack", "defense"]
METRICS = ["acc", "asr", "ra", "der"]


def load(root: str | Path, triggers: dict | None = None) -> tuple[pd.DataFrame, list[dict]]:
    """(one row per finished cell, one entry per record that is not a finished cell); ``triggers`` collects
    one (dataset config, attack config, cache key) per data set and attack, for the gallery."""
    root = Path(root)
    rows, problems = [], []
    for path in sorted(root.rglob("*.json")):
        if "report" in path.relative_to(root).parts:
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
        if rec.get("status") != "ok":
            error = (rec.get("error") or "").strip().splitlines()
            problems.append({"record": str(path.relative_to(root)),
                             "problem": f"{'diverged' if rec.get('status') == 'diverged' else 'failed'}: "
                                        f"{error[-1] if error else '?'}"})
            if "cell" in rec:  # the tables say the cell failed, rather than leave a gap
                cell = rec["cell"]
                rows.append({**{k: cell[k] for k in KEYS}, "budget": cell["budget"], "seed": cell["seed"],
                             "status": "diverged" if rec.get("status") == "diverged" else "failed",
                             "setting": cell["setting"], "record": str(path.relative_to(root))})
            continue
        cell, m, u = rec["cell"], rec["metrics"], rec["undefended"]
        if triggers is not None and cell["attack"] != "none":
            triggers.setdefault(cell["dataset"], {}).setdefault(
                cell["attack"], (rec["config"]["dataset"], rec["config"]["attack"], rec["cache"]["key"]))
        rows.append({**{k: cell[k] for k in KEYS}, "budget": cell["budget"], "seed": cell["seed"],
                     "status": "collapsed" if is_collapsed(rec) else "ok",
                     "setting": cell["setting"], "data_source": rec["data_source"], **{k: m.get(k) for k in METRICS},
                     **{f"undefended_{k}": u.get(k) for k in ("acc", "asr", "ra")},
                     "defense_seconds": rec["timings"].get("defense"),
                     **{f"{phase}_seconds": rec["timings"].get(phase) for phase in ("synthesis", "reversal", "eval")},
                     "model_key": rec["cache"]["key"], "train_seconds": rec["cache"]["train_seconds"],
                     "peak_rss_mb": rec["peak_memory"]["rss_mb"],
                     "cuda_mb": rec["peak_memory"].get("cuda_mb"), "record": str(path.relative_to(root))})
    return pd.DataFrame(rows), problems


def is_collapsed(rec: dict) -> bool:
    """The record's own verdict; records written before it existed (schema 2) are judged by ACC alone."""
    if "collapsed" in rec["metrics"]:
        return bool(rec["metrics"]["collapsed"])
    return rec["metrics"]["acc"] <= COLLAPSE_CHANCE_FACTOR / rec["config"]["dataset"]["num_classes"]


def mean_std(values: pd.Series, scale: float = 100.0, digits: int = 1) -> str:
    v = values.dropna() * scale
    if v.empty:
        return "–"
    if len(v) == 1:
        return f"{v.iloc[0]:.{digits}f} (n=1)"
    return f"{v.mean():.{digits}f} ± {v.std():.{digits}f} (n={len(v)})"


def summarize(group: pd.DataFrame, column: str, scale: float, digits: int, finished: tuple[str, ...] = ("ok",)
              ) -> str:
    """mean ± std of the finished cells, then (finished/run; what became of the others), e.g.
    ``97.2 ± 1.0 (2/3; diverged 1)`` or ``collapsed (0/1)``: a failure is never averaged in, never hidden."""
    done = group.loc[group["status"].isin(finished), column].dropna() * scale
    others = group.loc[~group["status"].isin(finished), "status"].value_counts().sort_index()
    tally = f"{len(done)}/{len(group)}" + ("; " + ", ".join(f"{s} {n}" for s, n in others.items()) if len(others) else "")
    if done.empty:
        return f"{others.index[0]} ({tally.split(';')[0]})" if len(others) == 1 else f"– ({tally})"
    value = f"{done.iloc[0]:.{digits}f}" if len(done) == 1 else f"{done.mean():.{digits}f} ± {done.std():.{digits}f}"
    return f"{value} ({tally})"


def pivot(df: pd.DataFrame, column: str, scale: float = 100.0, digits: int = 1,
          finished: tuple[str, ...] = ("ok",)) -> pd.DataFrame:
    """Rows: data set, model, recipe, attack, defense; columns: budget; cells: mean ± std of the finished
    seeds and the count of each outcome (a defense that diverges or collapses is a result, not a gap)."""
    table = (df.groupby(KEYS + ["budget"])[["status", column]]
             .apply(lambda g: summarize(g, column, scale, digits, finished)).unstack("budget").sort_index())
    table.columns = [f"k={k}" for k in table.columns]
    return table.fillna("–").reset_index()


def markdown(table: pd.DataFrame) -> str:
    cols = [str(c) for c in table.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_table(table: pd.DataFrame, folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.md").write_text(markdown(table))
    table.to_csv(folder / f"{name}.csv", index=False, lineterminator="\n")
    (folder / f"{name}.tex").write_text(table.to_latex(index=False).replace("±", r"$\pm$"))


def heat_labels(cells: pd.DataFrame, heat: pd.DataFrame) -> pd.DataFrame:
    """The text of each heatmap cell: the mean ASR of the finished seeds, else what became of them
    (collapsed, diverged, failed), else "n/a" for a cell that never ran. Only numbers get a colour."""
    status = cells.groupby(["attack", "defense"])["status"].agg(lambda s: "/".join(sorted(set(s))))
    return pd.DataFrame([[f"{v:.0f}" if pd.notna(v) else status.get((a, d), "n/a") for d, v in row.items()]
                         for a, row in heat.iterrows()], index=heat.index, columns=heat.columns)


def figures(cells: pd.DataFrame, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    targeted = cells[~((cells["status"] == "ok") & cells["asr"].isna())]  # a clean model has no ASR to draw
    for (dataset, model), everything in targeted.groupby(["dataset", "model"]):
        part = everything[(everything["status"] == "ok") & everything["asr"].notna()]
        if part.empty:
            continue
        for budget, all_sub in everything.groupby("budget"):
            sub = all_sub[all_sub["status"] == "ok"]
            heat = (sub.groupby(["attack", "defense"])["asr"].mean().unstack("defense") * 100).reindex(
                index=sorted(all_sub["attack"].unique()), columns=sorted(all_sub["defense"].unique()))
            heat = heat[sorted(heat.columns, key=lambda d: (d != "none", d))]  # undefended column first
            fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * heat.shape[1] + 2), 0.6 * heat.shape[0] + 2.5))
            ax.set_facecolor("0.85")  # a cell without a number is grey and hatched, never a colour of the scale
            ax.patch.set_hatch("///")
            labels = heat_labels(all_sub, heat)
            sns.heatmap(heat, annot=labels, fmt="", vmin=0, vmax=100, cmap="rocket_r", ax=ax,
                        cbar_kws={"label": "ASR (%)"}, annot_kws={"fontsize": 7})
            for i, j in zip(*heat.isna().to_numpy().nonzero()):  # seaborn leaves cells without a number blank
                ax.text(j + 0.5, i + 0.5, labels.iat[i, j], ha="center", va="center", fontsize=7,
                        bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
            ax.set_title(f"{dataset} / {model}: ASR (%), {budget} clean images per class", fontsize=9)
            fig.tight_layout()
            fig.savefig(folder / f"asr_heatmap_{dataset}_{model}_k{budget}.png", dpi=120)
            plt.close(fig)
        grid = sns.relplot(data=part.assign(ACC=part["acc"] * 100, ASR=part["asr"] * 100), x="ASR", y="ACC",
                           hue="defense", style="attack", col="budget", height=3.2, facet_kws={"sharey": True})
        grid.savefig(folder / f"acc_vs_asr_{dataset}_{model}.png", dpi=120)
        plt.close(grid.figure)
        grid = sns.relplot(data=part.assign(ASR=part["asr"] * 100), x="budget", y="ASR", hue="defense",
                           col="attack", kind="line", marker="o", errorbar="sd", height=3.0)
        grid.savefig(folder / f"asr_vs_budget_{dataset}_{model}.png", dpi=120)
        plt.close(grid.figure)


def time_breakdown(cells: pd.DataFrame, folder: Path) -> None:
    """Where a sweep's time went, per data set and model: training each poisoned model (once per model, as the
    cache does), each defense, the budget-0 synthesis, the shared trigger reversal and the evaluation, so the
    next bottleneck shows without reading JSON."""
    folder.mkdir(parents=True, exist_ok=True)
    done = cells[cells["status"].isin(("ok", "collapsed"))]
    for (dataset, model), part in done.groupby(["dataset", "model"]):
        models = part.drop_duplicates("model_key")
        rows = [("training", a, s) for a, s in models.groupby("attack")["train_seconds"].sum().items()]
        rows += [("defense", d, s) for d, s in part.groupby("defense")["defense_seconds"].sum().items()]
        rows += [(phase, phase, part[f"{phase}_seconds"].sum()) for phase in ("synthesis", "reversal", "eval")
                 if f"{phase}_seconds" in part]
        table = pd.DataFrame(rows, columns=["phase", "what", "seconds"]).assign(minutes=lambda t: t.seconds / 60)
        table = table[table["minutes"] > 0].sort_values(["phase", "minutes"], ascending=[True, False])
        fig, ax = plt.subplots(figsize=(7, 0.28 * len(table) + 1.5))
        sns.barplot(data=table, y="what", x="minutes", hue="phase", dodge=False, ax=ax)
        ax.set_xlabel("minutes (summed over cells; training once per poisoned model)")
        ax.set_ylabel("")
        ax.set_title(f"{dataset} / {model}: where the time went, {table.minutes.sum():.0f} min in all", fontsize=9)
        fig.tight_layout()
        fig.savefig(folder / f"time_{dataset}_{model}.png", dpi=120)
        plt.close(fig)


def galleries(triggers: dict, folder: Path, data_root: str, cache_root: str) -> list[dict]:
    """The trigger gallery of each data set from the cached attacks of its records (no training).
    Returns a problem line for each data set it could not draw."""
    from hydra.utils import instantiate

    from bench.cache import ModelCache
    from bench.gallery import write_gallery

    cache, problems = ModelCache(cache_root), []
    for dataset, attacks in sorted(triggers.items()):
        try:
            data_cfg = next(iter(attacks.values()))[0]
            data = instantiate({**data_cfg, "download": False}).load(data_root, "cpu", cache_root)
            loaded = {}
            for name, (_, attack_cfg, key) in sorted(attacks.items()):
                entry = cache.load(key)
                if entry is None:
                    raise FileNotFoundError(f"poisoned model {key[:12]} ({name}) is not in {cache_root}")
                attack = instantiate(attack_cfg)
                attack.load_state_dict(entry.attack_state)
                loaded[name] = attack
            write_gallery(data, loaded, folder / f"gallery_{dataset}.png")
        except Exception as exc:  # the gallery is optional: the tables never depend on it
            problems.append({"record": f"gallery {dataset}", "problem": f"not drawn: {type(exc).__name__}: {exc}"})
    return problems


def report(root: str | Path, out: str | Path | None = None, data_root: str | None = None,
           cache_root: str | None = None) -> Path:
    root = Path(root)
    out = Path(out) if out else root / "report"
    triggers: dict = {}
    df, problems = load(root, triggers)
    if df.empty or not df["status"].isin(("ok", "collapsed")).any():
        raise FileNotFoundError(f"no finished records under {root} ({len(problems)} records not used: failed, "
                                f"unreadable or of another schema)")
    tables = out / "tables"
    for metric in METRICS:
        write_table(pivot(df, metric), tables, metric)
    models = ["dataset", "model", "recipe", "attack"]  # one poisoned model per seed, shared by its cells
    undefended = (df[df["status"].isin(("ok", "collapsed"))].drop_duplicates(models + ["seed"]).groupby(models)
                  .agg(**{k: (f"undefended_{k}", mean_std) for k in ("acc", "asr", "ra")}).reset_index())
    write_table(undefended, tables, "undefended")
    ran = ("ok", "collapsed")  # a collapsed cell's cost is a real cost
    cost = pivot(df, "defense_seconds", scale=1.0, digits=2, finished=ran).merge(
        pivot(df, "peak_rss_mb", scale=1.0, digits=0, finished=ran), on=KEYS, suffixes=(" s", " MB"))
    write_table(cost, tables, "cost")
    cells = df
    df = df[df["status"].isin(ran)]
    cells.sort_values(KEYS + ["budget", "seed"]).to_csv(tables / "cells.csv", index=False, lineterminator="\n")
    synthetic = (df[df["data_source"] == "synthetic"].groupby(KEYS + ["budget"])["seed"]
                 .apply(lambda s: ", ".join(map(str, sorted(s)))).reset_index(name="seeds"))
    mixed = df.groupby(KEYS + ["budget"])["setting"].nunique()
    for key in mixed[mixed > 1].index:  # same names, different configs (e.g. an override): never silently averaged
        problems.append({"record": " / ".join(map(str, key)), "problem": "one row mixes cells of different settings"})
    figures(cells, out / "figures")
    time_breakdown(cells, out / "figures")
    gallery_problems = galleries(triggers, out / "figures", data_root or os.environ.get("BDBENCH_DATA", "data"),
                                 cache_root or os.environ.get("BDBENCH_CACHE", ".cache/bdbench"))
    collapsed = int((df["status"] == "collapsed").sum())
    lines = [f"# Report of {root}", "", f"{len(df)} finished cells ({collapsed} collapsed), {len(problems)} records "
             "not used.", ""]
    if problems:
        lines += ["## Records not used", "", markdown(pd.DataFrame(problems))]
    lines += ["## Cells whose defense ran on synthetic data (budget 0)", ""]
    lines += [markdown(synthetic)] if len(synthetic) else ["none", ""]
    if gallery_problems:
        lines += ["## Figures not drawn", "", markdown(pd.DataFrame(gallery_problems))]
    (out / "problems.md").write_text("\n".join(lines))
    return out
