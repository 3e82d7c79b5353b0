"""A corpus of broken, huge and hostile inputs, generated on the spot (nothing of it is committed).

Each builder writes files into a directory and returns what must come out of a pipeline run:
``{record id or file path: expected dead-letter error_type}`` for the bad ones, and the ids of the
good ones that must be predicted. Used by the tests and by ``bench/hostile.py`` (peak memory).
"""

from __future__ import annotations

import io
import json
import os
import random
import time
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

GOOD_DICOM = ("CT_small.dcm", "MR_small.dcm", "SC_rgb_rle.dcm")  # decode with pydicom's bundled files


def _base(name: str = "CT_small.dcm") -> bytes:
    return Path(get_testdata_file(name)).read_bytes()


def _rewrite(name: str, **changes) -> bytes:
    ds = pydicom.dcmread(get_testdata_file(name))
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        elif keyword == "TransferSyntaxUID":
            from pydicom.encaps import encapsulate

            ds.file_meta.TransferSyntaxUID = value
            ds.PixelData = encapsulate([ds.PixelData])
        else:
            setattr(ds, keyword, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def deep_sequence(depth: int) -> bytes:
    """Undefined-length (0040,A730) ContentSequence items nested ``depth`` deep, explicit VR LE."""
    seq_open = b"\x40\x00\x30\xa7SQ\x00\x00\xff\xff\xff\xff"
    item_open = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    item_close = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
    seq_close = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    return (seq_open + item_open) * depth + (item_close + seq_close) * depth


def hostile_dicom(d: Path, max_file_bytes: int = 4 << 20) -> tuple[dict[str, str], list[str]]:
    """Bad DICOM files -> expected reasons (keys: file paths), and the good files' paths."""
    d.mkdir(parents=True, exist_ok=True)
    base = _base()
    pixel_at = base.find(b"\xe0\x7f\x10\x00")
    bad = {
        # header claims 65535 x 65535 x 1000 frames: refused from the header, nothing decoded
        "huge_header.dcm": (_rewrite("CT_small.dcm", Rows=65535, Columns=65535, NumberOfFrames="1000"), "pixel_budget_exceeded"),
        "deep_nesting.dcm": (base[:pixel_at] + deep_sequence(20000) + base[pixel_at:], "nesting_too_deep"),
        "truncated_pixels.dcm": (base[: len(base) - 5000], "truncated_pixel_data"),
        "not_dicom_at_all": (bytes(random.Random(1).getrandbits(8) for _ in range(4096)), "not_dicom"),
        "empty.dcm": (b"", "not_dicom"),
        "no_pixels.dcm": (_rewrite("CT_small.dcm", PixelData=None), "no_pixel_data"),
        "structured_report.dcm": (_rewrite("CT_small.dcm", SOPClassUID="1.2.840.10008.5.1.4.1.1.88.22", PixelData=None),
                                  "non_image_sop_class"),
        "rt_struct.dcm": (_rewrite("CT_small.dcm", SOPClassUID="1.2.840.10008.5.1.4.1.1.481.3", PixelData=None),
                          "non_image_sop_class"),
        "segmentation.dcm": (_rewrite("CT_small.dcm", SOPClassUID="1.2.840.10008.5.1.4.1.1.66.4"), "non_image_sop_class"),
        "mpeg2_syntax.dcm": (_rewrite("CT_small.dcm", TransferSyntaxUID="1.2.840.10008.1.2.4.100"), "unsupported_transfer_syntax"),
        "oversized.dcm": (base + b"\x00" * (max_file_bytes + 1 - len(base)), "file_too_large"),
    }
    expected = {}
    for name, (data, reason) in bad.items():
        (d / name).write_bytes(data)
        expected[str(d / name)] = reason
    good = []
    for name in GOOD_DICOM:
        (d / f"good_{name}").write_bytes(_base(name))
        good.append(str(d / f"good_{name}"))
    return expected, good


def hostile_notes(d: Path, big_note_mb: int = 50) -> tuple[dict[str, str], list[str]]:
    """Bad notes -> expected reasons (keys: record ids), and the good notes' ids."""
    d.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}
    good = [f"ok{i}" for i in range(5)]
    big = "chest pain " * (big_note_mb * (1 << 20) // 11)
    lines = [json.dumps({"id": "ok0", "text": "patient with fever and cough"}).encode(),
             b"{this is not json",
             b"[1, 2, 3]",
             b"[" * 100000,  # nesting that recursion-based parsers choke on
             b'{"id": "utf8", "text": "caf\xe9 au lait"}',
             json.dumps({"id": "number", "text": 12345}).encode(),
             json.dumps({"id": "huge", "text": big}).encode(),
             json.dumps({"id": "nul", "text": "a\u0000b\u0000c"}).encode(),
             json.dumps({"id": "ok1", "text": "no acute distress"}).encode()]
    (d / "notes.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    p = str(d / "notes.jsonl")
    expected.update({f"{p}#2": "malformed_json", f"{p}#3": "malformed_json", f"{p}#4": "malformed_json",
                     f"{p}#5": "invalid_utf8", "number": "bad_field_type", f"{p}#7": "note_too_large",
                     "nul": "binary_content"})
    (d / "rows.csv").write_bytes(b'id,text\nok2,"shortness of breath"\nwide,"a","b","c"\nbad8,"\xff\xfe"\n'
                                 b'ok3,"headache"\nopen,"never closed\n')
    c = str(d / "rows.csv")
    expected.update({f"{c}#2": "malformed_csv_row", "bad8": "invalid_utf8", f"{c}#5": "malformed_csv_row"})
    (d / "big.txt").write_text(big)
    expected[str(d / "big.txt")] = "note_too_large"
    (d / "junk.txt").write_bytes(bytes(random.Random(2).getrandbits(8) for _ in range(20000)))
    expected[str(d / "junk.txt")] = "invalid_utf8"
    (d / "controls.txt").write_bytes(bytes(range(1, 9)) * 100)
    expected[str(d / "controls.txt")] = "binary_content"
    (d / "ok4.txt").write_text("mild cough, no fever")
    good[4] = str(d / "ok4.txt")
    (d / "table.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    expected[str(d / "table.parquet")] = "malformed_parquet"
    return expected, good


def hanging_decode(data: bytes, frame_policy: str, max_pixel_bytes: int):
    """A decode function for the isolated decoder that hangs on files starting with b"HANG"
    and dies on files starting with b"CRASH" (as a segfaulting plugin would)."""
    from transforms.decode_worker import decode_bytes

    if data.startswith(b"HANG"):
        time.sleep(3600)
    if data.startswith(b"CRASH"):
        os._exit(11)
    return decode_bytes(data, frame_policy, max_pixel_bytes)


def slow_decode(data: bytes, frame_policy: str, max_pixel_bytes: int):
    """A decode function for the isolated decoder that takes half a second per file."""
    from transforms.decode_worker import decode_bytes

    time.sleep(0.5)
    return decode_bytes(data, frame_policy, max_pixel_bytes)


def heavy_modules_decode(data: bytes, frame_policy: str, max_pixel_bytes: int):
    """A decode function that reports which heavy packages the decoder process has imported."""
    import sys

    from transforms.decode_worker import DecodeOutcome

    heavy = ("torch", "transformers", "apache_beam", "_pytest")  # _pytest: the main module of a test run
    return DecodeOutcome(pixels=sorted(m for m in heavy if m in sys.modules))
