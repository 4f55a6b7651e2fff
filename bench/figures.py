"""The report's figures, each saved as PNG, PDF and SVG: ASR and ACC heatmaps with the undefended model beside
the defenses, ACC against ASR, ASR and ACC against the clean budget, and where a sweep's time went.

One figure shows one setting (data set, model, recipe, experiment: ``bdbench.columns.SETTING``); the report has
already refused any cell that would mix configurations (``bdbench.report.one_setting``). A value is drawn in colour
only where seeds finished (outcome ``ok``): a cell that never ran, failed, diverged or collapsed is grey, hatched
and labelled with what became of it, never a colour of the scale; a damaged cell (its clean accuracy gone) is grey
and hatched too, its number printed beside the word "damaged", and a hollow marker in the line and scatter plots.
Data-free defenses ran once per poisoned model ("any k"): the same number in every budget's panel, labelled so.

Each figure is planned before it is drawn (``Figure``): the numbers it shows are a table whose digest goes into the
files' metadata, so a committed picture can be checked against its records without drawing it (``read_digest``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["svg.hashsalt"] = "bdbench"  # SVG element ids from a fixed salt: the same figure, the same bytes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from bdbench.columns import ANY, SETTING, budgets, named, setting_slug, setting_title  # noqa: E402
from bdbench.outcome import DAMAGED, OK, RAN, Rule  # noqa: E402

FORMATS = ("png",)  # what a report writes and the repository keeps (docs/artifacts.md)
PAPER_FORMATS = ("pdf", "svg")  # on request: bdbench report --formats png,pdf,svg
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p", "d", "8")
UNDEFENDED = "undefended"
FINISHED = (OK,)
SHOWN = (OK, DAMAGED)  # the outcomes whose numbers a figure prints (damaged ones marked)
DIGEST_KEY = {"png": "Source", "pdf": "Subject", "svg": "Source"}


def digest(data: pd.DataFrame) -> str:
    """The sha256 of the numbers a picture draws, as CSV with 6 significant digits (what a reader could see)."""
    text = data.to_csv(index=False, lineterminator="\n", float_format="%.6g")
    return "bdbench-source-sha256:" + hashlib.sha256(text.encode()).hexdigest()


def read_digest(path: Path) -> str | None:
    """The source digest a PNG written by ``save`` (or the gallery) carries, or None."""
    from PIL import Image

    with Image.open(path) as image:
        return image.info.get(DIGEST_KEY["png"])


@dataclass
class Figure:
    """One picture, planned: its file stem, the numbers it shows, and how to draw it."""

    stem: str
    data: pd.DataFrame
    draw: Callable[[], plt.Figure]

    @property
    def digest(self) -> str:
        return digest(self.data)


def save(plan: Figure, folder: Path, formats: Sequence[str] = FORMATS) -> str:
    """PNG for the page (and, asked, PDF and SVG for papers), each carrying the digest of its numbers and no creation
    date, so unchanged figures keep their bytes. Returns the stem."""
    folder.mkdir(parents=True, exist_ok=True)
    fig, source = plan.draw(), plan.digest
    metadata = {"png": {"Software": None}, "pdf": {"CreationDate": None, "Producer": None}, "svg": {"Date": None}}
    for fmt in formats:
        fig.savefig(folder / f"{plan.stem}.{fmt}", dpi=150, metadata={**metadata[fmt], DIGEST_KEY[fmt]: source})
    plt.close(fig)
    return plan.stem


def finish(fig: plt.Figure, title: str | None = None, rect: tuple[float, float, float, float] = (0, 0, 1, 1)
           ) -> plt.Figure:
    """Title and lay out a figure (``rect`` leaves room for a legend outside the axes)."""
    if title is not None:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=rect)
    return fig


def budget_words(budget) -> str:
    if str(budget) == ANY:
        return "any k (data-free)"
    return "synthetic images (k = 0)" if budget == 0 else f"{budget} clean image{'' if budget == 1 else 's'} per class"


def styles(defenses: list[str]) -> dict[str, tuple]:
    """One (colour, marker) per defense: the colour-blind-safe palette, and a marker shape each."""
    colours = sns.color_palette("colorblind", max(len(defenses), 1))
    return {d: (colours[i % len(colours)], MARKERS[i % len(MARKERS)]) for i, d in enumerate(defenses)}


def legend(fig: plt.Figure, style: dict[str, tuple], note: str = "", undefended: bool = False) -> None:
    """One legend for all panels, in a fixed order (undefended, then the defenses by name), each defense with its
    filled marker whatever its points' outcomes."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="black", marker="*", markersize=9, linestyle="none")] if undefended else []
    handles += [Line2D([], [], color=colour, marker=marker, markersize=5, linewidth=1.1)
                for colour, marker in style.values()]
    fig.legend(handles, ([UNDEFENDED] if undefended else []) + list(style), loc="center right", fontsize=7,
               frameon=False, title=note or None, title_fontsize=6)


