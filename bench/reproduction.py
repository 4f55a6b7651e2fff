"""``bdbench reproduction``: published rows beside bdbench's cells on the closest setting it runs.

The published numbers and the cells that stand in for them are data (``results/reproduction.yaml``): per source,
its setting, what differs from it in bdbench's run, where the records are and which cells match. Each defense row
compares the change a defense makes (after minus undefended, in points) with the published change: the direction
agrees when both lower, both raise or both leave a metric within its tolerance; the size agrees when the two
changes are within ``size`` points of each other. A row without finished cells says so, with its command.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from bdbench.outcome import DAMAGED, OK, configured
from bdbench.report import load, markdown, time_to, training_frame

# points: below ``flat`` a change is "no change"; within ``size`` of the published change, the size agrees
TOLERANCE = {"asr": {"flat": 5.0, "size": 15.0}, "acc": {"flat": 2.0, "size": 3.0}}


def direction(change: float, metric: str) -> str:
    flat = TOLERANCE[metric]["flat"]
    return "lowers" if change <= -flat else "raises" if change >= flat else "keeps"


def verdict(ours: dict[str, float], published: dict[str, float]) -> str:
    """'agrees' (direction and size of both changes), 'direction only', or what differs, from changes in points.

    Changes are rounded to 0.001 points first: records hold float32 fractions whose ~1e-5 points of noise must not
    decide a change that sits on a tolerance (one test image is 0.01 points; 200 of 10,000 images is 2.0, not
    1.99999809)."""
    ours, published = ({m: round(float(v), 3) for m, v in d.items()} for d in (ours, published))
    wrong = [m for m in ("asr", "acc") if direction(ours[m], m) != direction(published[m], m)]
    if wrong:
        return "disagrees: " + ", ".join(f"{m.upper()} {direction(ours[m], m)}, published {direction(published[m], m)}"
                                         for m in wrong)
    far = [m for m in ("asr", "acc") if abs(ours[m] - published[m]) > TOLERANCE[m]["size"]]
    return "agrees" if not far else "direction only (" + ", ".join(
        f"{m.upper()} {ours[m]:+.1f} vs {published[m]:+.1f}" for m in far) + ")"


def _mean(values: pd.Series) -> str:
    v = values.dropna() * 100
    return "–" if v.empty else f"{v.mean():.1f}" if len(v) == 1 else f"{v.mean():.1f} ± {v.std():.1f}"


def source_table(block: dict, cells: pd.DataFrame) -> pd.DataFrame:
    """One row per published row of ``block``: published before/after, bdbench's, n, and the verdict. A row with
    ``oracle: true`` reads what the reference code would have chosen with the test set (bdbench.oracle) instead of
    the cell's own result; the damaged status is then the cell's, not the choice's."""
    match = cells
    for key, value in block["match"].items():
        match = match[match[key].astype(str) == str(value)] if len(match) else match
    base = block["rows"][0]  # the undefended row comes first
    rows = []
    for row in block["rows"]:
        published = f"{row['acc']:.2f} / {row['asr']:.2f}"
        label = row["defense"] + (" (oracle: threshold on test ASR)" if row.get("oracle") else "")
        if row["defense"] == "none":
            ours = match[match["undefended_acc"].notna()].drop_duplicates("model_key") if len(match) else match
            done, acc, asr = ours, ours.get("undefended_acc"), ours.get("undefended_asr")
        else:
            mine = match[match["defense"] == row["defense"]] if len(match) else match
            if row.get("oracle"):  # the reference code's test-set choice (bdbench.oracle), where the cell measured it
                mine = mine[mine["oracle_acc"].notna()] if "oracle_acc" in mine else mine.iloc[0:0]
            # a damaged cell is compared too: the published row may have lost accuracy as well; n says it was
            done = mine[mine["status"].isin((OK, DAMAGED))] if len(mine) else mine
            prefix = "oracle_" if row.get("oracle") else ""
            acc, asr = done.get(prefix + "acc"), done.get(prefix + "asr")
        if not len(done):
            tried = match[match["defense"] == row["defense"]] if len(match) and row["defense"] != "none" else done
            outcome = ", ".join(f"{s} {n}" for s, n in tried["status"].value_counts().sort_index().items()) \
                if len(tried) else "not run"  # cells that ran and did not finish say what became of them
            rows.append({"defense": label, "published ACC / ASR": published, "bdbench ACC / ASR": outcome,
                         "n": f"0/{len(tried)}" if len(tried) else 0, "verdict": "–"})
            continue
        if row["defense"] == "none":
            result = "baseline: ACC {:+.1f}, ASR {:+.1f} points".format(100 * acc.mean() - row["acc"],
                                                                      100 * asr.mean() - row["asr"])
            if asr.mean() < configured().no_backdoor_asr:
                result += (f"; no backdoor (ASR below {configured().no_backdoor_asr:.0%}): the defense rows measure "
                           f"nothing")
        else:
            ours = {"acc": 100 * (acc - done["undefended_acc"]).mean(), "asr": 100 * (asr - done["undefended_asr"]).mean()}
            result = verdict(ours, {"acc": row["acc"] - base["acc"], "asr": row["asr"] - base["asr"]})
        ran = len(match[match["defense"] == row["defense"]]) if row["defense"] != "none" else len(done)
        rows.append({"defense": label, "published ACC / ASR": published,
                     "bdbench ACC / ASR": f"{_mean(acc)} / {_mean(asr)}",
                     "n": f"{len(done)}/{ran}" + (f" ({damaged} {DAMAGED})" if row["defense"] != "none" and not row.get(
                         "oracle") and (damaged := int((done["status"] == DAMAGED).sum())) else ""),
                     "verdict": result})
    return pd.DataFrame(rows)


