import json

import numpy as np
import pytest

from epee.data import (
    Example, load_ddi, load_examples, read_label_map, read_records, split_examples, strip_entity_markers, subsample,
)

ROWS = [{"id": "a", "text": "chest pain", "label": "cardio"}, {"id": "b", "text": "cough", "label": "resp"}]


@pytest.fixture(params=["jsonl", "csv", "parquet"])
def table(request, tmp_path):
    path = tmp_path / f"t.{request.param}"
    if request.param == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    elif request.param == "csv":
        path.write_text("id,text,label\n" + "\n".join(f'{r["id"]},"{r["text"]}",{r["label"]}' for r in ROWS) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(ROWS), path)
    return str(path)


class TestReadRecords:
    def test_every_format_reads_the_same_rows(self, table):
        assert read_records(table) == ROWS

    def test_bad_json_line_names_line_not_content(self, tmp_path):
        p = tmp_path / "bad.jsonl"
        p.write_text('{"text": "ok", "label": "x"}\n{"text": "SECRET NOTE\n')
        with pytest.raises(ValueError, match="line 2 is not valid JSON") as err:
            read_records(str(p))
        assert "SECRET" not in str(err.value)

    def test_unsupported_suffix(self, tmp_path):
        with pytest.raises(ValueError, match="unsupported file type"):
            read_records(str(tmp_path / "x.xlsx"))


class TestLoadExamples:
    def test_sequence_with_ids_and_label_map(self, table, tmp_path):
        names = tmp_path / "labels.csv"
        names.write_text("id,name\ncardio,Cardiology\n")
        exs = load_examples(table, "sequence", id_field="id", label_map=read_label_map(str(names)))
        assert [(e.id, e.label) for e in exs] == [("a", "Cardiology"), ("b", "resp")]

    def test_missing_field_is_named(self, table):
        with pytest.raises(ValueError, match="missing field 'note'"):
            load_examples(table, "sequence", text_field="note")

    def test_relation_offsets(self, tmp_path):
        p = tmp_path / "r.jsonl"
        p.write_text(json.dumps({"text": "aspirin raises warfarin levels", "label": "effect",
                                 "e1_start": 0, "e1_end": 7, "e2_start": 15, "e2_end": 23}) + "\n")
        (ex,) = load_examples(str(p), "relation")
        assert [ex.text[s:e] for s, e in ex.entities] == ["aspirin", "warfarin"]

    def test_relation_span_out_of_range(self, tmp_path):
        p = tmp_path / "r.jsonl"
        p.write_text(json.dumps({"text": "abc", "label": "x", "e1_start": 0, "e1_end": 1, "e2_start": 2, "e2_end": 9}) + "\n")
        with pytest.raises(ValueError, match=r"entity 2's span is empty, reversed or outside the text"):
            load_examples(str(p), "relation")

    def test_phee_layout(self, tmp_path):
        row = {"id": "1", "context": "Rash due to penicillin in a child.", "annotations": [{"events": [{
            "event_type": "Adverse_event", "Trigger": {"text": [["due"]], "start": [[5]]},
            "Effect": {"text": [["Rash"]], "start": [[0]]},
            "Treatment": {"text": [["penicillin"]], "start": [[12]], "Drug": {"text": [["penicillin"]], "start": [[12]]}},
            "Subject": {"text": [["a child"]], "start": [[26]], "Age": {"text": [["child"]], "start": [[28]]}}}]}]}
        p = tmp_path / "p.jsonl"
        p.write_text(json.dumps(row) + "\n")
        (ex,) = load_examples(str(p), "token")
        assert set(ex.spans) == {("Effect", 0, 4), ("Trigger.Adverse_event", 5, 8), ("Treatment", 12, 22), ("Subject", 26, 33)}

    def test_npz_images(self, tmp_path):
        p = tmp_path / "d.npz"
        np.savez(p, val_images=np.zeros((3, 4, 4), np.uint8), val_labels=np.array([[0], [1], [1]]))
        exs = load_examples(str(p), "image", split="val")
        assert [e.label for e in exs] == ["0", "1", "1"] and exs[0].image.shape == (4, 4)


