"""The paper-style table of a protocol run: rows per (method, fraction), Markdown and CSV, with
95 % confidence intervals over folds, paired comparisons against a reference method, and a plot
of the headline metric against the training-set size."""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Sequence

from medadapt.stats import confidence_interval, mean_std, paired_comparison


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
    "unet": "U-Net from scratch (MONAI)",
}


def percent_label(fraction: float) -> str:
    """0.0063 -> "0.63 %", 1.0 -> "100 %"."""
    return f"{100.0 * fraction:.4g} %"


def count_label(counts: Sequence[int], unit: str = "imgs") -> str:
    """Training images per fold: "5 imgs", or "5-6 imgs" when folds differ."""
    if not counts:
        return f"? {unit}"
    lo, hi = min(counts), max(counts)
    if lo == hi == 1 and unit.endswith("s"):
        return f"1 {unit[:-1]}"  # "1 stack", not "1 stacks"
    return f"{lo} {unit}" if lo == hi else f"{lo}-{hi} {unit}"


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
                row[f"{metric}_ci"] = confidence_interval(values)
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
    interval = row.get(f"{metric}_ci")
    if interval is not None:
        text += f" [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"
    if row["folds_done"] < row["folds"]:
        text += f" ({row['folds_done']}/{row['folds']} folds)"
    return text


def method_title(row: dict) -> str:
    name = row["method"]
    base, _, iso = name.partition("@iso:")
    title = METHOD_TITLES.get(base, base)
    details = []
    if row.get("size_option") and row.get("size") is not None:
        details.append(f"{row['size_option']} {row['size']}")
    if iso:
        details.append(f"as many parameters as {METHOD_TITLES.get(iso.partition('@')[0], iso)}")
    return title + (f" ({', '.join(details)})" if details else "")


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


def paired_table(rows: list[dict], metric: str, reference: str) -> str:
    """Markdown: ``reference`` minus every other method, per fraction (paired over folds)."""
    fractions = list(dict.fromkeys(r["fraction"] for r in rows))
    by_key = {(r["method"], r["fraction"]): r for r in rows}
    first = {f: next(r for r in rows if r["fraction"] == f) for f in fractions}
    header = ["Method"] + [f"{first[f]['percent']} ({first[f]['count']})" for f in fractions]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(fractions)) + "|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        if method == reference:
            continue
        cells = [method_title(by_key[(method, fractions[0])])]
        for f in fractions:
            result = paired_comparison(by_key[(reference, f)][f"{metric}_folds"], by_key[(method, f)][f"{metric}_folds"])
            if result is None:
                cells.append("—")
                continue
            interval = result["ci"]
            cells.append(f"{100 * result['difference']:+.2f} [{100 * interval[0]:+.1f}, {100 * interval[1]:+.1f}], "
                         f"p = {result['p_value']:.3g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(rows: list[dict], task: str, header_lines: Sequence[str] = (), notes: Sequence[str] = (),
                    reference: str | None = None) -> str:
    parts = list(header_lines)
    for metric, title in task_metrics(task):
        parts += ["", f"**{title}**, mean ± std [95 % CI] over folds", "", markdown_table(rows, metric)]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    if reference in methods and len(methods) > 1:
        metric, title = task_metrics(task)[0]
        parts += ["", (f"**{METHOD_TITLES.get(reference, reference)} minus each method**, {title.split(' (')[0]} "
                       "points: mean difference over folds [95 % CI], paired t-test p (each fold: the same training "
                       "images and seed)"), "", paired_table(rows, metric, reference)]
    if notes:
        parts += [""] + [f"- {n}" for n in notes]
    return "\n".join(parts).strip() + "\n"


def csv_text(rows: list[dict], task: str) -> str:
    """Long format: one line per (method, fraction); metrics as fractions in [0, 1]."""
    columns = ["method", "size_option", "size", "trainable", "total", "trainable_percent", "fraction",
               "percent", "count", "train_counts", "folds_done", "folds"]
    for metric, _ in task_metrics(task):
        columns += [metric, f"{metric}_std", f"{metric}_ci", f"{metric}_folds"]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        line = {}
        for key in columns:
            value = row.get(key)
            if isinstance(value, tuple):  # a confidence interval
                value = ";".join(f"{v:.6g}" for v in value)
            elif isinstance(value, list):
                value = ";".join("" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v)) for v in value)
            elif isinstance(value, float):
                value = f"{value:.6g}"
            line[key] = "" if value is None else value
        writer.writerow(line)
    return out.getvalue()


def plot(rows: list[dict], task: str, path, title: str = "") -> None:
    """The headline metric against the training-set size, one line per method: the mean over
    folds and its 95 % confidence interval (error bars), the mean count of each size on x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, label = task_metrics(task)[0]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        points = [r for r in rows if r["method"] == method and r[metric] is not None]
        if not points:
            continue
        x = [statistics.fmean(r["train_counts"]) for r in points]
        y = [100 * r[metric] for r in points]
        errors = [[100 * (r[metric] - r[f"{metric}_ci"][0]) if r[f"{metric}_ci"] else 0 for r in points],
                  [100 * (r[f"{metric}_ci"][1] - r[metric]) if r[f"{metric}_ci"] else 0 for r in points]]
        ax.errorbar(x, y, yerr=errors, marker="o", capsize=3, label=method_title(points[0]))
    ax.set_xscale("log")
    ax.set_xlabel("training samples (log scale)")
    ax.set_ylabel(label)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
