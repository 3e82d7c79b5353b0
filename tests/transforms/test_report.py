"""The HTML run report: numbers match the Parquet outputs, the page is self-contained and escaped,
and nothing but counts, labels, scores and error types reaches it."""

from __future__ import annotations

import base64
import html
import io
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from transforms.records import (
    DEAD_LETTER_SCHEMA, EXIT_STATS_SCHEMA, PREDICTION_SCHEMA, DeadLetter, ExitStats, PredictionRecord,
)
from transforms.report import (
    FINE_SCORE_BINS, build_report_html, iter_rows, read_summary, score_median, summarize_rows, write_report,
)

ROOT = Path(__file__).resolve().parents[2]
RENDER = ROOT / "scripts" / "render_report.py"
MARKER = "PLANTED-7f3a-patient-text"
RUN = "run-1"


def pred(label: str | None, layer: int, score: float = 0.9, num_layers: int = 4, reason: str = "entropy",
         task: str = "sequence", model_id: str = "m@1", run_id: str = RUN, event_spans: list | None = None) -> dict:
    return PredictionRecord(
        record_id=f"r{layer}", source_uri=f"file:///notes/{MARKER}.jsonl", task=task, label=label, score=score,
        probabilities=[score, 1 - score], label_names=["a", "b"], exit_layer=layer, num_layers=num_layers,
        exit_reason=reason, entropy=0.1, windows=1, model_id=model_id, run_id=run_id, event_spans=event_spans or [],
    ).to_row()


def dead(stage: str, error_type: str, run_id: str = RUN) -> dict:
    return DeadLetter(source_uri=f"file:///notes/{MARKER}.jsonl", record_id=MARKER, stage=stage, error_type=error_type,
                      message=f"cannot parse {MARKER}", run_id=run_id).to_row()


def stats(records: int, num_layers: int = 4, wall: float = 2.0, model_id: str = "m@1") -> dict:
    return ExitStats(run_id=RUN, model_id=model_id, task="sequence", records=records, num_layers=num_layers,
                     exits_per_layer=[0] * num_layers, mean_exit_layer=0.0, layer_speedup=0.0, label_counts=[],
                     exit_reason_counts=[], wall_seconds=wall).to_row()


def write_outputs(out: Path, predictions: list[dict], dead_letters: list[dict], exit_stats: list[dict]) -> str:
    """The three Parquet files a run leaves, with the real schemas (empty files included, as Beam writes them)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, rows, schema in (("predictions", predictions, PREDICTION_SCHEMA),
                               ("dead_letters", dead_letters, DEAD_LETTER_SCHEMA),
                               ("exit_stats", exit_stats, EXIT_STATS_SCHEMA)):
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), out / f"{name}-00000-of-00001.parquet")
    return str(out)


class Page(HTMLParser):
    """Tables (as lists of rows of cell text), image sources and section ids of a report page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self.sections: list[str] = []
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(a["src"])
        elif tag == "h2":
            self.sections.append(a.get("id"))

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def table(self, first_header: str) -> list[list[str]]:
        """Body rows of the table whose first header cell is ``first_header``."""
        (found,) = [t for t in self.tables if t and t[0] and t[0][0] == first_header]
        return found[1:]


@pytest.fixture
def run_dir(tmp_path):
    predictions = [pred("a", 1, 0.95), pred("a", 1, 0.85), pred("a", 2, 0.45), pred("b", 4, 0.75), pred("b", 4, 0.65)]
    dead_letters = [dead("read", "malformed_json"), dead("read", "malformed_json"), dead("decode", "not_dicom")]
    return write_outputs(tmp_path / "out", predictions, dead_letters, [stats(records=5, wall=2.0)])


def test_write_report_numbers_match_the_outputs(run_dir):
    path = write_report(run_dir)
    assert path == f"{run_dir}/report.html"
    text = Path(path).read_text(encoding="utf-8")
    page = Page(text)
    assert page.sections == ["summary", "exit-layers", "labels", "exit-reasons", "scores", "dead-letters", "throughput"]
    assert "run-1" in text and "m@1" in text and "sequence" in text
    # records in = 5 predictions + 3 dead letters; mean exit layer (1+1+2+4+4)/5 = 2.40 of 4 -> 1.67x
    assert "<div class=v>8</div><div class=k>records in</div>" in text
    assert "<div class=v>3</div><div class=k>dead letters</div>" in text
    assert "<div class=v>2.40</div><div class=k>mean exit layer (of 4)</div>" in text
    assert "Mean exit layer <b>2.40</b> of 4" in text and "<div class=v>1.67x</div>" in text
    assert page.table("exit layer") == [["1", "2", "40.0%"], ["2", "1", "20.0%"], ["3", "0", "0.0%"], ["4", "2", "40.0%"]]
    assert page.table("label") == [["a", "3", "1.33", "3.00x"], ["b", "2", "4.00", "1.00x"]]
    assert page.table("reason") == [["entropy", "5", "100.0%"]]
    assert page.table("stage") == [["read", "malformed_json", "2"], ["decode", "not_dicom", "1"]]
    assert "5 scores; median 0.750 (to within 0.001); 1 (20.0%) below 0.5" in text
    assert "4.0 records/s" in text  # 8 records over the exit statistics' 2.0 s
    checks = {row[1]: row[0] for row in page.tables[0]}  # the first table: checks (mark, name, detail)
    assert checks["exit statistics count every prediction"] == "ok"
    assert checks["records in = predictions + dead letters"] == "not checked"  # no manifest: no independent count


