"""`epee calibrate --unlabeled` reads what the pipelines read (issue 33, item 1): each file once
(the manifest's SHA-256 is of the bytes parsed), DICOM and PNG archives one record per file with
unreadable files counted and never shown, image tables without labels, and s3:// archives on an
S3-compatible endpoint (moto's server on loopback)."""

import hashlib
import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from epee.workflows import CalibrationSpec, calibrate
from epee.workflows.data import DataFields, load, read_unlabeled
from tests.conftest import save_tiny_model_dir

SECRET = "SECRET^PATIENT"  # planted in a DICOM file's PatientName: must reach no log and no record


def dicom_bytes(pixels: np.ndarray) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = SECRET, "MRN-0042"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def image_archive(root, n: int = 12):
    """n DICOM and n PNG files of random pixels, one truncated DICOM, and a README that is skipped."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"scan{i:02d}.dcm").write_bytes(dicom_bytes(rng.integers(0, 4096, size=(20, 20))))
        (root / f"photo{i:02d}.png").write_bytes(png_bytes(rng.integers(0, 256, size=(20, 20))))
    (root / "broken.dcm").write_bytes(dicom_bytes(rng.integers(0, 4096, size=(20, 20)))[:300])
    (root / "README.md").write_text("not an image")
    return root


def test_each_file_is_read_once_and_hashed_as_read(tmp_path, monkeypatch):
    import epee.data
    import epee.data.tables

    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "a.jsonl").write_text("".join(json.dumps({"text": f"note {i}"}) + "\n" for i in range(5)))
    (archive / "b.csv").write_text("text\n" + "".join(f"row {i}\n" for i in range(4)))
    (archive / "c.txt").write_text("one\n\ntwo\r\nthree\n")
    opened = []
    real = epee.data.tables.open_uri

    def counting(uri, *args, **kwargs):
        opened.append(uri)
        return real(uri, *args, **kwargs)

    monkeypatch.setattr(epee.data, "open_uri", counting)
    monkeypatch.setattr(epee.data.tables, "open_uri", counting)
    read = read_unlabeled(str(archive), "sequence", DataFields().resolve(None))
    assert sorted(opened) == sorted({str(archive / n) for n in ("a.jsonl", "b.csv", "c.txt")})  # once each
    assert [f["records"] for f in read.files] == [5, 4, 3]
    for f in read.files:
        assert f["sha256"] == hashlib.sha256(open(f["uri"], "rb").read()).hexdigest()
    assert [ex.text for ex in read.examples[-3:]] == ["one", "two", "three"]


def test_dicom_and_png_archive_is_sampled_one_record_per_file_and_unreadable_files_are_counted(tmp_path, caplog):
    model_dir = save_tiny_model_dir(tmp_path / "model", "image")
    archive = image_archive(tmp_path / "archive")
    caplog.set_level(logging.DEBUG)
    rec = calibrate(str(model_dir), CalibrationSpec(unlabeled=str(archive), sample=20, epsilon=0.3, delta=0.2)).record
    assert rec["records_available"] == 24 and rec["sample_size"] == 20 and rec["skipped_unreadable"] == 1
    files = rec["manifest"]["files"]
    assert len(files) == 25 and not any(f["uri"].endswith("README.md") for f in files)
    assert {f["records"] for f in files if f["uri"].endswith("broken.dcm")} == {0}
    stored = (model_dir / "epee_config.json").read_text()
    assert SECRET not in stored and "MRN-0042" not in stored
    assert SECRET not in caplog.text and "MRN-0042" not in caplog.text
    # the record digest is of pixels: a DICOM file rewritten with new UIDs around the same pixels keeps it, a
    # PNG with other pixels changes it; the file digests follow the bytes
    def digests():
        r = calibrate(str(model_dir), CalibrationSpec(unlabeled=str(archive), sample=24, epsilon=0.3, delta=0.2)).record
        return r["manifest"]["records_sha256"], {f["uri"].rsplit("/", 1)[-1]: f["sha256"] for f in r["manifest"]["files"]}

    records, by_file = digests()
    assert digests() == (records, by_file)
    pixels = np.random.default_rng(0).integers(0, 4096, size=(20, 20))
    (archive / "scan00.dcm").write_bytes(dicom_bytes(pixels))  # scan00's pixels, as image_archive drew them
    same_pixels, rewritten = digests()
    assert same_pixels == records and rewritten["scan00.dcm"] != by_file["scan00.dcm"]
    (archive / "photo00.png").write_bytes(png_bytes(np.zeros((20, 20))))
    other_pixels, _ = digests()
    assert other_pixels != records


def test_image_table_without_a_label_column_is_read_unlabelled_and_refused_as_labelled_data(tmp_path):
    archive = image_archive(tmp_path / "imgs", n=3)
    table = archive / "index.csv"
    table.write_text("path\n" + "".join(f"photo{i:02d}.png\n" for i in range(3)))
    read = read_unlabeled(str(table), "image", DataFields().resolve(None))
    assert [ex.label for ex in read.examples] == [None, None, None]
    assert all(ex.image.shape == (20, 20) for ex in read.examples)
    with pytest.raises(ValueError, match=r"3 record\(s\) have no 'label' value \(first: id photo00.png\)"):
        load(str(table), "image", DataFields().resolve(None), None)


moto_server = pytest.importorskip("moto.server")


@pytest.fixture
def s3(monkeypatch):
    import boto3

    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    werkzeug = logging.getLogger("werkzeug")
    werkzeug.setLevel(logging.WARNING)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="archive")
        yield endpoint, client
    finally:
        server.stop()


def test_s3_archive_on_an_s3_compatible_endpoint(tmp_path, s3):
    endpoint, client = s3
    model_dir = save_tiny_model_dir(tmp_path / "model", "sequence")
    bodies = {}
    for part in ("2026-01", "2026-02"):
        body = "".join(json.dumps({"note_id": f"{part}-{i}", "text": f"fever cough {i}"}) + "\n" for i in range(15))
        bodies[f"s3://archive/notes/{part}.jsonl"] = body.encode()
        client.put_object(Bucket="archive", Key=f"notes/{part}.jsonl", Body=body.encode())
    client.put_object(Bucket="archive", Key="notes/other.csv", Body=b"text\nx\n")  # not matched by the glob
    spec = CalibrationSpec(unlabeled="s3://archive/notes/2026-*.jsonl", sample=30, epsilon=0.3, delta=0.2,
                           s3_endpoint_url=endpoint)
    rec = calibrate(str(model_dir), spec).record
    files = rec["manifest"]["files"]
    assert [f["uri"] for f in files] == sorted(bodies)
    assert [f["sha256"] for f in files] == [hashlib.sha256(bodies[u]).hexdigest() for u in sorted(bodies)]
    assert rec["records_available"] == 30 and rec["source"] == "s3://archive/notes/2026-*.jsonl"
