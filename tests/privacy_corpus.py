"""Inputs for the privacy test: every field of every input kind carries a marker, and between them
they trigger every dead-letter ``error_type`` that the README documents.

Two kinds of marker, told apart by their prefix:

* ``ZQXC``: content (note text, labels, other columns, entity fields, DICOM tag values, private
  tags, file bytes). It must never appear in anything a run writes.
* ``ZQXI``: identifiers (the id field, and the folder and file names: archives name folders after
  patients and MRNs). Without ``--pseudonymize_ids`` they are written as ids and URIs by design;
  with it, never.

Faults no input can cause portably (a decoder that hangs or dies, a preprocessor or a model that
raises) are injected by :func:`faulty_decode` and by the test's monkeypatches; the exceptions they
raise quote the markers, as a parser's would.
"""

from __future__ import annotations

import io
import json
import os
import random
import time
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

IDENT = "ZQXI"
CONTENT = "ZQXC"
UID_MARK = "31415926"  # UIDs hold digits only
# records whose id holds these words fail in the injected preprocessor / model
PREPARE_FAILS, INFERENCE_FAILS = "PREPFAIL", "INFERFAIL"


class Markers:
    """Hands out unique markers and remembers them."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.ident: list[str] = []

    def c(self) -> str:
        m = f"{CONTENT}{len(self.content):04d}QZ"
        self.content.append(m)
        return m

    def i(self) -> str:
        m = f"{IDENT}{len(self.ident):04d}QZ"
        self.ident.append(m)
        return m


def archive_dir(root: Path, marks: Markers) -> Path:
    """A folder named as archives name them: after the patient and the MRN."""
    d = root / f"DOE^JOHN_{marks.i()}" / f"MRN{marks.i()}"
    d.mkdir(parents=True)
    return d


# -- notes, relations, events ----------------------------------------------------------------------
def _good_text(task: str, marks: Markers) -> dict:
    text = f"patient {marks.c()} seen with fever and cough, given {marks.c()} for pain"
    row = {"text": text, "label": marks.c(), "extra": marks.c(), "nested": {"k": marks.c()}}
    if task == "relation":
        s = text.index("fever")
        t = text.index("cough")
        row.update(e1_start=s, e1_end=s + 5, e2_start=t, e2_end=t + 5)
    return row


def note_files(d: Path, task: str, marks: Markers, max_note_bytes: int, max_file_bytes: int) -> dict:
    """Writes the note files; returns {record id or file: expected error_type} for the bad ones,
    and under key ``"good"`` the ids that must be predicted."""
    expected: dict = {}
    good: list[str] = []

    def rid(tag: str = "") -> str:
        return f"{tag}{marks.i()}"

    lines: list[bytes] = []
    for _ in range(3):
        row = {"id": rid(), **_good_text(task, marks)}
        good.append(row["id"])
        lines.append(json.dumps(row).encode())
    fails = {"id": rid(PREPARE_FAILS), **_good_text(task, marks)}
    expected[fails["id"]] = "prepare_error"
    lines.append(json.dumps(fails).encode())
    fails = {"id": rid(INFERENCE_FAILS), **_good_text(task, marks)}
    expected[fails["id"]] = "inference_error"
    lines.append(json.dumps(fails).encode())
    r = rid()
    lines.append(f'{{"id": "{r}", "text": "{marks.c()} caf'.encode() + b"\xe9" + b'"}')
    expected["line:invalid_utf8"] = "invalid_utf8"
    r = rid()
    lines.append(json.dumps({"id": r, "text": "   ", "label": marks.c()}).encode())
    expected[r] = "empty_note"
    r = rid()
    lines.append(json.dumps({"id": r, "text": f"{marks.c()}\u0000\u0001" * 20}).encode())
    expected[r] = "binary_content"
    r = rid()
    lines.append(json.dumps({"id": r, "text": f"{marks.c()} " * (max_note_bytes // 8)}).encode())
    expected[r] = "note_too_large"
    lines.append(f'{{"id": "{rid()}", "text": "broken {marks.c()}'.encode())
    expected["line:malformed_json"] = "malformed_json"
    r = rid()
    lines.append(json.dumps({"id": r, "body": marks.c()}).encode())
    expected[r] = "missing_field"
    r = rid()
    lines.append(json.dumps({"id": r, "text": [marks.c(), marks.c()]}).encode())
    expected[r] = "bad_field_type"
    if task == "relation":
        r = rid()
        lines.append(json.dumps({"id": r, "text": f"{marks.c()} and {marks.c()}", "e1_start": marks.c(),
                                 "e1_end": 3, "e2_start": 5, "e2_end": 9}).encode())
        expected[r] = "bad_entities"
        r = rid()
        lines.append(json.dumps({"id": r, "text": f"no markers in {marks.c()}"}).encode())
        expected[r] = "bad_entities"
    (d / f"notes_{marks.i()}.jsonl").write_bytes(b"\n".join(lines) + b"\n")

    # CSV: a good row, a malformed row, a row with bytes that are not UTF-8
    csv_path = d / f"rows_{marks.i()}.csv"
    g, bad, latin = rid(), rid(), rid()
    good.append(g)
    ok = _good_text(task, marks)
    cols = ["id", "text", "label"] + (["e1_start", "e1_end", "e2_start", "e2_end"] if task == "relation" else [])
    cells = [g, ok["text"], ok["label"]] + ([str(ok[k]) for k in cols[3:]] if task == "relation" else [])
    csv_bytes = (",".join(cols) + "\n" + ",".join(f'"{c}"' for c in cells) + "\n"
                 + f'{bad},"{marks.c()}","{marks.c()}"' + ",x" * (len(cols) + 1) + "\n").encode()
    csv_bytes += f'{latin},"{marks.c()} caf'.encode() + b"\xe9" + ("\"" + ",x" * (len(cols) - 2) + "\n").encode()
    csv_path.write_bytes(csv_bytes)
    expected["csv:malformed_csv_row"] = "malformed_csv_row"
    expected[latin] = "invalid_utf8"

    # a CSV over --max_file_bytes
    big = d / f"big_{marks.i()}.csv"
    big.write_text("id,text\n" + "".join(f"{rid()},{marks.c()} cough\n" for _ in range(3))
                   + f"pad,{'x' * (max_file_bytes + 10)}\n")
    expected[f"file:{big.name}"] = "file_too_large"
    # not a Parquet file, a file of no known type, a plain-text note with a bad byte
    (d / f"table_{marks.i()}.parquet").write_bytes(f"PAR1 {marks.c()} PAR1".encode())
    expected["file:table"] = "malformed_parquet"
    (d / f"scan_{marks.i()}.xyz").write_text(marks.c())
    expected["file:scan"] = "unsupported_format"
    # a Parquet table with a good row and a text column of the wrong type in another file
    t = _good_text(task, marks)
    g = rid()
    good.append(g)
    cols = {"id": [g], "text": [t["text"]], "label": [t["label"]], "extra": [marks.c()]}
    if task == "relation":
        cols.update({k: [t[k]] for k in ("e1_start", "e1_end", "e2_start", "e2_end")})
    pq.write_table(pa.table(cols), d / f"table_ok_{marks.i()}.parquet")
    r = rid()
    pq.write_table(pa.table({"id": [r], "text": [12345], "label": [marks.c()]}), d / f"typed_{marks.i()}.parquet")
    expected[r] = "bad_field_type"
    # a dangling symbolic link: the matched name cannot be read
    os.symlink(d / f"gone_{marks.i()}.jsonl", d / f"link_{marks.i()}.jsonl")
    expected["file:link"] = "read_error"
    # a file of whitespace only; a gzip stream of marked notes cut short; a good gzipped file
    (d / f"blank_{marks.i()}.jsonl").write_bytes(b" \n\t\n")
    expected["file:blank"] = "empty_file"
    import gzip

    rows = b"".join(json.dumps({"id": rid(), **_good_text(task, marks)}).encode() + b"\n" for _ in range(50))
    packed = gzip.compress(rows)
    (d / f"cut_{marks.i()}.jsonl.gz").write_bytes(packed[: len(packed) // 2])
    expected["file:cut_gz"] = "bad_compression"
    g = rid()
    good.append(g)
    (d / f"packed_{marks.i()}.jsonl.gz").write_bytes(gzip.compress(json.dumps({"id": g, **_good_text(task, marks)}).encode()))
    expected["good"] = good
    return expected


# -- DICOM ----------------------------------------------------------------------------------------
def _basic_profile() -> tuple[str, ...]:
    from tests.pipelines.test_privacy import BASIC_PROFILE

    return BASIC_PROFILE


def plant_dicom(ds, marks: Markers) -> None:
    """A marker in every PS3.15 basic-profile attribute and in private tags; dates and times get
    values that are not valid DA/TM, so that pydicom's validation warnings (which quote) fire."""
    from pydicom.datadict import dictionary_VR

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kw in _basic_profile():
            vr = dictionary_VR(kw)
            m = marks.c()
            value = f"2.25.{UID_MARK}{len(marks.content):05d}" if vr == "UI" else m
            setattr(ds, kw, value)
        block = ds.private_block(0x0009, "ZQXC PRIVATE CREATOR", create=True)
        block.add_new(0x01, "LO", marks.c())
        block.add_new(0x02, "UT", marks.c() * 3)
        block.add_new(0x03, "OB", marks.c().encode())
    if getattr(ds, "file_meta", None) is not None:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def _save(ds) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def dicom_files(d: Path, marks: Markers, max_file_bytes: int) -> dict:
    """Marked DICOM files for every DICOM ``error_type``; {file name prefix: error_type}, and
    under ``"good"`` the good files' name prefixes."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.encaps import encapsulate

    from tests.hostile_corpus import deep_sequence

    def ds_of(name: str = "CT_small.dcm"):
        ds = pydicom.dcmread(get_testdata_file(name))
        plant_dicom(ds, marks)
        return ds

    def change(**kw):
        def f(ds):
            for k, v in kw.items():
                if v is None:
                    delattr(ds, k)
                else:
                    setattr(ds, k, v)
        return f

    def syntax(uid):
        def f(ds):
            ds.file_meta.TransferSyntaxUID = uid
            ds.PixelData = encapsulate([ds.PixelData])
        return f

    cases = {  # name prefix: (source file, change of the dataset, change of the bytes, error_type)
        "good_ct": ("CT_small.dcm", None, None, None),
        "good_rgb": ("SC_rgb_rle.dcm", None, None, None),
        "good_mr": ("MR_small.dcm", None, None, None),
        f"good_{PREPARE_FAILS}": ("CT_small.dcm", None, None, "prepare_error"),
        f"good_{INFERENCE_FAILS}": ("CT_small.dcm", None, None, "inference_error"),
        "hang": ("CT_small.dcm", change(ImageComments=f"HANG-ME {marks.c()}"), None, "decode_timeout"),
        "crash": ("CT_small.dcm", change(ImageComments=f"CRASH-ME {marks.c()}"), None, "decoder_crashed"),
        "oom": ("CT_small.dcm", change(ImageComments=f"OOM-ME {marks.c()}"), None, "out_of_memory"),
        "oversized": ("CT_small.dcm", None, lambda b: b + marks.c().encode() * (max_file_bytes // 8), "file_too_large"),
        "junk": (None, None, lambda b: marks.c().encode() * 300, "not_dicom"),
        "bad_meta": ("CT_small.dcm", None, lambda b: b[:153] + marks.c().encode(), "parse_error"),
        "cut_header": ("CT_small.dcm", None, lambda b: _cut_inside_value(b, marks.content[-3].encode()), "truncated_file"),
        "nested": ("CT_small.dcm", None, lambda b: _insert_before_pixels(b, deep_sequence(20000)), "nesting_too_deep"),
        "report": ("CT_small.dcm", change(SOPClassUID="1.2.840.10008.5.1.4.1.1.88.22", PixelData=None), None,
                   "non_image_sop_class"),
        "no_pixels": ("MR_small.dcm", change(PixelData=None), None, "no_pixel_data"),
        "huge": ("MR_small.dcm", change(Rows=60000, Columns=60000), None, "pixel_budget_exceeded"),
        "mpeg": ("CT_small.dcm", syntax("1.2.840.10008.1.2.4.100"), None, "unsupported_transfer_syntax"),
        "private_syntax": ("CT_small.dcm", syntax(f"1.2.{UID_MARK}.99"), None, "unsupported_transfer_syntax"),
        "photometric": ("CT_small.dcm", change(PhotometricInterpretation=marks.c()[:16]), None,
                        "unsupported_photometric"),
        "no_bits": ("CT_small.dcm", change(BitsStored=None), None, "missing_image_attribute"),
        "zero_frames": ("CT_small.dcm", change(NumberOfFrames=0), None, "bad_image_attribute"),
        "cut_pixels": ("CT_small.dcm", None, lambda b: b[:-5000], "truncated_pixel_data"),
        "bad_jpeg": ("JPEG-lossy.dcm", None, lambda b: _noise_in_pixels(b, 0.3), "decode_error"),
        "rle_panic": ("MR_small_RLE.dcm", None, lambda b: _noise_in_pixels(b, 0.3), "decode_error"),
    }
    expected: dict = {"good": []}
    base_ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    for prefix, (src, ds_change, bytes_change, reason) in cases.items():
        if src is None:
            data = bytes_change(base_ct)
        else:
            ds = ds_of(src)
            if ds_change is not None:
                ds_change(ds)
            data = _save(ds)
            if bytes_change is not None:
                data = bytes_change(data)
        (d / f"{prefix}_{marks.i()}.dcm").write_bytes(data)
        if reason is None:
            expected["good"].append(prefix)
        else:
            expected[prefix] = reason
    os.symlink(d / f"gone_{marks.i()}.dcm", d / f"link_{marks.i()}.dcm")  # matched, but cannot be read
    expected["link"] = "read_error"
    import gzip  # a gzipped DICOM cut short, and a good one
    packed = gzip.compress(_save(ds_of()))
    (d / f"cut_gz_{marks.i()}.dcm.gz").write_bytes(packed[: len(packed) // 2])
    expected["cut_gz"] = "bad_compression"
    (d / f"good_gz_{marks.i()}.dcm.gz").write_bytes(packed)
    expected["good"].append("good_gz")
    return expected


def _insert_before_pixels(data: bytes, chunk: bytes) -> bytes:
    at = data.find(b"\xe0\x7f\x10\x00")
    return data[:at] + chunk + data[at:]


def _noise_in_pixels(data: bytes, where: float) -> bytes:
    """200 bytes of noise at ``where`` (a fraction) of the pixel data: the header parses, the
    decoder fails (an RLE decoder in Rust panics on it: ``PanicException`` is no ``Exception``)."""
    at = data.find(b"\xe0\x7f\x10\x00")
    head = at + int((len(data) - at) * where)
    return data[:head] + bytes(random.Random(3).getrandbits(8) for _ in range(200)) + data[head + 200:]


def _cut_inside_value(data: bytes, marker: bytes) -> bytes:
    """The file cut in the middle of the value that holds ``marker``: its declared length runs past
    the end of the file."""
    at = data.find(marker)
    return data[:at + len(marker) // 2]


def faulty_decode(data: bytes, frame_policy: str, limits):
    """The decoder child's function for the privacy test: hangs on files holding ``HANG-ME``, dies
    on files holding ``CRASH-ME``, runs out of memory (with a message quoting the file) on files
    holding ``OOM-ME``, and decodes the others."""
    from transforms.decode_worker import decode_bytes

    if b"HANG-ME" in data:
        time.sleep(3600)
    if b"CRASH-ME" in data:
        os._exit(11)
    if b"OOM-ME" in data:
        at = data.find(b"OOM-ME")
        raise MemoryError(f"cannot allocate for {data[at:at + 40]!r}")
    return decode_bytes(data, frame_policy, limits)
