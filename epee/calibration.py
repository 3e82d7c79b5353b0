"""Offline calibration of the exit policy: choose τ and P from one full-depth pass over a dev set.

The pieces, each in its own module and all importable from here: the pass and the simulation
of any policy on its outputs (:mod:`epee.layer_outputs`), the sweep and the choice of a setting
(:mod:`epee.policy_search`), and the reports of a sweep written into the model directory (below).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Sequence

from .layer_outputs import (  # noqa: F401 - the public names of calibration
    LayerOutputs, SimulatedRun, collect_layer_outputs, layer_predictions, simulate,
)
from .policy_search import (  # noqa: F401
    THRESHOLD_GRID, THRESHOLD_QUANTILES, RobustChoice, SweepPoint, _speed_first, choose, choose_robust,
    default_thresholds, frontier, sweep,
)

SWEEP_KINDS = ("none", "entropy", "patience", "epee")


CSV_FIELDS = ("kind", "entropy_threshold", "patience", "min_exit_layer", "score", "mean_exit_layer", "layer_speedup")


def write_sweep_table(points: Sequence[SweepPoint], path_csv: str | os.PathLike) -> None:
    """Every swept point as one CSV row (empty cells where a kind has no τ or P)."""
    path = Path(path_csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        for p in points:
            writer.writerow(["" if getattr(p, k) is None else getattr(p, k) for k in CSV_FIELDS])


def _fmt(value: float | int | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_table_markdown(points: Sequence[SweepPoint], chosen: SweepPoint | None) -> str:
    """A Markdown table of each kind's frontier, the chosen setting marked."""
    lines = [
        "| kind | τ | P | score | mean exit layer | layer speedup | |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    shown = False
    for kind in SWEEP_KINDS:
        for p in frontier(points, kind):
            mark = "**chosen**" if p == chosen else ""
            shown |= p == chosen
            lines.append(
                f"| {p.kind} | {_fmt(p.entropy_threshold, '.4g')} | {_fmt(p.patience, 'd')} | {p.score:.4f} "
                f"| {p.mean_exit_layer:.3f} | {p.layer_speedup:.2f}x | {mark} |"
            )
    if chosen is not None and not shown:  # off the frontier (e.g. a hand-picked setting)
        c = chosen
        lines.append(
            f"| {c.kind} | {_fmt(c.entropy_threshold, '.4g')} | {_fmt(c.patience, 'd')} | {c.score:.4f} "
            f"| {c.mean_exit_layer:.3f} | {c.layer_speedup:.2f}x | **chosen** (off the frontier) |"
        )
    return "\n".join(lines) + "\n"


def plot_frontier(
    points: Sequence[SweepPoint], chosen: SweepPoint | None, path_png: str | os.PathLike, title: str
) -> None:
    """Score against mean exit layer: each kind's frontier, the full-depth point and the choice."""
    import matplotlib

    matplotlib.use("Agg")  # no display on the machines that run calibration
    from matplotlib.figure import Figure  # no pyplot: no global figure state to leak

    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    styles = {"entropy": ("tab:blue", "o"), "patience": ("tab:green", "s"), "epee": ("tab:orange", "^")}
    for kind, (color, marker) in styles.items():
        line = frontier(points, kind)
        if line:
            ax.plot(
                [p.mean_exit_layer for p in line], [p.score for p in line],
                color=color, marker=marker, markersize=4, linewidth=1.2, label=f"{kind} frontier",
            )
    for p in points:
        if p.kind == "none":
            ax.scatter([p.mean_exit_layer], [p.score], color="black", marker="D", s=40, zorder=3, label="full depth")
            break
    if chosen is not None:
        setting = ", ".join(
            s for s in (
                None if chosen.entropy_threshold is None else f"τ={chosen.entropy_threshold:.3g}",
                None if chosen.patience is None else f"P={chosen.patience}",
            ) if s
        )
        ax.scatter(
            [chosen.mean_exit_layer], [chosen.score], color="red", marker="*", s=180, zorder=4,
            label=f"chosen: {chosen.kind} {setting}".rstrip(),
        )
    ax.set_xlabel("mean exit layer")
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