def settings(cells: pd.DataFrame, names: dict):
    """(setting, its cells under display names), one per data set, model, recipe and experiment."""
    for setting, part in cells.groupby(SETTING, sort=True):
        yield setting, named(part, names)


def at_budgets(cells: pd.DataFrame) -> tuple[list, pd.DataFrame]:
    """The numbered budgets of a setting, and its cells with each data-free ("any k") cell repeated at every one of
    them (the same measurement shown in each budget's panel, flagged ``any_k``)."""
    numbered = [b for b in budgets(cells["budget"]) if str(b) != ANY] or [ANY]
    free = cells[cells["budget"].astype(str) == ANY]
    rest = cells[cells["budget"].astype(str) != ANY].assign(any_k=False)
    spread = [free.assign(budget=b, any_k=True) for b in numbered if str(b) != ANY] if numbered != [ANY] else \
        [free.assign(any_k=True)]
    return numbered, pd.concat([rest, *spread], ignore_index=True)


def drawn_settings(cells: pd.DataFrame, names: dict):
    """Per setting: its cells with a number to draw (finished or damaged, with an ASR) under display names, its
    numbered budgets, and those cells with the data-free ones repeated at every budget (``at_budgets``)."""
    for setting, shown in settings(cells[cells["status"].isin(SHOWN) & cells["asr"].notna()], names):
        yield (setting, shown, *at_budgets(shown))


