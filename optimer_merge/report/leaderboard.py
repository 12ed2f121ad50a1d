"""A leaderboard from lm-eval results JSON files: ours (`optimer-merge eval`) or any lm-eval run.

Each file gives one row; columns are ``task/metric`` (filter kept when it is not ``none``).
lm-eval's ``higher_is_better`` marks each column's direction and the best value per column.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from optimer_merge.errors import ConfigError, InputNotFound

# Numbers lm-eval puts beside the metrics in a results row that are not metrics.
BOOKKEEPING = {"sample_len", "samples", "sample_count", "num_fewshot"}


def find_results(path: str | Path) -> list[Path]:
    """A results file, or every lm-eval results file under a folder (results.json, results_*.json)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputNotFound(f"results {path}: no such file or folder")
    found = sorted(p for p in path.rglob("results*.json") if p.is_file())
    if not found:
        raise InputNotFound(f"results {path}: no lm-eval results*.json inside")
    return found


def model_name(results: dict, path: Path) -> str:
    args = str(results.get("config", {}).get("model_args", "") or "")
    for part in args.split(","):
        key, _, value = part.partition("=")
        if key.strip() == "pretrained" and value:
            return Path(value).name if Path(value).name not in ("model", "") else Path(value).parent.name
    return results.get("model_name") or path.parent.name


