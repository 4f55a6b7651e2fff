"""The report's figures, each saved as PNG, PDF and SVG: ASR and ACC heatmaps with the undefended model beside
the defenses, ACC against ASR, ASR against the clean budget, and where a sweep's time went.

A value is drawn only where seeds finished: a cell that never ran, failed, diverged or collapsed is grey,
hatched and labelled with what became of it, never a colour of the scale. Names are the configs'
display names; defenses get a colour-blind-safe palette and a marker shape each, so more than eight stay
apart; budgets are categories (0, 1, 10 images per class), not a linear axis.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["svg.hashsalt"] = "bdbench"  # SVG element ids from a fixed salt: the same figure, the same bytes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from bench.report import RAN, named  # noqa: E402

FORMATS = ("png", "pdf", "svg")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p", "d", "8")
UNDEFENDED = "undefended"
FINISHED = ("ok",)


def save(fig: plt.Figure, folder: Path, stem: str) -> None:
    """PNG for the page, PDF and SVG for papers; without creation dates, so unchanged figures keep their bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"png": {"Software": None}, "pdf": {"CreationDate": None, "Producer": None}, "svg": {"Date": None}}
    for fmt in FORMATS:
        fig.savefig(folder / f"{stem}.{fmt}", dpi=150, metadata=metadata[fmt])
    plt.close(fig)


def finish(fig: plt.Figure, folder: Path, stem: str, title: str | None = None,
           rect: tuple[float, float, float, float] = (0, 0, 1, 1)) -> str:
    """Title, lay out and save a figure (``rect`` leaves room for a legend outside the axes); returns its stem."""
    if title is not None:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=rect)
    save(fig, folder, stem)
    return stem


def panel(shown: pd.DataFrame) -> str:
    """The data set and model a figure shows, as its title starts."""
    return f"{shown['dataset'].iloc[0]} / {shown['model'].iloc[0]}"


def budget_words(budget: int) -> str:
    return "synthetic images (k = 0)" if budget == 0 else f"{budget} clean image{'' if budget == 1 else 's'} per class"


def styles(defenses: list[str]) -> dict[str, tuple]:
    """One (colour, marker) per defense: the colour-blind-safe palette, and a marker shape each."""
    colours = sns.color_palette("colorblind", max(len(defenses), 1))
    return {d: (colours[i % len(colours)], MARKERS[i % len(MARKERS)]) for i, d in enumerate(defenses)}