def test_page_is_self_contained_with_embedded_pngs(run_dir):
    text = Path(write_report(run_dir)).read_text(encoding="utf-8")
    page = Page(text)
    assert len(page.images) == 4  # exit layers, labels, scores, dead letters
    for src in page.images:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        png = base64.b64decode(src[len(prefix):], validate=True)
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        with Image.open(io.BytesIO(png)) as im:
            im.verify()
            assert im.size[0] > 300 and im.size[1] > 80
    lowered = text.lower()
    for forbidden in ("http://", "https://", "<script", "url(", "@import", "<link", "file:"):
        assert forbidden not in lowered


def test_strings_from_the_data_are_escaped():
    label = '<script>alert("x")</script> & $\\frac{$'  # also not valid mathtext: the chart must not choke on it
    model_id = "<m&d>"
    text = build_report_html([pred(label, 1, model_id=model_id), pred("plain", 2, model_id=model_id)],
                             [dead("read", "<bad&type>")], [])
    assert "<script" not in text and "<m&d>" not in text and "<bad&type>" not in text
    assert html.escape(label, quote=True) in text
    assert html.escape(model_id) in text and html.escape("<bad&type>") in text
    assert [r[0] for r in Page(text).table("label")] == [label, "plain"]  # unescaped back by the parser: same label


def test_planted_marker_in_dead_letters_and_uris_never_reaches_the_page(tmp_path):
    out = write_outputs(tmp_path / "out", [pred("a", 1)], [dead("read", "malformed_json")], [stats(1)])
    text = Path(write_report(out)).read_text(encoding="utf-8")
    assert "malformed_json" in text
    assert MARKER not in text
    assert "cannot parse" not in text  # no per-record messages at all, only counts


def test_only_dead_letters_says_there_were_no_predictions(tmp_path):
    # what a run whose every record failed leaves: empty predictions file, exit statistics of 0 records
    out = write_outputs(tmp_path / "out", [], [dead("read", "invalid_utf8"), dead("read", "empty_note")],
                        [stats(records=0, num_layers=6, wall=1.0)])
    text = Path(write_report(out)).read_text(encoding="utf-8")
    page = Page(text)
    assert "No predictions in this run: all 2 records became dead letters." in text
    assert page.table("stage") == [["read", "empty_note", "1"], ["read", "invalid_utf8", "1"]]
    assert len(page.images) == 1  # the dead-letter chart; no empty exit-layer or score plots
    assert "2.0 records/s" in text


def test_no_outputs_at_all_still_gives_a_valid_page(tmp_path):
    out = tmp_path / "nothing"
    text = Path(write_report(str(out))).read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert "No predictions in this run: the outputs hold no predictions and no dead letters." in text
    assert "No dead letters" in text and Page(text).images == []


def test_manifest_timings_and_independent_count():
    rows = [pred("a", 1), pred("a", 3)]
    manifest = {"run_id": "ignored-when-rows-have-one", "records_in": 4,
                "timings": {"wall_seconds": 1.5, "read_seconds": 0.25, "note": "not a number"}}
    text = build_report_html(rows, [dead("read", "empty_note")], [stats(2, wall=9.0)], manifest)
    page = Page(text)
    checks = {row[1]: row[0] for row in page.tables[0]}
    assert checks["records in = predictions + dead letters"] == "MISMATCH"  # 4 read, 3 written
    assert "2.0 records/s" in text and "manifest timings" in text  # 3 records / 1.5 s; the manifest wins over 9.0 s
    assert page.table("timing") == [["wall_seconds", "1.50"], ["read_seconds", "0.25"]]
    assert "ignored-when-rows-have-one" not in text

    ok = build_report_html(rows, [dead("read", "empty_note")], [], {"counts": {"records_in": 3}})
    assert {row[1]: row[0] for row in Page(ok).tables[0]}["records in = predictions + dead letters"] == "ok"