def time_to_accuracy(block: dict, curves: pd.DataFrame, names: dict, out: Path) -> list[str]:
    """Lines saying how long bdbench's matching poisoned models took to reach ``time_to`` % clean test ACC, per
    seed, and a figure of their curves next to ``out`` (what the published baseline is held against)."""
    target = float(block["time_to"])
    if not curves.empty:
        for key, value in block["match"].items():
            if key in curves:
                curves = curves[curves[key].astype(str) == str(value)]
    if curves.empty or curves["test_acc"].isna().all():
        return [f"Time to {target:g} % clean test ACC: not measured (no matching record has a training curve).", ""]
    from bdbench.figures import save, training_curves

    folder = out.parent / out.stem
    stems = [save(plan, folder) for plan in training_curves(curves, names, target)]
    table = time_to(curves, target).drop(columns=["dataset", "model", "recipe"])
    table[["ACC", "ASR"]] = table[["ACC", "ASR"]].astype(float).round(1)
    table = table.astype(object).where(table.notna(), "not reached")
    return [f"Time to {target:g} % clean test ACC on 2 CPU cores (minutes of training, test passes not counted; "
            f"`monitor.test_every` epochs apart):", "", markdown(table), "",
            *[f"![training curves]({folder.name}/{stem}.png)" for stem in stems], ""]


def build(published: str | Path, out: str | Path) -> Path:
    """Write ``out`` (Markdown) from the sources in ``published``, reading each source's records folder."""
    published, out = Path(published), Path(out)
    sources = OmegaConf.to_container(OmegaConf.load(published), resolve=True)
    loaded: dict[str, tuple[pd.DataFrame, pd.DataFrame, dict]] = {}
    lines = ["# Reproduction: published rows beside bdbench's", "",
             f"Rebuilt by `bdbench reproduction --published {published} --out {out}` from the records each section "
             "names. ACC / ASR in %, bdbench's as mean ± std over its seeds. A defense row compares changes (after "
             "minus undefended, in points): the direction agrees when both lower, both raise or both keep a metric "
             f"(within {TOLERANCE['asr']['flat']:g} points of ASR, {TOLERANCE['acc']['flat']:g} of ACC); the size "
             f"agrees when the changes are within {TOLERANCE['asr']['size']:g} points of ASR and "
             f"{TOLERANCE['acc']['size']:g} of ACC of each other. The undefended row gives the differences.", ""]
    for block in sources:
        root = Path(block["records"])
        if str(root) not in loaded:
            curves: list = []
            names: dict = {}
            cells = load(root, names=names, curves=curves)[0] if root.is_dir() else pd.DataFrame()
            loaded[str(root)] = cells, training_frame(curves), names
        cells, curves, names = loaded[str(root)]
        lines += [f"## {block['source']}", "", f"Published setting: {block['setting']}.", "",
                  f"bdbench's stand-in: {block['stand_in']}.", "", f"What differs: {block['differs']}.", "",
                  markdown(source_table(block, cells)), "", f"Cells: `{block['command']}`", ""]
        if "time_to" in block:
            lines += time_to_accuracy(block, curves, names, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    return out
