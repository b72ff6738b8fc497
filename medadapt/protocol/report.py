"""The paper-style table of a protocol run: rows per (method, fraction), Markdown and CSV."""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Sequence


def task_metrics(task: str) -> list[tuple[str, str]]:
    """(metric, title) of what a table reports for ``task``, headline first (the task's own)."""
    from medadapt.tasks import get_task

    return list(get_task(task).metrics)


METHOD_TITLES = {
    "dka": "DKA",
    "lka": "LKA",
    "cladapter": "CLAdapter",
    "adapter": "Adapter (Houlsby)",
    "adaptformer": "AdaptFormer",
    "convpass": "Convpass",
    "lora": "LoRA",
    "bitfit": "BitFit",
    "vpt": "Prompt (VPT)",
    "ciat": "CIAT",
    "aim": "AIM",
    "linear": "Linear probing",
    "full": "Full fine-tuning",
}


def percent_label(fraction: float) -> str:
    """0.0063 -> "0.63 %", 1.0 -> "100 %"."""
    return f"{100.0 * fraction:.4g} %"


def count_label(counts: Sequence[int], unit: str = "imgs") -> str:
    """Training images per fold: "5 imgs", or "5-6 imgs" when folds differ."""
    if not counts:
        return f"? {unit}"
    lo, hi = min(counts), max(counts)
    return f"{lo} {unit}" if lo == hi else f"{lo}-{hi} {unit}"


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); std is None for fewer than two values."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def build_rows(methods: Sequence[str], fractions: Sequence[float], folds: int, method_info: dict,
               cells: dict, fraction_counts: dict, task: str, unit: str = "imgs") -> list[dict]:
    """One row per (method, fraction), in the order given.

    Arguments:
        methods, fractions, folds: the grid.
        method_info: method -> {"size_option", "size", "trainable", "total", "options"}.
        cells: (method, fraction, fold) -> the stored cell record, for finished cells.
        fraction_counts: fraction -> training images per fold (from the splits).
        task: "classification", "segmentation" or "segmentation3d" (which metrics).
        unit: what a training sample is called in the count label.
    """
    rows = []
    for method in methods:
        info = method_info[method]
        for fraction in fractions:
            done = [cells[(method, fraction, k)] for k in range(folds) if (method, fraction, k) in cells]
            counts = list(fraction_counts.get(fraction, []))
            row = {
                "method": method,
                "size_option": info.get("size_option"),
                "size": info.get("size"),
                "trainable": info["trainable"],
                "total": info["total"],
                "trainable_percent": round(100.0 * info["trainable"] / max(info["total"], 1), 4),
                "fraction": fraction,
                "percent": percent_label(fraction),
                "train_counts": counts,
                "count": count_label(counts, unit),
                "folds_done": len(done),
                "folds": folds,
            }
            for metric, _ in task_metrics(task):
                values = [c["metrics"].get(metric) for c in done]
                mean, std = mean_std(values)
                row[metric] = mean
                row[f"{metric}_std"] = std
                row[f"{metric}_folds"] = values
            rows.append(row)
    return rows


def _cell_text(row: dict, metric: str) -> str:
    mean, std = row[metric], row[f"{metric}_std"]
    if mean is None:
        return "—"
    text = f"{100 * mean:.2f}"
    if std is not None:
        text += f" ± {100 * std:.2f}"
    if row["folds_done"] < row["folds"]:
        text += f" ({row['folds_done']}/{row['folds']} folds)"
    return text


def method_title(row: dict) -> str:
    title = METHOD_TITLES.get(row["method"], row["method"])
    if row.get("size_option") and row.get("size") is not None:
        title += f" ({row['size_option']} {row['size']})"
    return title


def markdown_table(rows: list[dict], metric: str) -> str:
    """Methods down, fractions (with absolute counts) across, mean ± std over folds."""
    fractions = list(dict.fromkeys(r["fraction"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by_key = {(r["method"], r["fraction"]): r for r in rows}
    first = {f: next(r for r in rows if r["fraction"] == f) for f in fractions}
    header = ["Method", "Trainable params"] + [f"{first[f]['percent']} ({first[f]['count']})" for f in fractions]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * len(fractions)) + "|"]
    for method in methods:
        some = by_key[(method, fractions[0])]
        cells = [method_title(some), f"{some['trainable']:,} ({some['trainable_percent']:.2f} %)"]
        cells += [_cell_text(by_key[(method, f)], metric) for f in fractions]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(rows: list[dict], task: str, header_lines: Sequence[str] = (), notes: Sequence[str] = ()) -> str:
    parts = list(header_lines)
    for metric, title in task_metrics(task):
        parts += ["", f"**{title}**, mean ± std over folds", "", markdown_table(rows, metric)]
    if notes:
        parts += [""] + [f"- {n}" for n in notes]
    return "\n".join(parts).strip() + "\n"


def csv_text(rows: list[dict], task: str) -> str:
    """Long format: one line per (method, fraction); metrics as fractions in [0, 1]."""
    columns = ["method", "size_option", "size", "trainable", "total", "trainable_percent", "fraction",
               "percent", "count", "train_counts", "folds_done", "folds"]
    for metric, _ in task_metrics(task):
        columns += [metric, f"{metric}_std", f"{metric}_folds"]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        line = {}
        for key in columns:
            value = row.get(key)
            if isinstance(value, list):
                value = ";".join("" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v)) for v in value)
            elif isinstance(value, float):
                value = f"{value:.6g}"
            line[key] = "" if value is None else value
        writer.writerow(line)
    return out.getvalue()