def outcome_means(cells: pd.DataFrame, keys: list[str], metrics: list[str]) -> pd.DataFrame:
    """Per ``keys``: each metric's mean over the finished seeds, or, where none finished, over the damaged ones
    (``shown`` says which: ok, damaged, or the outcome that left no number), with the seed counts."""
    rows = []
    for key, group in cells.groupby(keys, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        ok, damaged = group[group["status"] == OK], group[group["status"] == DAMAGED]
        use, shown = (ok, OK) if len(ok) else (damaged, DAMAGED) if len(damaged) else (ok, "/".join(
            sorted(set(group["status"]))))
        rows.append({**dict(zip(keys, key)), "shown": shown, "finished": len(ok), "run": len(group),
                     **{m: use[m].mean() * 100 if len(use) else np.nan for m in metrics},
                     **{f"{m}_std": use[m].std() * 100 if len(use) > 1 else 0.0 for m in metrics}})
    return pd.DataFrame(rows)


def cell_grid(cells: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(attack x defense means in %, with the undefended column first; the text of every cell): a colour where
    seeds finished, else grey with what became of them (a damaged cell's number beside the word), else "n/a"
    for a cell that never ran; "any k" marks a data-free defense's one cell."""
    attacks, defenses = sorted(cells["attack"].unique()), sorted(cells["defense"].unique())
    means = outcome_means(cells, ["attack", "defense"], [metric]).set_index(["attack", "defense"])
    values = pd.DataFrame(np.nan, index=attacks, columns=defenses)
    labels = pd.DataFrame("n/a", index=attacks, columns=defenses)
    free = set(cells.loc[cells.get("any_k", pd.Series(False, index=cells.index)).astype(bool), "defense"])
    for (attack, defense), row in means.iterrows():
        suffix = "\nany k" if defense in free else ""
        if row["shown"] == OK:
            values.loc[attack, defense] = row[metric]
            part = "" if row["finished"] == row["run"] else f" ({row['finished']}/{row['run']})"
            labels.loc[attack, defense] = f"{row[metric]:.0f}{part}{suffix}"
        elif row["shown"] == DAMAGED:
            labels.loc[attack, defense] = f"{row[metric]:.0f}\n{DAMAGED}{suffix}"
        else:
            labels.loc[attack, defense] = f"{row['shown']}{suffix}"
    poisoned = cells[cells["status"].isin(RAN)]
    values.insert(0, UNDEFENDED, poisoned.groupby("attack")[f"undefended_{metric}"].mean().reindex(attacks) * 100)
    labels.insert(0, UNDEFENDED, [f"{v:.0f}" if pd.notna(v) else "n/a" for v in values[UNDEFENDED]])
    values.index.name = labels.index.name = "attack"
    return values, labels


def draw_heatmap(ax: plt.Axes, values: pd.DataFrame, labels: pd.DataFrame, cmap: str, title: str,
                 show_rows: bool) -> None:
    ax.set_facecolor("0.88")  # a cell without a colour: grey and hatched, never a colour of the scale
    ax.patch.set_hatch("///")
    ax.patch.set_edgecolor("0.65")
    sns.heatmap(values, annot=labels, fmt="", vmin=0, vmax=100, cmap=cmap, ax=ax, linewidths=0.5,
                linecolor="white", cbar_kws={"label": f"{title} (%)", "shrink": 0.8}, annot_kws={"fontsize": 6.5})
    for i, j in zip(*values.isna().to_numpy().nonzero()):  # seaborn leaves cells without a number blank
        ax.text(j + 0.5, i + 0.5, labels.iat[i, j], ha="center", va="center", fontsize=6,
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
    ax.axvline(1, color="black", linewidth=1.5)  # the undefended column apart from the defenses
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("")
    ax.set_ylabel("")
    ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    plt.setp(ax.get_xticklabels(), ha="right", rotation_mode="anchor")
    if not show_rows:
        ax.set_yticklabels([])
    else:
        ax.tick_params(axis="y", labelrotation=0, labelsize=8)


def heatmaps(cells: pd.DataFrame, names: dict, rule: Rule) -> list[Figure]:
    """ASR beside ACC, attacks x (undefended, defenses), one figure per setting and budget."""
    plans = []
    targeted = cells[~(cells["status"].isin(RAN) & cells["asr"].isna())]  # a clean model has no ASR
    for setting, shown in settings(targeted, names):
        numbered, spread = at_budgets(shown)
        for budget in numbered:
            part = spread[spread["budget"].astype(str) == str(budget)]
            asr, asr_labels = cell_grid(part, "asr")
            acc, acc_labels = cell_grid(part, "acc")
            source = pd.concat([asr_labels.stack().rename("asr"), acc_labels.stack().rename("acc")], axis=1)
            title = (f"{setting_title(shown)}: {budget_words(budget)}; colour: mean over finished seeds; grey: no "
                     f"number to rank ({DAMAGED}: ACC more than {rule.max_acc_drop:g} points below the undefended "
                     f"model; n/a: never ran)")

            def make(asr=asr, asr_labels=asr_labels, acc=acc, acc_labels=acc_labels, title=title) -> plt.Figure:
                width = 0.6 * asr.shape[1] + 2.5
                fig, (left, right) = plt.subplots(1, 2, figsize=(2 * width, 0.5 * asr.shape[0] + 2.7))
                draw_heatmap(left, asr, asr_labels, "rocket_r", "ASR", show_rows=True)
                draw_heatmap(right, acc, acc_labels, "mako", "ACC", show_rows=False)
                return finish(fig, title)

            plans.append(Figure(f"asr_heatmap_{setting_slug(setting)}_k{budget}", source.reset_index(), make))
    return plans


def point(ax: plt.Axes, x: float, y: float, shown: str, colour, marker: str, label: str, size: float = 42) -> None:
    """A finished mean filled; a damaged one hollow (its edge in the defense's colour)."""
    hollow = shown == DAMAGED
    ax.scatter(x, y, marker=marker, s=size, alpha=0.9, linewidth=1.2 if hollow else 0.5, label=label, zorder=2,
               facecolors="none" if hollow else [colour], edgecolors=[colour] if hollow else "white")


def scatter(cells: pd.DataFrame, names: dict, rule: Rule) -> list[Figure]:
    """ACC against ASR per attack and budget: every defense a colour and a marker (hollow: damaged), the undefended
    model a black star; points are means over finished seeds."""
    plans = []
    for setting, shown, numbered, spread in drawn_settings(cells, names):
        means = outcome_means(spread, ["attack", "budget", "defense"], ["asr", "acc"])
        undefended = (shown.drop_duplicates(["attack", "seed"]).groupby("attack")[["undefended_asr", "undefended_acc"]]
                      .mean() * 100)
        source = means[["attack", "budget", "defense", "shown", "asr", "acc"]].assign(budget=lambda t: t.budget.astype(str))

        def make(means=means, undefended=undefended, numbered=numbered, title=setting_title(shown)) -> plt.Figure:
            defenses, attacks = sorted(means["defense"].unique()), sorted(means["attack"].unique())
            style = styles(defenses)
            fig, axes = plt.subplots(len(attacks), len(numbered), squeeze=False, sharex=True, sharey=True,
                                     figsize=(3.1 * len(numbered) + 1.8, 2.8 * len(attacks)))
            for i, attack in enumerate(attacks):
                for j, budget in enumerate(numbered):
                    ax = axes[i][j]
                    ax.scatter(*undefended.loc[attack], marker="*", s=160, color="black", zorder=3, label=UNDEFENDED)
                    here = means[(means["attack"] == attack) & (means["budget"].astype(str) == str(budget))]
                    for row in here.itertuples():
                        colour, marker = style[row.defense]
                        point(ax, row.asr, row.acc, row.shown, colour, marker, row.defense)
                    ax.set_xlim(-4, 104)
                    ax.set_ylim(-4, 104)
                    ax.grid(alpha=0.3)
                    if i == 0:
                        ax.set_title(budget_words(budget), fontsize=8)
                    if j == 0:
                        ax.set_ylabel(f"{attack}\nACC (%)", fontsize=8)
                    if i == len(attacks) - 1:
                        ax.set_xlabel("ASR (%)", fontsize=8)
            legend(fig, style, "hollow: damaged", undefended=True)
            return finish(fig, f"{title}: ACC against ASR (better: top left; hollow: ACC more than "
                               f"{rule.max_acc_drop:g} points below the undefended model)", rect=(0, 0, 0.84, 1))

        plans.append(Figure(f"acc_vs_asr_{setting_slug(setting)}", source, make))
    return plans


def budget_lines(cells: pd.DataFrame, names: dict, rule: Rule) -> list[Figure]:
    """ASR (top) and ACC (bottom) against the clean budget (categories 0, 1, 10, ...): mean over finished seeds with
    ± std as a band clipped to [0, 100]; a damaged mean is a hollow marker, a data-free defense a dashed line."""
    plans = []
    for setting, shown, numbered, spread in drawn_settings(cells, names):
        stats = outcome_means(spread, ["attack", "defense", "budget"], ["asr", "acc"])
        stats["any_k"] = stats["defense"].isin(set(spread.loc[spread["any_k"], "defense"]))
        source = stats.assign(budget=stats["budget"].astype(str))

        def make(stats=stats, numbered=numbered, title=setting_title(shown)) -> plt.Figure:
            defenses, attacks = sorted(stats["defense"].unique()), sorted(stats["attack"].unique())
            style = styles(defenses)
            fig, axes = plt.subplots(2, len(attacks), figsize=(3.2 * len(attacks) + 1.8, 5.6), squeeze=False,
                                     sharey=True, sharex=True)
            x_of = {str(b): i for i, b in enumerate(numbered)}
            for col, attack in enumerate(attacks):
                for row_i, metric in enumerate(("asr", "acc")):
                    ax = axes[row_i][col]
                    for defense in defenses:
                        rows = stats[(stats["attack"] == attack) & (stats["defense"] == defense)].copy()
                        if rows.empty:
                            continue
                        rows = rows.assign(x=rows["budget"].astype(str).map(x_of)).sort_values("x")
                        colour, marker = style[defense]
                        ax.plot(rows["x"], rows[metric], color=colour, linewidth=1.1,
                                linestyle="--" if rows["any_k"].iloc[0] else "-")
                        for r in rows.itertuples():
                            point(ax, r.x, getattr(r, metric), r.shown, colour, marker, defense, size=26)
                        low = (rows[metric] - rows[f"{metric}_std"]).clip(0, 100)
                        high = (rows[metric] + rows[f"{metric}_std"]).clip(0, 100)
                        ax.fill_between(rows["x"], low, high, color=colour, alpha=0.10, linewidth=0)
                    ax.set_xticks(np.arange(len(numbered)), [str(b) for b in numbered])
                    ax.set_ylim(0, 100)
                    ax.grid(alpha=0.3)
                    if row_i == 0:
                        ax.set_title(attack, fontsize=9)
                    else:
                        ax.set_xlabel("clean images per class (0 = synthetic)", fontsize=8)
                axes[0][0].set_ylabel("ASR (%)")
                axes[1][0].set_ylabel("ACC (%)")
            legend(fig, style, "hollow: damaged\ndashed: data-free (any k)")
            return finish(fig, f"{title}: ASR and ACC against the clean budget (mean ± std over finished seeds; "
                               f"hollow: ACC more than {rule.max_acc_drop:g} points below the undefended model)",
                          rect=(0, 0, 0.84, 1))

        plans.append(Figure(f"asr_vs_budget_{setting_slug(setting)}", source, make))
    return plans


def time_breakdown(cells: pd.DataFrame, names: dict, rule: Rule) -> list[Figure]:
    """Where a sweep's time went, per setting: training each poisoned model (once per model, as the cache does),
    each defense, the budget-0 synthesis, the shared trigger reversal and the evaluation, so the next bottleneck
    shows without reading JSON."""
    plans = []
    for setting, shown in settings(cells[cells["status"].isin(RAN)], names):
        models = shown.drop_duplicates("model_key")
        rows = [("training", a, s) for a, s in models.groupby("attack")["train_seconds"].sum().items()]
        rows += [("defense", d, s) for d, s in shown.groupby("defense")["defense_seconds"].sum().items()]
        rows += [(phase, phase, shown[f"{phase}_seconds"].sum()) for phase in ("synthesis", "reversal", "eval")
                 if f"{phase}_seconds" in shown]
        table = pd.DataFrame(rows, columns=["phase", "what", "seconds"]).assign(minutes=lambda t: t.seconds / 60)
        table = table[table["minutes"] > 0].sort_values(["phase", "minutes"], ascending=[True, False])

        def make(table=table, title=setting_title(shown)) -> plt.Figure:
            fig, ax = plt.subplots(figsize=(7, 0.28 * len(table) + 1.5))
            sns.barplot(data=table, y="what", x="minutes", hue="phase", dodge=False, ax=ax,
                        palette=sns.color_palette("colorblind", table["phase"].nunique()))
            ax.set_xlabel("minutes (summed over cells; training once per poisoned model)")
            ax.set_ylabel("")
            ax.set_title(f"{title}: where the time went, {table.minutes.sum():.0f} min in all", fontsize=9)
            return finish(fig)

        plans.append(Figure(f"time_{setting_slug(setting)}", table.reset_index(drop=True), make))
    return plans


def plans(cells: pd.DataFrame, names: dict, curves: pd.DataFrame, rule: Rule) -> list[Figure]:
    """Every figure of a report, planned (nothing drawn yet)."""
    made = [plan for maker in (heatmaps, scatter, budget_lines, time_breakdown) for plan in maker(cells, names, rule)]
    if not curves.empty and curves["test_acc"].notna().any():
        made += training_curves(curves, names)
    return made


def training_curves(curves: pd.DataFrame, names: dict, target: float | None = None) -> list[Figure]:
    """Each poisoned model's clean test ACC and ASR against the minutes it trained (test passes not counted), per
    setting: one colour per attack, one line per seed; the time-to-accuracy view of a recipe, with ``target``
    (ACC in %) as a dashed line when given."""
    plans = []
    measured = curves.dropna(subset=["test_acc"])
    for setting, shown in settings(measured, names):
        source = shown[["attack", "seed", "epoch", "minutes", "test_acc", "test_asr"]].sort_values(
            ["attack", "seed", "epoch"]).reset_index(drop=True)

        def make(shown=shown, title=setting_title(shown)) -> plt.Figure:
            fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.4), sharex=True)
            for ax, metric, label in zip(axes, ("test_acc", "test_asr"), ("clean test ACC (%)", "ASR (%)")):
                sns.lineplot(data=shown, x="minutes", y=metric, hue="attack", units="seed", estimator=None,
                             marker="o", markersize=3, linewidth=1, palette="colorblind", ax=ax, legend=ax is axes[1])
                ax.set_ylim(-2, 102)
                ax.set_ylabel(label)
                ax.set_xlabel("minutes of training")
                ax.grid(alpha=0.3)
            if target is not None:
                axes[0].axhline(target, color="black", linestyle="--", linewidth=0.8)
                axes[0].annotate(f"{target:g} %", (0, target), xytext=(2, 2), textcoords="offset points", fontsize=7)
            if axes[1].get_legend() is not None:
                sns.move_legend(axes[1], "lower right", fontsize=7, title=None, frameon=False)
            return finish(fig, f"{title}: the poisoned models while they train (one line per seed)")

        plans.append(Figure(f"training_{setting_slug(setting)}", source, make))
    return plans


def tta_curves(df: pd.DataFrame, path: Path, targets: list[float]) -> None:
    """Clean test accuracy against minutes of training, one line per pipeline, the targets as dashed lines."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    sns.lineplot(data=df.assign(minutes=df["seconds"] / 60, acc=100 * df["test_acc"]), x="minutes", y="acc",
                 hue="pipeline", marker="o", markersize=3, ax=ax)
    for target in targets:
        ax.axhline(100 * target, color="grey", linestyle="--", linewidth=0.8)
    ax.set(xlabel=f"minutes of training ({df['device'].iloc[0]}, {df['threads'].iloc[0]} threads)",
           ylabel="clean test accuracy (%)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
