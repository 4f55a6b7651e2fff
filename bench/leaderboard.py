"""The HTML leaderboard: one static page per results folder (``report/index.html``) and one index of all of them.

No server and no network at view time: the cells are embedded as JSON, the table is sorted and filtered by a
few lines of inline JavaScript, figures are files beside the page. Each row links to its records and shows
the config it ran under. The state (sort key, filters) lives in the URL's fragment, so a view can be linked
to, e.g. ``index.html#sort=-asr&budget=1``.

Rows are ranked by outcome before any column (``bdbench.outcome.RANK``, a row's worst seed): whatever a reader sorts
by, a row whose every seed finished comes before one with a seed that damaged, collapsed or never finished, so no
view puts a destroyed model above a working defense. The default order is DER, highest first: a low ASR and a kept
accuracy together.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import pandas as pd

from bdbench.code_versions import current_name, renamed
from bdbench.columns import budget_key
from bdbench.outcome import DAMAGED, OK, RAN, RANK, Rule

COLUMNS = [  # (key, header, kind): what each row shows; numbers sort numerically, text alphabetically
    ("dataset", "data set", "text"), ("model", "model", "text"), ("recipe", "recipe", "text"),
    ("experiment", "experiment", "text"), ("budget", "k", "budget"), ("attack", "attack", "text"),
    ("defense", "defense", "text"), ("outcome", "outcome", "text"), ("asr", "ASR %", "num"), ("acc", "ACC %", "num"),
    ("der", "DER %", "num"), ("undefended_asr", "ASR before %", "num"), ("undefended_acc", "ACC before %", "num"),
    ("n", "finished / run", "text"), ("isolation", "isolation", "text"), ("records", "records", "links"),
]
FILTERS = ("dataset", "model", "recipe", "experiment", "attack", "defense", "budget", "outcome", "isolation")
DEFAULT_SORT = "-der"

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 3px 8px; text-align: left; }}
th {{ cursor: pointer; background: #f3f3f3; position: sticky; top: 0; }}
th.sorted-asc::after {{ content: " \\25B2"; }} th.sorted-desc::after {{ content: " \\25BC"; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
td.bad {{ color: #a33; font-style: italic; }} tr.damaged td {{ background: #fbeeee; }}
tr.lost td {{ background: #f1f1f1; color: #777; }}
.filters label {{ margin-right: 1em; }} .figures img {{ max-width: 100%; border: 1px solid #eee; margin: .5em 0; }}
dialog pre {{ max-height: 70vh; overflow: auto; font-size: 12px; }}
</style></head>
<body>
<h1>{title}</h1>
<p>{summary}</p>
<p>Values are means over the seeds that finished. Rows are ranked by their worst seed's outcome first, whatever
column you sort by: rows whose every seed <i>finished</i>, then rows with a <i>damaged</i> seed ({rule}; shaded;
where no seed finished, the numbers are the damaged seeds'), then <i>collapsed</i>, <i>no backdoor</i>,
<i>diverged</i> and <i>failed</i> ones, whose seeds are never averaged in (the "finished / run" column counts
them). Default order: DER, highest first. k = clean images per class
(0: synthetic images; <i>any</i>: a data-free defense, run once per poisoned model). Click a header to sort; the
sort and filters are kept in the address (e.g. <code>#sort=-asr&amp;budget=1</code>).</p>
<div class="filters" id="filters"></div>
<table id="board"><thead><tr id="head"></tr></thead><tbody id="rows"></tbody></table>
<dialog id="config"><pre id="config-text"></pre><form method="dialog"><button>close</button></form></dialog>
<h2>Figures</h2>
<div class="figures">{figures}</div>
<script type="application/json" id="cells">{cells}</script>
<script>
const COLUMNS = {columns};
const FILTERS = {filters};
const DEFAULT_SORT = {default_sort};
function budgetKey(v) {{ return v === "any" ? -1 : Number(v); }}
// Outcome rank first (finished before damaged before ...), then the chosen column; missing values last.
function compareRows(a, b, key, desc, kind) {{
  if (a.rank !== b.rank) return a.rank - b.rank;
  const x = a[key], y = b[key];
  if (x === null || x === undefined) return (y === null || y === undefined) ? 0 : 1;
  if (y === null || y === undefined) return -1;
  const d = kind === "num" ? x - y : kind === "budget" ? budgetKey(x) - budgetKey(y)
    : String(x).localeCompare(String(y));
  return desc ? -d : d;
}}
const cells = JSON.parse(document.getElementById("cells").textContent);
function state() {{
  const s = {{}};
  for (const part of location.hash.slice(1).split("&")) {{
    const [k, v] = part.split("=");
    if (k) s[decodeURIComponent(k)] = decodeURIComponent(v || "");
  }}
  return s;
}}
function setState(s) {{
  location.hash = Object.entries(s).filter(([, v]) => v !== "").map(([k, v]) => k + "=" + encodeURIComponent(v)).join("&");
}}
function fmt(v, k) {{
  if (v === null || v === undefined) return "–";
  return typeof v === "number" && k !== "budget" ? v.toFixed(1) : String(v);
}}
function render() {{
  const s = state();
  const sort = s.sort || DEFAULT_SORT;
  const key = sort.replace(/^-/, ""), desc = sort.startsWith("-");
  const kind = (COLUMNS.find(c => c[0] === key) || [key, key, "text"])[2];
  let rows = cells.filter(c => FILTERS.every(f => !s[f] || String(c[f]) === s[f]));
  rows.sort((a, b) => compareRows(a, b, key, desc, kind));
  document.getElementById("head").innerHTML = COLUMNS.map(([k, label]) =>
    `<th data-key="${{k}}" class="${{k === key ? (desc ? "sorted-desc" : "sorted-asc") : ""}}">${{label}}</th>`).join("");
  document.getElementById("rows").innerHTML = rows.map(c => `<tr class="${{c.rank === 0 ? "" : c.rank === 1 ? "damaged" : "lost"}}">` + COLUMNS.map(([k, , kind]) => {{
    if (kind === "links") return "<td>" + c.records.map((r, i) => `<a href="${{r}}">${{i + 1}}</a>`).join(" ") +
      ` <a href="#" class="cfg" data-cell="${{c.id}}">config</a></td>`;
    const bad = c[k] === null && c.status ? " bad" : "";
    const text = c[k] === null && c.status && (k === "asr" || k === "acc" || k === "der") ? c.status : fmt(c[k], k);
    return `<td class="${{kind === "num" || kind === "budget" ? "num" : ""}}${{bad}}">${{text}}</td>`;
  }}).join("") + "</tr>").join("");
  for (const th of document.querySelectorAll("th")) th.onclick = () => {{
    const now = state(); const k = th.dataset.key;
    now.sort = (now.sort === k ? "-" : "") + k; setState(now);
  }};
  for (const a of document.querySelectorAll("a.cfg")) a.onclick = (e) => {{
    e.preventDefault();
    const cell = cells.find(c => String(c.id) === a.dataset.cell);
    document.getElementById("config-text").textContent = JSON.stringify(cell.config, null, 2);
    document.getElementById("config").showModal();
  }};
  document.getElementById("filters").innerHTML = FILTERS.map(f => {{
    const values = [...new Set(cells.map(c => String(c[f])))].sort((a, b) => a.localeCompare(b, undefined, {{numeric: true}}));
    return `<label>${{f}} <select data-filter="${{f}}"><option value="">all</option>` +
      values.map(v => `<option${{s[f] === v ? " selected" : ""}}>${{v}}</option>`).join("") + "</select></label>";
  }}).join("");
  for (const sel of document.querySelectorAll("select")) sel.onchange = () => {{
    const now = state(); now[sel.dataset.filter] = sel.value; setState(now);
  }};
  document.getElementById("board").dataset.rows = rows.length;
}}
window.addEventListener("hashchange", render);
render();
</script>
</body></html>
"""