def read_rows(entries: list[str]) -> list[tuple[str, dict]]:
    """``[NAME=]PATH`` entries -> (name, results) rows, in the order given."""
    rows = []
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep or not Path(path).exists() and Path(entry).exists():
            name, path = "", entry
        elif not name.strip():
            raise ConfigError(f"{entry!r}: the NAME before '=' is empty; give NAME=RESULTS or just RESULTS")
        if not path.strip():  # "" would search the working folder
            raise ConfigError(f"{entry!r} gives no results file or folder; give [NAME=]RESULTS")
        files = find_results(path)
        for file in files:
            try:
                results = json.loads(file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ConfigError(f"{file}: not a JSON file ({error})") from None
            if not isinstance(results, dict) or not isinstance(results.get("results"), dict):
                raise ConfigError(f"{file}: not an lm-eval results file (no 'results' table)")
            label = name or model_name(results, file)
            if name and len(files) > 1:
                label = f"{name}/{file.parent.name}"
            rows.append((label, results, file))
    labels = [label for label, _, _ in rows]
    for label in labels:
        if labels.count(label) > 1:
            files = [file for other, _, file in rows if other == label]
            if files[0].resolve() == files[1].resolve():
                raise ConfigError(f"{files[0]} is given twice; give each results file once")
            raise ConfigError(f"two rows would both be labelled {label!r} ({files[0]} and {files[1]}); give each its own NAME=RESULTS")
    return [(label, results) for label, results, _ in rows]


def columns_of(rows: list[tuple[str, dict]], metrics: list[str] | None = None, tasks: list[str] | None = None) -> list[tuple[str, str]]:
    """(task, metric-key) pairs present in any row, tasks in first-seen order.

    A metric is a key lm-eval lists in ``higher_is_better`` for the task (when the file has that
    table), never lm-eval's bookkeeping such as ``sample_len``."""
    columns = []
    for _, results in rows:
        for task, table in results["results"].items():
            if tasks and task not in tasks:
                continue
            known = results.get("higher_is_better", {}).get(task)
            for key, value in table.items():
                metric = key.split(",")[0]
                if "stderr" in key or key == "alias" or metric in BOOKKEEPING or (known and metric not in known):
                    continue
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                if metrics and metric not in metrics:
                    continue
                if (task, key) not in columns:
                    columns.append((task, key))
    return columns


def column_label(task: str, key: str) -> str:
    metric, _, filt = key.partition(",")
    return f"{task}/{metric}" + (f" ({filt})" if filt and filt != "none" else "")


def leaderboard(rows: list[tuple[str, dict]], metrics: list[str] | None = None, tasks: list[str] | None = None) -> dict:
    """{"columns": [...], "higher_is_better": [...], "rows": [{"model", "values"}], "best": [...]}"""
    columns = columns_of(rows, metrics, tasks)
    available = columns_of(rows)
    for flag, wanted, have in (("--tasks", tasks, {t for t, _ in available}), ("--metrics", metrics, {k.split(",")[0] for _, k in available})):
        unknown = sorted(set(wanted or ()) - have)
        if unknown:
            raise ConfigError(f"{flag}: {', '.join(unknown)} not in the results; they have {', '.join(sorted(have))}")
    if not columns:
        raise ConfigError("no metrics to show: no task has the chosen metrics (check --metrics against --tasks)")
    higher = []
    for task, key in columns:
        flags = [r.get("higher_is_better", {}).get(task, {}).get(key.split(",")[0]) for _, r in rows]
        higher.append(next((f for f in flags if f is not None), True))
    table = []
    for name, results in rows:
        values = []
        for task, key in columns:
            value = results["results"].get(task, {}).get(key)
            values.append(float(value) if isinstance(value, (int, float)) else None)
        table.append({"model": name, "values": values})
    best = []
    for j, hib in enumerate(higher):
        present = [row["values"][j] for row in table if row["values"][j] is not None and math.isfinite(row["values"][j])]
        best.append((max(present) if hib else min(present)) if present else None)
    board = {"columns": [column_label(t, k) for t, k in columns], "higher_is_better": higher, "rows": table, "best": best}
    return {**board, "warnings": incomparable(rows, list(dict.fromkeys(t for t, _ in columns)))}


def incomparable(rows: list[tuple[str, dict]], tasks: list[str]) -> list[str]:
    """A line per task whose rows were scored on different numbers of items (``--limit``) or shots:
    their values are not comparable (rows whose results do not say are left out)."""
    lines = []
    for task in tasks:
        for field, what in (("n-samples", "items"), ("n-shot", "shots")):
            seen = {}
            for name, results in rows:
                value = results.get(field, {}).get(task)
                value = value.get("effective") if isinstance(value, dict) else value
                if value is not None:
                    seen.setdefault(value, []).append(name)
            if len(seen) > 1:
                groups = "; ".join(f"{value} for {', '.join(names)}" for value, names in seen.items())
                lines.append(f"{task}: rows scored on different numbers of {what} ({groups}): their values are not comparable")
    return lines


def _cell(text: str) -> str:
    """Text as one Markdown table cell: a `|` would start another column, a line break end the row."""
    return " ".join(text.split()).replace("|", "\\|")


def format_value(value: float) -> str:
    """Four decimals, or scientific notation from a million on: a perplexity can have 100 digits."""
    return f"{value:.4f}" if abs(value) < 1e6 else f"{value:.4e}"


def to_markdown(board: dict) -> str:
    head = "| model | " + " | ".join(f"{_cell(c)} {'↑' if h else '↓'}" for c, h in zip(board["columns"], board["higher_is_better"])) + " |"
    lines = [head, "|---|" + "---:|" * len(board["columns"])]
    for row in board["rows"]:
        cells = []
        for value, best in zip(row["values"], board["best"]):
            if value is None:
                cells.append("—")
            else:
                text = format_value(value)
                cells.append(f"**{text}**" if best is not None and value == best else text)
        lines.append(f"| {_cell(row['model'])} | " + " | ".join(cells) + " |")
    if board.get("warnings"):
        lines += ["", *(f"> warning: {w}" for w in board["warnings"])]
    return "\n".join(lines) + "\n"


def write(board: dict, out_dir: str | Path) -> dict[str, Path]:
    """leaderboard.md, leaderboard.csv and leaderboard.png in ``out_dir``."""
    from optimer_merge.io.files import atomic_write_text, make_dirs

    out_dir = Path(out_dir)
    make_dirs(out_dir, "--output")
    paths = {"md": out_dir / "leaderboard.md", "csv": out_dir / "leaderboard.csv", "png": out_dir / "leaderboard.png"}
    atomic_write_text(paths["md"], to_markdown(board))
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(["model", *board["columns"]])
    for row in board["rows"]:
        writer.writerow([row["model"], *("" if v is None else repr(v) for v in row["values"])])
    atomic_write_text(paths["csv"], table.getvalue())
    plot(board, paths["png"])
    return paths


def plot(board: dict, path: Path) -> None:
    """One panel per column, a bar per model; the best bar is outlined."""
    from optimer_merge.report.plots import pyplot, save

    plt = pyplot()
    n = len(board["columns"])
    cols = min(n, 4)
    nrows = math.ceil(n / cols)
    models = [r["model"] for r in board["rows"]]
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 0.35 * len(models) * nrows + 1.8 * nrows), squeeze=False)
    for j, (label, hib) in enumerate(zip(board["columns"], board["higher_is_better"])):
        ax = axes[j // cols][j % cols]
        values = [r["values"][j] if r["values"][j] is not None else float("nan") for r in board["rows"]]
        bars = ax.barh(range(len(models)), values, color=[f"C{i % 10}" for i in range(len(models))])
        for bar, value in zip(bars, values):
            if value == board["best"][j]:
                bar.set_edgecolor("black")
                bar.set_linewidth(2)
        finite = [v for v in values if math.isfinite(v)]
        if finite:
            lo, hi = min(finite), max(finite)
            pad = (hi - lo) * 0.15 or abs(hi) * 0.05 or 1.0
            ax.set_xlim(lo - pad if lo - pad > 0 or lo < 0 else 0, hi + pad)
        ax.set_yticks(range(len(models)), models if j % cols == 0 else [""] * len(models), fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{label} {'↑' if hib else '↓'}", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    for j in range(n, nrows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.tight_layout()
    save(fig, path)