class TestStripEntityMarkers:
    @pytest.mark.parametrize("marked", [
        "<< aspirin >> raises [[ warfarin ]] levels",
        "[E1]aspirin[/E1] raises [E2]warfarin[/E2] levels",
        "<e1>aspirin</e1> raises <e2>warfarin</e2> levels",
    ])
    def test_styles(self, marked):
        text, spans = strip_entity_markers(marked)
        assert [text[s:e] for s, e in spans] == ["aspirin", "warfarin"]

    def test_entity_two_first(self):
        text, ((s1, e1), (s2, e2)) = strip_entity_markers("[[ EGFR ]] is blocked by << gefitinib >>")
        assert text[s1:e1] == "gefitinib" and text[s2:e2] == "EGFR"

    def test_no_markers(self):
        with pytest.raises(ValueError, match="no entity markers"):
            strip_entity_markers("plain text")


DDI_XML = """<?xml version="1.0" encoding="UTF-8"?>
<document id="DDI-X.d1">
  <sentence id="DDI-X.d1.s0" text="Aspirin increases warfarin effect; see ketoconazole.">
    <entity id="DDI-X.d1.s0.e0" charOffset="0-6" type="drug" text="Aspirin"/>
    <entity id="DDI-X.d1.s0.e1" charOffset="18-25" type="drug" text="warfarin"/>
    <entity id="DDI-X.d1.s0.e2" charOffset="39-50" type="drug" text="ketoconazole"/>
    <pair id="DDI-X.d1.s0.p0" e1="DDI-X.d1.s0.e0" e2="DDI-X.d1.s0.e1" ddi="true" type="effect"/>
    <pair id="DDI-X.d1.s0.p1" e1="DDI-X.d1.s0.e0" e2="DDI-X.d1.s0.e2" ddi="false"/>
    <pair id="DDI-X.d1.s0.p2" e1="DDI-X.d1.s0.e1" e2="DDI-X.d1.s0.e2" ddi="true"/>
  </sentence>
</document>"""


def test_load_ddi(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d1.xml").write_text(DDI_XML)
    exs = load_ddi(str(tmp_path))
    assert [(e.label, e.group) for e in exs] == [("effect", "DDI-X.d1"), ("negative", "DDI-X.d1")]  # untyped true pair skipped
    assert [exs[0].text[s:e] for s, e in exs[0].entities] == ["Aspirin", "warfarin"]  # inclusive offsets


def test_split_is_deterministic_and_by_document():
    exs = [Example(id=f"{d}-{i}", text="t", label="x", group=f"doc{d}") for d in range(50) for i in range(3)]
    a_train, a_dev = split_examples(exs, 0.2, seed=1)
    b_train, b_dev = split_examples(exs, 0.2, seed=1)
    assert a_dev == b_dev and 3 <= len({e.group for e in a_dev}) <= 25
    assert not {e.group for e in a_dev} & {e.group for e in a_train}
    assert split_examples(exs, 0.2, seed=2)[1] != a_dev


def test_subsample_caps_negatives_then_total():
    exs = [Example(id=str(i), text="t", label="negative" if i % 5 else "effect") for i in range(100)]
    out = subsample(exs, None, 0, negative_label="negative", max_negative_ratio=1.0)
    assert sum(e.label == "effect" for e in out) == 20 and sum(e.label == "negative" for e in out) == 20
    assert len(subsample(exs, 30, 0)) == 30


def test_image_table_with_png_and_dicom_files(tmp_path):
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    (tmp_path / "img").mkdir()
    Image.fromarray(np.full((6, 5), 200, np.uint8), mode="L").save(tmp_path / "img" / "a.png")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 4, 3, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.arange(12, dtype=np.uint8).tobytes()
    ds.save_as(tmp_path / "img" / "b.dcm", enforce_file_format=True)
    (tmp_path / "labels.csv").write_text("path,label\nimg/a.png,normal\nimg/b.dcm,pneumonia\n")
    exs = load_examples(str(tmp_path / "labels.csv"), "image")
    assert [(e.id, e.label, e.image.shape) for e in exs] == [("img/a.png", "normal", (6, 5)), ("img/b.dcm", "pneumonia", (4, 3))]
    assert exs[1].image.ravel().tolist() == list(range(12))