def _mean(values: pd.Series) -> float | None:
    """In %, rounded as the tables print it (the page and the tables never disagree in the last digit)."""
    values = values.dropna().astype(float) * 100
    return None if values.empty else float(f"{values.mean():.1f}")


def rows(cells: pd.DataFrame, names: dict, records_root: Path, page_dir: Path) -> list[dict]:
    """One row per (data set, model, recipe, experiment, attack, defense, budget): its outcome and rank (the worst
    outcome among its seeds), means over its finished seeds (or, where none finished, over its damaged ones), the
    undefended model's, the outcome counts, links to the records and the config of the first."""
    out = []
    keys = ["dataset", "model", "recipe", "experiment", "attack", "defense", "budget"]
    ordered = cells.assign(budget=cells["budget"].astype(str))
    groups = sorted(ordered.groupby(keys, sort=False), key=lambda kv: (*kv[0][:6], budget_key(kv[0][6])))
    for i, (key, group) in enumerate(groups):
        cell = dict(zip(keys, key))
        present = [o for o in RANK if o in set(group["status"])]
        worst = present[-1]  # a row is as good as its worst seed: one damaged seed of three is no deployable defense
        shown = next((o for o in present if o in (OK, DAMAGED)), None)
        done = group[group["status"] == shown] if shown else group.iloc[:0]
        hit = int((group["status"] == worst).sum())
        outcome = ("finished" if worst == OK else worst) + ("" if hit == len(group) else f" ({hit}/{len(group)} seeds)")
        others = group.loc[group["status"] != OK, "status"].value_counts().sort_index()
        record_files = sorted(group["record"])
        config = renamed(json.loads((records_root / record_files[0]).read_text()).get("config"), current_name)
        poisoned = group[group["status"].isin(RAN)]
        budget = cell["budget"]
        out.append({
            "id": i, **{g: names.get((g, cell[g]), cell[g]) for g in ("dataset", "model", "attack", "defense")},
            "budget": budget if budget == "any" else int(budget), "recipe": cell["recipe"],
            "experiment": cell["experiment"], "outcome": outcome, "rank": RANK.index(worst),
            "asr": _mean(done.get("asr", pd.Series(dtype=float))), "acc": _mean(done.get("acc", pd.Series(dtype=float))),
            "der": _mean(done.get("der", pd.Series(dtype=float))),
            "undefended_asr": _mean(poisoned.get("undefended_asr", pd.Series(dtype=float))),
            "undefended_acc": _mean(poisoned.get("undefended_acc", pd.Series(dtype=float))),
            "n": f"{int((group['status'] == OK).sum())}/{len(group)}" + "".join(f", {s} {n}" for s, n in others.items()),
            "status": None if shown else worst,
            "isolation": ", ".join(sorted(set(group.get("isolation", pd.Series(dtype=object)).dropna()))) or None,
            "records": [os.path.relpath(records_root / r, page_dir) for r in record_files], "config": config,
        })
    return out