def test_many_labels_are_cut_to_a_readable_table_and_say_so():
    rows = [pred(f"l{i:02d}", 1) for i in range(60) for _ in range(1 + (i < 5))]  # l00-l04 twice: most frequent
    text = build_report_html(rows, [], [])
    page = Page(text)
    shown = [r[0] for r in page.table("label")]
    assert len(shown) == 50 and shown[:5] == ["l00", "l01", "l02", "l03", "l04"] and "l59" not in shown
    assert "10 more labels (the least frequent) left out of the table." in text
    assert "30 more labels (the least frequent) left out of the chart." in text


def test_summary_counts_event_records_like_exit_stats():
    s = summarize_rows([pred(None, 2, task="token", event_spans=[{"type": "drug", "start": 0, "end": 3}]),
                        pred(None, 4, task="token"), pred(None, 3, task="token")], [], [])
    assert [(r.label, r.count, r.mean_exit_layer) for r in s.labels] == [("no_event", 2, 3.5), ("events", 1, 2.0)]
    assert s.exits_per_layer == (0, 1, 1, 1) and s.mean_exit_layer == 3.0 and s.tasks == ("token",)


def test_render_script_fails_clearly_without_chromium(tmp_path, run_dir):
    report = write_report(run_dir)
    env = {k: v for k, v in os.environ.items() if k != "CHROMIUM"} | {"PATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(RENDER), report, "--out", str(tmp_path / "x.png")],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2
    assert "no Chromium found" in proc.stderr and "apt-get install -y chromium" in proc.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.skipif(not any(__import__("shutil").which(n) for n in ("chromium", "chromium-browser", "google-chrome")),
                    reason="no Chromium on PATH (CI has none); see scripts/render_report.py")
def test_report_renders_in_headless_chromium(tmp_path, run_dir):
    report = write_report(run_dir)
    png = tmp_path / "report.png"
    proc = subprocess.run([sys.executable, str(RENDER), report, "--out", str(png), "--width", "1000", "--height", "2400"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    with Image.open(png) as im:
        assert im.size == (1000, 2400)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 100  # text and charts, not a blank or error page


def test_multiply_adds_summed_and_split_by_cause():
    rows = [{**pred("a", 1), "macs": 10, "dense_exit_macs": 40, "dense_full_macs": 100},
            {**pred("b", 4), "macs": 30, "dense_exit_macs": 60, "dense_full_macs": 100}]
    s = summarize_rows(rows, [], [])
    assert s.macs == (40, 100, 200)
    text = build_report_html(rows, [], [])
    assert "80.0%</b> saved, 50.0% by early exit and 30.0% by weight sparsity" in text
    assert summarize_rows([pred("a", 1)], [], []).macs is None  # outputs written before MACs were counted
    assert 'id="macs"' not in build_report_html([pred("a", 1)], [], [])


def test_outputs_are_read_in_batches_and_summed_across_files(tmp_path):
    """The report reads the outputs a batch at a time (a run of millions of rows is never one table
    in memory); the figures are those of all rows of all shards."""
    out = tmp_path / "out"
    first = [pred("a", 1 + i % 4, 0.1 * (i % 10)) for i in range(23)]
    second = [pred("b", 2, 0.95) for _ in range(9)]
    write_outputs(out, first, [dead("read", "malformed_json")], [stats(records=32)])
    pq.write_table(pa.Table.from_pylist(second, schema=PREDICTION_SCHEMA), out / "predictions-00001-of-00002.parquet")
    got = list(iter_rows(str(out), "predictions", ("label", "exit_layer", "record_id_not_a_column"), batch_size=4))
    assert len(got) == 32 and set(got[0]) == {"label", "exit_layer"}
    assert read_summary(str(out)) == summarize_rows(first + second, [dead("read", "malformed_json")], [stats(records=32)])
    s = read_summary(str(out))
    assert s.predictions == 32 and (s.labels[1].label, s.labels[1].count, s.labels[1].mean_exit_layer) == ("b", 9, 2.0) and s.checks[1].ok is True


def test_scores_are_kept_as_a_fine_histogram():
    s = summarize_rows([pred("a", 1, x) for x in (0.0, 0.2, 0.4999, 0.5, 0.9999, 1.0)], [], [])
    assert len(s.score_bins) == FINE_SCORE_BINS and sum(s.score_bins) == 6
    assert s.score_bins[0] == 1 and s.score_bins[499] == 1 and s.score_bins[500] == 1 and s.score_bins[-1] == 2
    assert score_median(s.score_bins) == 0.5  # upper median of six: the fourth smallest, 0.5
    assert score_median((0,) * FINE_SCORE_BINS) is None
    assert "6 scores; median 0.500 (to within 0.001); 3 (50.0%) below 0.5" in build_report_html(
        [pred("a", 1, x) for x in (0.0, 0.2, 0.4999, 0.5, 0.9999, 1.0)], [], [])
