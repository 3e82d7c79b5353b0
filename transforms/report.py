"""A run report for people: one self-contained HTML page written next to a run's Parquet outputs.

``write_report(run_dir, manifest)`` reads ``{run_dir}/predictions-*.parquet``,
``{run_dir}/dead_letters-*.parquet`` and ``{run_dir}/exit_stats-*.parquet`` (through Beam's
``FileSystems``, so ``s3://`` and ``gs://`` prefixes work as local ones do) and writes
``{run_dir}/report.html``. ``run_dir`` is one run's directory, which holds that run's files only:
the batch pipelines' commit passes the directory it has just written, before any manifest names it
(``pipelines.outputs``; a finished run's is ``current_run_dir(output)``).
``build_report_html`` does the same from plain rows, without files.

The page holds no JavaScript and no external URL: CSS is inline and the plots are matplotlib PNGs
embedded as base64 data URIs, so the file can be mailed or archived on its own.

What reaches the page: ids of the run and model, the task, labels, exit layers, exit reasons,
scores, dead-letter stages and error types, and counts and timings. Only the columns listed in
``*_COLUMNS`` below are read; a dead letter's ``message`` and ``source_uri`` and every
prediction's ``record_id``/``source_uri`` are never read, so no note text, DICOM tag value or path
can reach the page. Every string from the data is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import math
from datetime import datetime, timezone
from typing import Any, Iterator

from .run_summary import (  # noqa: F401 - the summary's names, importable from here as before
    FINE_SCORE_BINS, Check, LabelRow, RunSummary, RunTally, score_median, summarize_rows,
)

PREDICTION_COLUMNS = ("run_id", "model_id", "task", "label", "score", "exit_layer", "num_layers", "exit_reason",
                      "event_spans", "macs", "dense_exit_macs", "dense_full_macs")
DEAD_LETTER_COLUMNS = ("run_id", "stage", "error_type")  # never "message" nor "source_uri"
EXIT_STATS_COLUMNS = ("run_id", "model_id", "task", "records", "num_layers", "wall_seconds", "macs", "audit_fraction",
                      "audited_records", "audit_agreeing", "audit_per_layer", "audit_per_label", "audit_macs",
                      "audit_status")
REPORT_NAME = "report.html"
MAX_TABLE_ROWS = 50  # a run with thousands of labels keeps a readable page; the rest is counted
MAX_CHART_BARS = 30
SCORE_BINS = 20  # bars of the score histogram


# -- plots -----------------------------------------------------------------------------------------
BLUE, ORANGE, RED = "#3465a4", "#f57900", "#cc0000"
DPI = 110  # with 8-inch figures: about 880 px, the width of the page's column


def _chart_text(s: str, limit: int = 40) -> str:
    """A label safe for matplotlib: shortened, and a "$" is not taken as the start of mathtext."""
    s = s if len(s) <= limit else s[: limit - 1] + "\u2026"
    return s.replace("$", r"\$")


def _png(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(width: float, height: float, integer_axis: str = "y"):
    from matplotlib.figure import Figure  # no pyplot: no global state, safe in worker threads
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(width, height))
    ax = fig.subplots()
    (ax.yaxis if integer_axis == "y" else ax.xaxis).set_major_locator(MaxNLocator(integer=True))  # counts
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="both", alpha=0.25)
    ax.set_axisbelow(True)
    return fig, ax


def plot_exit_layers(exits: tuple[int, ...]) -> str:
    fig, ax = _figure(8, 3)
    layers = list(range(1, len(exits) + 1))
    bars = ax.bar(layers, exits, color=BLUE, width=0.7)
    if len(exits) <= 24:
        ax.bar_label(bars, labels=[str(c) for c in exits], fontsize=9, padding=2)
    ax.set_xticks(layers if len(layers) <= 24 else layers[:: math.ceil(len(layers) / 24)])
    ax.set_xlabel("exit layer")
    ax.set_ylabel("records")
    ax.margins(y=0.15)
    return _png(fig)


def plot_labels(labels: tuple[LabelRow, ...], num_layers: int) -> str:
    shown = labels[:MAX_CHART_BARS]
    fig, ax = _figure(8, 1.0 + 0.35 * len(shown), integer_axis="x")
    y = list(range(len(shown)))[::-1]
    bars = ax.barh(y, [r.mean_exit_layer for r in shown], color=BLUE, height=0.6)
    ax.bar_label(bars, labels=[f"{r.mean_exit_layer:.2f}  (n={r.count})" for r in shown], fontsize=9, padding=3)
    ax.set_yticks(y, [_chart_text(r.label) for r in shown], fontsize=9)
    ax.set_xlim(0, num_layers * 1.2)
    if num_layers <= 24:
        ax.set_xticks(range(num_layers + 1))
    ax.set_xlabel(f"mean exit layer (of {num_layers})")
    return _png(fig)


def plot_scores(fine_bins: tuple[int, ...]) -> str:
    fig, ax = _figure(8, 2.8)
    edges = [i / len(fine_bins) for i in range(len(fine_bins))]
    ax.hist(edges, bins=SCORE_BINS, range=(0.0, 1.0), weights=fine_bins, color=ORANGE, edgecolor="white")
    ax.set_xlabel("score (probability of the predicted class)")
    ax.set_ylabel("records")
    return _png(fig)


def plot_dead_letters(rows: tuple[tuple[str, str, int], ...]) -> str:
    shown = rows[:MAX_CHART_BARS]
    fig, ax = _figure(8, 1.0 + 0.35 * len(shown), integer_axis="x")
    y = list(range(len(shown)))[::-1]
    bars = ax.barh(y, [c for _, _, c in shown], color=RED, height=0.6)
    ax.bar_label(bars, labels=[str(c) for _, _, c in shown], fontsize=9, padding=3)
    ax.set_yticks(y, [_chart_text(f"{s} / {e}") for s, e, _ in shown], fontsize=9)
    ax.margins(x=0.15)
    ax.set_xlabel("dead letters")
    return _png(fig)


# -- page ------------------------------------------------------------------------------------------
CSS = """
body { font-family: -apple-system, "Segoe UI", "DejaVu Sans", Arial, sans-serif; color: #222; margin: 0;
       background: #f6f6f4; }
main { max-width: 1000px; margin: 0 auto; padding: 24px 32px 48px; background: #fff; }
h1 { font-size: 1.6em; margin: 0 0 4px; }
h2 { font-size: 1.2em; margin: 32px 0 8px; padding-bottom: 4px; border-bottom: 2px solid #e4e4e0; }
.sub { color: #666; margin: 0 0 16px; overflow-wrap: anywhere; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(130px, 1fr)); gap: 12px; margin-bottom: 12px; }
.card { border: 1px solid #e4e4e0; border-radius: 6px; padding: 10px 14px; }
.card .v { font-size: 1.5em; font-weight: 600; }
.card .k { color: #666; font-size: 0.85em; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.92em; }
th, td { padding: 4px 12px; border-bottom: 1px solid #e4e4e0; text-align: left; overflow-wrap: anywhere; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f0f0ec; }
img { max-width: 100%; height: auto; display: block; margin: 8px 0; }
.ok { color: #2e7d32; font-weight: 600; } .bad { color: #c62828; font-weight: 600; } .na { color: #888; }
.empty { color: #666; font-style: italic; }
footer { margin-top: 40px; color: #888; font-size: 0.85em; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(head: list[str], rows: list[list[Any]], numeric: set[int] = frozenset()) -> str:
    def cells(tag: str, values: list[Any]) -> str:
        return "".join(f'<{tag}{" class=n" if i in numeric else ""}>{_e(v)}</{tag}>' for i, v in enumerate(values))

    body = "".join(f"<tr>{cells('td', r)}</tr>" for r in rows)
    return f"<table><thead><tr>{cells('th', head)}</tr></thead><tbody>{body}</tbody></table>"


def _img(src: str, alt: str) -> str:
    return f'<img src="{src}" alt="{_e(alt)}">'


def _more(total: int, shown: int, what: str) -> str:
    return f'<p class="empty">{total - shown} more {_e(what)}.</p>' if total > shown else ""


def _fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def _audit_section(a) -> str:
    """The audit (transforms.audit): agreement of the exit prediction with full depth, overall, per
    exit layer and per label, with Clopper-Pearson 95% intervals, and the compute it took."""
    from .audit import clopper_pearson

    out = ['<h2 id="audit">Audit: agreement with full depth</h2>']
    if not a.audited:
        out.append(f'<p class="empty">Audit of {a.fraction:.1%} of records: no record was audited'
                   f'{" (status: " + _e(a.status) + ")" if a.status != "unchecked" else ""}.</p>')
        return "".join(out)
    share = "unknown" if a.compute_share is None else f"{a.compute_share:.2%}"
    failed = f", {a.windows_failed} window(s) failed" if a.windows_failed > 1 else ""
    out.append(f'<p id="audit-overall">{a.audited} records audited ({a.fraction:.1%} drawn by record id): '
               f"<b>{a.agreeing}</b> agree, agreement <b>{a.agreement:.1%}</b> (95% interval {a.low:.1%} to "
               f"{a.high:.1%}); status <b>{_e(a.status)}</b>{failed}. The audit took {share} of the compute "
               f"({a.macs:.3g} multiply-adds).</p>")

    def rows(items):
        out_rows = []
        for key, n, k in items[:MAX_TABLE_ROWS]:
            lo, hi = clopper_pearson(k, n)
            out_rows.append([key, n, k, f"{k / n:.1%}", f"{lo:.1%} to {hi:.1%}"])
        return out_rows

    head = ["audited", "agreeing", "agreement", "95% interval"]
    out.append(_table(["exit layer", *head], rows(a.per_layer), {0, 1, 2, 3}))
    out.append(_table(["full-depth label", *head], rows(a.per_label), {1, 2, 3}))
    out.append(_more(len(a.per_label), MAX_TABLE_ROWS, "labels left out of the table"))
    return "".join(out)


def build_report_html(predictions: list[dict], dead_letters: list[dict], exit_stats: list[dict],
                      manifest: dict | None = None, generated_at: str | None = None) -> str:
    """The report page for one run, from plain rows (dicts keyed like the Parquet columns)."""
    return render_report(summarize_rows(predictions, dead_letters, exit_stats, manifest), generated_at)


def render_report(s: RunSummary, generated_at: str | None = None) -> str:
    """The report page for one run's summary."""
    generated_at = generated_at or datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    run = ", ".join(s.run_ids) or "unknown"
    part: list[str] = []
    add = part.append

    add(f"<h1>epee run report</h1><p class=sub>run <b>{_e(run)}</b> &middot; model <b>{_e(', '.join(s.model_ids) or 'unknown')}</b>"
        f" &middot; task <b>{_e(', '.join(s.tasks) or 'unknown')}</b></p>")

    # Summary
    cards = [("records in", f"{s.records_in}"), ("predictions", f"{s.predictions}"), ("dead letters", f"{s.dead_letters}"),
             (f"mean exit layer (of {s.num_layers})" if s.num_layers else "mean exit layer", _fmt(s.mean_exit_layer)),
             ("layer speedup", _fmt(s.layer_speedup, suffix="x")),
             ("records / s", _fmt(s.records_per_second, ".1f"))]
    add('<h2 id="summary">Summary</h2><div class=cards>'
        + "".join(f'<div class=card><div class=v>{_e(v)}</div><div class=k>{_e(k)}</div></div>' for k, v in cards)
        + "</div>")
    if not s.predictions:
        add('<p class="empty" id="no-predictions">No predictions in this run'
            + (f": all {s.dead_letters} records became dead letters." if s.dead_letters else
               ": the outputs hold no predictions and no dead letters.") + "</p>")
    mark = {True: '<span class=ok>ok</span>', False: '<span class=bad>MISMATCH</span>', None: '<span class=na>not checked</span>'}
    add("<table><tbody>" + "".join(f"<tr><td>{mark[c.ok]}</td><td>{_e(c.name)}</td><td>{_e(c.detail)}</td></tr>"
                                   for c in s.checks) + "</tbody></table>")

    # Exit layers
    add('<h2 id="exit-layers">Exit layers</h2>')
    if s.predictions:
        add(f"<p>Mean exit layer <b>{_fmt(s.mean_exit_layer)}</b> of {s.num_layers}: layer speedup "
            f"<b>{_fmt(s.layer_speedup, suffix='x')}</b> (layers run at full depth / layers run).</p>")
        if s.macs is not None:
            from epee.flops import savings

            sv = savings(*s.macs)
            add(f'<p id="macs">Multiply-adds: <b>{s.macs[0]:.3g}</b> run, against {s.macs[2]:.3g} for dense full depth: '
                f'<b>{sv["saved"]:.1%}</b> saved, {sv["saved_by_exit"]:.1%} by early exit and '
                f'{sv["saved_by_sparsity"]:.1%} by weight sparsity (counted as hardware that skips zero weights would '
                "run them; on a CPU, sparsity below about 90% saves no time).</p>")
        add(_img(plot_exit_layers(s.exits_per_layer), "exit-layer histogram"))
        add(_table(["exit layer", "records", "share"],
                   [[i + 1, c, f"{c / s.predictions:.1%}"] for i, c in enumerate(s.exits_per_layer)], {0, 1, 2}))
    else:
        add('<p class="empty">No predictions in this run: no exit layers to show.</p>')

    if s.audit is not None:
        add(_audit_section(s.audit))

    # Per label
    add('<h2 id="labels">Per label</h2>')
    if s.labels:
        add(_table(["label", "count", "mean exit layer", "speedup"],
                   [[r.label, r.count, f"{r.mean_exit_layer:.2f}", f"{r.speedup:.2f}x"] for r in s.labels[:MAX_TABLE_ROWS]],
                   {1, 2, 3}))
        add(_more(len(s.labels), MAX_TABLE_ROWS, "labels (the least frequent) left out of the table"))
        add(_img(plot_labels(s.labels, s.num_layers), "mean exit layer per label"))
        add(_more(len(s.labels), MAX_CHART_BARS, "labels (the least frequent) left out of the chart"))
    else:
        add('<p class="empty">No predictions in this run: no labels to show.</p>')

    # Exit reasons
    add('<h2 id="exit-reasons">Exit reasons</h2>')
    if s.exit_reasons:
        add(_table(["reason", "records", "share"], [[k, c, f"{c / s.predictions:.1%}"] for k, c in s.exit_reasons], {1, 2}))
    else:
        add('<p class="empty">No predictions in this run: no exit reasons to show.</p>')

    # Scores
    add('<h2 id="scores">Score distribution</h2>')
    scored = sum(s.score_bins)
    if scored:
        below = sum(s.score_bins[: len(s.score_bins) // 2])
        add(f"<p>{scored} scores; median {_fmt(score_median(s.score_bins), '.3f')} (to within "
            f"{1 / len(s.score_bins):g}); {below} ({below / scored:.1%}) below 0.5.</p>")
        add(_img(plot_scores(s.score_bins), "score histogram"))
    else:
        add('<p class="empty">No predictions in this run: no scores to show.</p>')

    # Dead letters
    add('<h2 id="dead-letters">Dead letters</h2>')
    if s.dead_by_reason:
        add(_table(["stage", "error type", "count"], [list(r) for r in s.dead_by_reason[:MAX_TABLE_ROWS]], {2}))
        add(_more(len(s.dead_by_reason), MAX_TABLE_ROWS, "reasons (the least frequent) left out of the table"))
        add(_img(plot_dead_letters(s.dead_by_reason), "dead letters by stage and error type"))
        add(_more(len(s.dead_by_reason), MAX_CHART_BARS, "reasons (the least frequent) left out of the chart"))
    else:
        add('<p class="empty">No dead letters: every record became a prediction.</p>')

    # Throughput
    add('<h2 id="throughput">Throughput</h2>')
    if s.records_per_second is not None:
        add(f"<p><b>{s.records_per_second:.1f} records/s</b>: {s.records_in} records in {s.wall_seconds:.2f} s "
            f"(wall time from {_e(s.wall_source)}).</p>")
    else:
        add(f'<p class="empty">Wall time {_e(s.wall_source)}: throughput unknown.</p>')
    if s.timings:
        add(_table(["timing", "seconds"], [[k, f"{v:.2f}"] for k, v in s.timings], {1}))

    add(f"<footer>Generated {_e(generated_at)} by transforms/report.py from the Parquet outputs of the run. "
        "Shows counts, labels, scores and error types only: no note text, tag values or record-level messages.</footer>")
    title = f"epee run report: {run}"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
            f"<body><main>{''.join(part)}</main></body></html>\n")


# -- files -----------------------------------------------------------------------------------------
def iter_rows(run_dir: str, name: str, columns: tuple[str, ...], batch_size: int = 8192) -> Iterator[dict]:
    """Rows of ``{run_dir}/{name}-*.parquet``, only ``columns`` (those the file has), read
    ``batch_size`` rows at a time: never a whole table in memory."""
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    for meta in FileSystems.match([f"{run_dir.rstrip('/')}/{name}-*.parquet"])[0].metadata_list:
        with FileSystems.open(meta.path) as fh:
            pf = pq.ParquetFile(fh)
            present = [c for c in columns if c in pf.schema_arrow.names]
            for batch in pf.iter_batches(batch_size=batch_size, columns=present):
                yield from batch.to_pylist()


def read_summary(run_dir: str, manifest: dict | None = None) -> RunSummary:
    """The summary of the run whose files are in ``run_dir``, read batch by batch."""
    return summarize_rows(iter_rows(run_dir, "predictions", PREDICTION_COLUMNS),
                          iter_rows(run_dir, "dead_letters", DEAD_LETTER_COLUMNS),
                          iter_rows(run_dir, "exit_stats", EXIT_STATS_COLUMNS), manifest)


def write_report(run_dir: str, manifest: dict | None = None) -> str:
    """Write ``{run_dir}/report.html`` for the run whose files are in ``run_dir``; returns its path."""
    from apache_beam.io.filesystems import FileSystems

    page = render_report(read_summary(run_dir, manifest))
    path = f"{run_dir.rstrip('/')}/{REPORT_NAME}"
    with FileSystems.create(path, mime_type="text/html") as fh:
        fh.write(page.encode("utf-8"))
    return path