def legend(fig: plt.Figure, axes: np.ndarray, order: list[str]) -> None:
    """One legend for all panels, in a fixed order (undefended, then the defenses by name)."""
    handles = {label: h for ax in axes.flat for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend([handles[k] for k in order if k in handles], [k for k in order if k in handles], loc="center right",
               fontsize=7, frameon=False)


def finished_panels(cells: pd.DataFrame, names: dict):
    """(data set, model, its finished cells with an ASR under display names), one per data set and model."""
    done = cells[cells["status"].isin(FINISHED) & cells["asr"].notna()]
    for (dataset, model), part in done.groupby(["dataset", "model"]):
        yield dataset, model, named(part, names)


def cell_grid(cells: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(attack x defense means in %, with the undefended column first; the text of every cell): a number where
    seeds finished, else what became of them, else "n/a" for a cell that never ran."""
    done = cells[cells["status"].isin(FINISHED)]
    values = done.groupby(["attack", "defense"])[metric].mean().unstack("defense") * 100
    attacks, defenses = sorted(cells["attack"].unique()), sorted(cells["defense"].unique())
    values = values.reindex(index=attacks, columns=defenses)
    poisoned = cells[cells["status"].isin(RAN)]
    values.insert(0, UNDEFENDED, poisoned.groupby("attack")[f"undefended_{metric}"].mean().reindex(attacks) * 100)
    status = cells.groupby(["attack", "defense"])["status"].agg(lambda s: "/".join(sorted(set(s) - set(FINISHED))))
    labels = pd.DataFrame([[f"{v:.0f}" if pd.notna(v) else (status.get((a, d)) or "n/a") for d, v in row.items()]
                           for a, row in values.iterrows()], index=values.index, columns=values.columns)
    return values, labels


def draw_heatmap(ax: plt.Axes, values: pd.DataFrame, labels: pd.DataFrame, cmap: str, title: str,
                 show_rows: bool) -> None:
    ax.set_facecolor("0.88")  # a cell without a number: grey and hatched, never a colour of the scale
    ax.patch.set_hatch("///")
    ax.patch.set_edgecolor("0.65")
    sns.heatmap(values, annot=labels, fmt="", vmin=0, vmax=100, cmap=cmap, ax=ax, linewidths=0.5,
                linecolor="white", cbar_kws={"label": f"{title} (%)", "shrink": 0.8}, annot_kws={"fontsize": 7})
    for i, j in zip(*values.isna().to_numpy().nonzero()):  # seaborn leaves cells without a number blank
        ax.text(j + 0.5, i + 0.5, labels.iat[i, j], ha="center", va="center", fontsize=6.5,
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


def heatmaps(cells: pd.DataFrame, names: dict, folder: Path) -> list[str]:
    """ASR beside ACC, attacks x (undefended, defenses), one figure per data set, model and budget."""
    stems = []
    targeted = cells[~(cells["status"].isin(FINISHED) & cells["asr"].isna())]  # a clean model has no ASR
    for (dataset, model, budget), part in targeted.groupby(["dataset", "model", "budget"]):
        shown = named(part, names)
        asr, asr_labels = cell_grid(shown, "asr")
        acc, acc_labels = cell_grid(shown, "acc")
        width = 0.55 * asr.shape[1] + 2.5
        fig, (left, right) = plt.subplots(1, 2, figsize=(2 * width, 0.45 * asr.shape[0] + 2.6))
        draw_heatmap(left, asr, asr_labels, "rocket_r", "ASR", show_rows=True)
        draw_heatmap(right, acc, acc_labels, "mako", "ACC", show_rows=False)
        stems.append(finish(fig, folder, f"asr_heatmap_{dataset}_{model}_k{budget}",
                            f"{panel(shown)}: {budget_words(budget)}; mean over finished seeds, grey = not finished "
                            f"(n/a: never ran)"))
    return stems


def scatter(cells: pd.DataFrame, names: dict, folder: Path) -> list[str]:
    """ACC against ASR per attack and budget: every defense a colour and a marker, the undefended model a
    black star; points are means over finished seeds."""
    stems = []
    for dataset, model, shown in finished_panels(cells, names):
        defenses, attacks, budgets = (sorted(shown[c].unique()) for c in ("defense", "attack", "budget"))
        style = styles(defenses)
        fig, axes = plt.subplots(len(attacks), len(budgets), figsize=(3.1 * len(budgets) + 1.8, 2.8 * len(attacks)),
                                 squeeze=False, sharex=True, sharey=True)
        means = shown.groupby(["attack", "budget", "defense"])[["asr", "acc"]].mean() * 100
        for i, attack in enumerate(attacks):
            undefended = shown[shown["attack"] == attack][["undefended_asr", "undefended_acc"]].mean() * 100
            for j, budget in enumerate(budgets):
                ax = axes[i][j]
                ax.scatter(undefended["undefended_asr"], undefended["undefended_acc"], marker="*", s=160,
                           color="black", zorder=3, label="undefended")
                for defense in defenses:
                    if (attack, budget, defense) in means.index:
                        asr, acc = means.loc[(attack, budget, defense)]
                        colour, marker = style[defense]
                        ax.scatter(asr, acc, color=colour, marker=marker, s=42, alpha=0.85, edgecolor="white",
                                   linewidth=0.5, label=defense, zorder=2)
                ax.set_xlim(-4, 104)
                ax.set_ylim(-4, 104)
                ax.grid(alpha=0.3)
                if i == 0:
                    ax.set_title(budget_words(budget), fontsize=8)
                if j == 0:
                    ax.set_ylabel(f"{attack}\nACC (%)", fontsize=8)
                if i == len(attacks) - 1:
                    ax.set_xlabel("ASR (%)", fontsize=8)
        legend(fig, axes, [UNDEFENDED, *defenses])
        stems.append(finish(fig, folder, f"acc_vs_asr_{dataset}_{model}",
                            f"{panel(shown)}: ACC against ASR (better: top left)", rect=(0, 0, 0.84, 1)))
    return stems


def budget_lines(cells: pd.DataFrame, names: dict, folder: Path) -> list[str]:
    """ASR against the clean budget (categories 0, 1, 10, ...): mean over finished seeds, ± std as a band
    clipped to [0, 100]."""
    stems = []
    for dataset, model, shown in finished_panels(cells, names):
        defenses, attacks, budgets = (sorted(shown[c].unique()) for c in ("defense", "attack", "budget"))
        style = styles(defenses)
        fig, axes = plt.subplots(1, len(attacks), figsize=(3.2 * len(attacks) + 1.8, 3.2), squeeze=False, sharey=True)
        stats = shown.groupby(["attack", "defense", "budget"])["asr"].agg(["mean", "std"]) * 100
        for ax, attack in zip(axes[0], attacks):
            for defense in defenses:
                if (attack, defense) not in stats.droplevel("budget").index:
                    continue
                rows = stats.loc[(attack, defense)].reindex(budgets)
                x = np.arange(len(budgets))
                colour, marker = style[defense]
                ax.plot(x, rows["mean"], color=colour, marker=marker, markersize=5, linewidth=1.2, label=defense)
                low = (rows["mean"] - rows["std"].fillna(0)).clip(0, 100)
                high = (rows["mean"] + rows["std"].fillna(0)).clip(0, 100)
                ax.fill_between(x, low, high, color=colour, alpha=0.12, linewidth=0)
            ax.set_xticks(np.arange(len(budgets)), [str(b) for b in budgets])
            ax.set_xlabel("clean images per class (0 = synthetic)", fontsize=8)
            ax.set_ylim(0, 100)
            ax.set_title(attack, fontsize=9)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("ASR (%)")
        legend(fig, axes, defenses)
        stems.append(finish(fig, folder, f"asr_vs_budget_{dataset}_{model}",
                            f"{panel(shown)}: ASR against the clean budget (mean ± std over finished seeds)",
                            rect=(0, 0, 0.84, 1)))
    return stems


def time_breakdown(cells: pd.DataFrame, names: dict, folder: Path) -> list[str]:
    """Where a sweep's time went, per data set and model: training each poisoned model (once per model, as the
    cache does), each defense, the budget-0 synthesis, the shared trigger reversal and the evaluation, so the
    next bottleneck shows without reading JSON."""
    stems = []
    done = cells[cells["status"].isin(RAN)]
    for (dataset, model), part in done.groupby(["dataset", "model"]):
        shown = named(part, names)
        models = shown.drop_duplicates("model_key")
        rows = [("training", a, s) for a, s in models.groupby("attack")["train_seconds"].sum().items()]
        rows += [("defense", d, s) for d, s in shown.groupby("defense")["defense_seconds"].sum().items()]
        rows += [(phase, phase, shown[f"{phase}_seconds"].sum()) for phase in ("synthesis", "reversal", "eval")
                 if f"{phase}_seconds" in shown]
        table = pd.DataFrame(rows, columns=["phase", "what", "seconds"]).assign(minutes=lambda t: t.seconds / 60)
        table = table[table["minutes"] > 0].sort_values(["phase", "minutes"], ascending=[True, False])
        fig, ax = plt.subplots(figsize=(7, 0.28 * len(table) + 1.5))
        sns.barplot(data=table, y="what", x="minutes", hue="phase", dodge=False, ax=ax,
                    palette=sns.color_palette("colorblind", table["phase"].nunique()))
        ax.set_xlabel("minutes (summed over cells; training once per poisoned model)")
        ax.set_ylabel("")
        ax.set_title(f"{panel(shown)}: where the time went, {table.minutes.sum():.0f} min in all", fontsize=9)
        stems.append(finish(fig, folder, f"time_{dataset}_{model}"))
    return stems


def training_curves(curves: pd.DataFrame, names: dict, folder: Path, target: float | None = None) -> list[str]:
    """Each poisoned model's clean test ACC and ASR against the minutes it trained (test passes not counted), per
    data set and model: one colour per attack, one line per seed; the time-to-accuracy view of a recipe, with
    ``target`` (ACC in %) as a dashed line when given."""
    stems = []
    measured = curves.dropna(subset=["test_acc"])
    for (dataset, model), part in measured.groupby(["dataset", "model"]):
        shown = named(part, names)
        fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.4), sharex=True)
        for ax, metric, label in zip(axes, ("test_acc", "test_asr"), ("clean test ACC (%)", "ASR (%)")):
            sns.lineplot(data=shown, x="minutes", y=metric, hue="attack", units="seed", estimator=None, marker="o",
                         markersize=3, linewidth=1, palette="colorblind", ax=ax, legend=ax is axes[1])
            ax.set_ylim(-2, 102)
            ax.set_ylabel(label)
            ax.set_xlabel("minutes of training")
            ax.grid(alpha=0.3)
        if target is not None:
            axes[0].axhline(target, color="black", linestyle="--", linewidth=0.8)
            axes[0].annotate(f"{target:g} %", (0, target), xytext=(2, 2), textcoords="offset points", fontsize=7)
        if axes[1].get_legend() is not None:
            sns.move_legend(axes[1], "lower right", fontsize=7, title=None, frameon=False)
        stems.append(finish(fig, folder, f"training_{dataset}_{model}",
                            f"{panel(shown)}: the poisoned models while they train (one line per seed)"))
    return stems


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
