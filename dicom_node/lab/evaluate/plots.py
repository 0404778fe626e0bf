"""PNG figures of an evaluation: the precision-recall curve and the FROC curve.

Figures are built with matplotlib's object API on the Agg canvas (no pyplot, no global
backend switch), so plotting is safe in a worker or a test process without a display.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from dicom_node.lab.evaluate.metrics import sensitivity_at

_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
_RATE_LABELS = {0.125: "1/8", 0.25: "1/4", 0.5: "1/2"}


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _rate_label(rate: float) -> str:
    return _RATE_LABELS.get(rate, f"{rate:g}")


def _title(text: str) -> str:
    # A checkpoint label can be long ("DEMO WEIGHTS - synthetic masses only, ..."): wrap it.
    return "\n".join(wrapped for line in text.splitlines() for wrapped in textwrap.wrap(line, 80) or [""])


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_pr_curve(
    series: Mapping[str, Mapping],
    path: Path,
    *,
    title: str,
    reference: Sequence[Mapping] = (),
    reference_label: str = "",
) -> Path:
    """Precision-recall at IoU 0.5 for each entry of `series` (name -> category metrics).

    The thick step line is COCO's interpolated precision (its mean is AP50), the thin line
    the raw precision per detection rank, the dot the operating point at the threshold.
    `reference` rows (precision/recall of other models) are drawn as grey markers.
    """
    fig = Figure(figsize=(7.5, 6.2), dpi=120, layout="constrained")
    ax = fig.subplots()
    plotted = 0
    for index, (name, metrics) in enumerate(series.items()):
        color = _COLORS[index % len(_COLORS)]
        pr = metrics["curves"]["pr"]
        if metrics.get("ap50") is None:
            ax.plot([], [], color=color, label=f"{name}: no lesions, AP50 undefined")
            continue
        plotted += 1
        if pr["recall"]:
            ax.plot(pr["recall"], pr["precision"], color=color, lw=0.8, alpha=0.35)
        ax.step(pr["recall_thresholds"], pr["interpolated_precision"], where="post", color=color, lw=2,
                label=f"{name}: AP50 = {metrics['ap50']:.3f} ({metrics['lesions']} lesions)")
        if metrics.get("precision") is not None and metrics.get("recall") is not None:
            ax.plot(metrics["recall"], metrics["precision"], "o", color=color, ms=8, mec="black", zorder=5,
                    label=(f"  score \u2265 {metrics['threshold']:g}: P {metrics['precision']:.3f}, "
                           f"R {metrics['recall']:.3f}, F1 {_fmt(metrics['f1'])}"))
    for row in reference:
        ax.plot(row["recall"], row["precision"], marker="s", color="0.55", ls="none", ms=6, zorder=4)
        ax.annotate(row["model"], (row["recall"], row["precision"]), textcoords="offset points",
                    xytext=(6, 4), fontsize=7, color="0.35")
    if reference:
        ax.plot([], [], marker="s", color="0.55", ls="none", label=reference_label)
    if not plotted:
        ax.text(0.5, 0.5, "no lesions in this set: no PR curve", ha="center", va="center",
                transform=ax.transAxes, fontsize=11, color="0.3")
    ax.set(xlim=(0, 1.01), ylim=(0, 1.02), xlabel="Recall (lesion level, IoU \u2265 0.5)", ylabel="Precision")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize=8, framealpha=0.9)
    ax.set_title(_title(title), fontsize=10)
    return _save(fig, path)


def plot_froc_curve(series: Mapping[str, Mapping], path: Path, *, title: str) -> Path:
    """FROC curves (sensitivity vs mean FPs per image, log x) for each entry of `series`.

    The curve drawn is the linear interpolation the reported sensitivities are read
    from; the markers are those sensitivities at 1/8 ... 4 FP/image.
    """
    fig = Figure(figsize=(7.5, 6.2), dpi=120, layout="constrained")
    ax = fig.subplots()
    rates = next(iter(series.values()))["froc"]["fp_rates"] if series else []
    highest = max([max(m["curves"]["froc"]["fp_per_image"]) for m in series.values()] + [max(rates, default=4)])
    x_min, x_max = min(rates, default=0.125) / 2, max(highest, max(rates, default=4)) * 1.6
    single = len(series) == 1
    plotted = 0
    for index, (name, metrics) in enumerate(series.items()):
        color = _COLORS[index % len(_COLORS)]
        curve, froc = metrics["curves"]["froc"], metrics["froc"]
        if not curve["lesions"]:
            ax.plot([], [], color=color, label=f"{name}: no lesions, sensitivity undefined")
            continue
        plotted += 1
        fps, sens = curve["fp_per_image"], curve["sensitivity"]
        last = fps[-1]
        xs = np.geomspace(x_min, max(last, x_min * 1.01), 400)
        ax.plot(xs, [sensitivity_at(fps, sens, x) for x in xs], color=color, lw=2,
                label=f"{name}: mean sensitivity (CPM) = {_fmt(froc['mean_sensitivity'])}")
        if last < x_max:  # past the last operating point the sensitivity is carried
            ax.plot([max(last, x_min), x_max], [sens[-1]] * 2, color=color, lw=1.2, ls="--", alpha=0.6)
        ax.plot(rates, froc["sensitivities"], "o", color=color, ms=6, mec="black", zorder=5)
        if single:
            for rate, value in zip(rates, froc["sensitivities"]):
                ax.annotate(f"{value:.2f}", (rate, value), textcoords="offset points", xytext=(0, 8),
                            ha="center", fontsize=8, color=color)
        if metrics.get("recall") is not None and metrics.get("fp_per_image") is not None:
            ax.plot(max(metrics["fp_per_image"], x_min), metrics["recall"], "D", color=color, ms=7,
                    mfc="white", zorder=6,
                    label=(f"  score \u2265 {metrics['threshold']:g}: {metrics['fp_per_image']:.2f} FP/image, "
                           f"sensitivity {metrics['recall']:.3f}"))
    for rate in rates:
        ax.axvline(rate, color="0.8", lw=0.8, ls=":", zorder=0)
    if not plotted:
        ax.text(0.5, 0.5, "no lesions in this set: no FROC curve", ha="center", va="center",
                transform=ax.transAxes, fontsize=11, color="0.3")
    ax.set_xscale("log")
    ax.set_xlim(x_min, x_max)
    ax.set_xticks(list(rates), [_rate_label(r) for r in rates])
    ax.set_xticks([], minor=True)
    ax.set(ylim=(0, 1.02), xlabel="Mean false positives per image (second marks on a found lesion not counted)",
           ylabel="Sensitivity (lesion level, IoU \u2265 0.5)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    ax.set_title(_title(title), fontsize=10)
    return _save(fig, path)