def write_page(cells: pd.DataFrame, names: dict, records_root: Path, out: Path, figure_stems: list[str],
               galleries: list[str], title: str, rule: Rule | None = None) -> Path:
    """``out/index.html``: the sortable, filterable table, the figures and the trigger galleries."""
    out.mkdir(parents=True, exist_ok=True)
    data = rows(cells, names, records_root, out)
    figures = "".join(
        f'<figure><img src="figures/{stem}.png" alt="{html.escape(stem)}"><figcaption>{html.escape(stem)} '
        f'(<a href="figures/{stem}.pdf">PDF</a>, <a href="figures/{stem}.svg">SVG</a>)</figcaption></figure>'
        for stem in figure_stems)
    figures += "".join(f'<figure><img src="figures/{g}" alt="{html.escape(g)}"><figcaption>trigger gallery: '
                       f'{html.escape(g)}</figcaption></figure>' for g in galleries)
    rule = rule or Rule()
    finished = int((cells["status"] == OK).sum())
    counts = cells.loc[cells["status"] != OK, "status"].value_counts()
    summary = (f"{len(cells)} cells: {finished} finished, " + ", ".join(
        f"{counts[s]} {s}" for s in RANK if s in counts)).rstrip(", ") + \
        f"; {len(data)} rows (seeds pooled). Tables: <a href=\"tables/\">tables/</a>, " \
        "problems: <a href=\"problems.md\">problems.md</a>."
    page = PAGE.format(title=html.escape(title), summary=summary, figures=figures,
                       cells=json.dumps(data, sort_keys=True).replace("</", "<\\/"),
                       columns=json.dumps(COLUMNS), filters=json.dumps(list(FILTERS)),
                       default_sort=json.dumps(DEFAULT_SORT),
                       rule=html.escape(f"clean ACC more than {rule.max_acc_drop:g} points below the undefended model"))
    path = out / "index.html"
    path.write_text(page)
    return path


def write_index(results: Path) -> Path:
    """``results/index.html``: a link to every published sweep's page, with its first summary line."""
    items = []
    for page in sorted(results.glob("*/report/index.html")):
        text = page.read_text()
        summary = text.split("<p>", 1)[1].split("</p>", 1)[0] if "<p>" in text else ""
        folder = page.parent.parent.name
        items.append(f'<li><a href="{folder}/report/index.html">{html.escape(folder)}</a>: '
                     f'{summary.split("; ")[0]}</li>')
    body = ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>bdbench results</title></head>"
            "<body style=\"font-family: system-ui, sans-serif; margin: 1.5em\"><h1>bdbench: published sweeps</h1>"
            "<p>Each sweep is rebuilt by the command in <a href=\"README.md\">README.md</a>.</p><ul>"
            + "".join(items) + "</ul></body></html>\n")
    path = results / "index.html"
    path.write_text(body)
    return path
