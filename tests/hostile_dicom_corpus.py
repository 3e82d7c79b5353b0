"""Hostile DICOM files, generated on the spot: one builder per DICOM ``error_type``, deflate bombs,
and awkward files that must still decode (big endian, float pixel data, palette colour).

``ERROR_CASES``: ``{error_type: builder(path, marker)}``; each builder writes one file that the
DICOM reader, with its default limits or any ``--max_file_bytes`` / ``--max_pixel_bytes`` up to
them, dead-letters with exactly that ``error_type``. ``marker`` is planted where the file can
carry it (patient name, comments, a private tag, the private UID or photometric value that is
the fault itself), so a privacy test can grep every byte written for it.

``INJECTED_CASES``: the types no file content produces with the stock decoder (a hang, a dead
decoder, decoding out of memory): their files hold ``HANG-ME`` / ``CRASH-ME`` / ``OOM-ME`` and
yield their type when the reader runs :func:`injected_decode` (``decode_path=
"tests.hostile_dicom_corpus:injected_decode"``). ``read_error`` (storage), ``prepare_error`` and
``inference_error`` (all pipelines) need faults injected into storage or the model instead.

``DECODES``: builders of files that are hostile to naive readers but valid: they must be predicted.
"""

from __future__ import annotations

import io
import os
import random
import struct
import time
import zlib
from pathlib import Path
from typing import Callable

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from tests.hostile_corpus import deep_sequence  # noqa: F401 - one builder of nested sequences for both corpora

MARKER = "ZQDCMMARKQZ"
DEFLATED = "1.2.840.10008.1.2.1.99"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
BOMB_STEP = 1 << 20


def _dataset(name: str = "CT_small.dcm", marker: str = MARKER):
    """A pydicom test file with ``marker`` in its patient name, comments and a private text tag."""
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.PatientName = marker
    ds.ImageComments = f"comment {marker}"
    ds.private_block(0x0009, "EPEE HOSTILE", create=True).add_new(0x01, "LO", f"private {marker}")
    return ds


def _bytes(ds, syntax: str | None = None) -> bytes:
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _raw(ds, tag: int, vr: str, value: bytes) -> None:
    """Set an element to raw bytes that pydicom would refuse to build (written as they are)."""
    ds._dict[Tag(tag)] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def _meta_end(data: bytes) -> int:
    """Where the file meta (group 0002, explicit VR LE) ends."""
    pos = 132
    while struct.unpack_from("<H", data, pos)[0] == 0x0002:
        vr = data[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"UN", b"UT", b"SQ", b"UC", b"UR", b"OL", b"OD", b"OF", b"OV", b"SV", b"UV"):
            pos += 12 + struct.unpack_from("<L", data, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", data, pos + 6)[0]
    return pos


def _noise(data: bytes, where: float, n: int = 200, seed: int = 3) -> bytes:
    at = data.find(b"\xe0\x7f\x10\x00")
    head = at + int((len(data) - at) * where)
    return data[:head] + bytes(random.Random(seed).getrandbits(8) for _ in range(n)) + data[head + n:]


def deflate_bomb(path, inflated_bytes: int, marker: str = MARKER) -> int:
    """A Deflated Explicit VR Little Endian file (1.2.840.10008.1.2.1.99): CT_small (marker planted),
    then a private OB element (7FE1,1000) of ``inflated_bytes`` zeros (rounded up to even) after the
    pixel data. 1 MiB of zeros deflates to about 1 KB, so 1.2 GiB is a file of about 1.25 MB;
    written in constant memory (one compressed 1 MiB block, full-flushed, repeated). Returns the
    file's size. Small ``inflated_bytes`` give a valid file that decodes."""
    inflated_bytes += inflated_bytes % 2
    ds = _dataset(marker=marker)
    plain = _bytes(ds, EXPLICIT_LE)
    head = _bytes(_dataset(marker=marker), DEFLATED)
    meta = head[:_meta_end(head)]
    body = plain[_meta_end(plain):]
    creator = b"EPEE BOMB "  # even length
    body += struct.pack("<HH2sH", 0x7FE1, 0x0010, b"LO", len(creator)) + creator
    body += struct.pack("<HH2sHL", 0x7FE1, 0x1000, b"OB", 0, inflated_bytes)
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with open(path, "wb") as fh:
        fh.write(meta)
        fh.write(c.compress(body) + c.flush(zlib.Z_FULL_FLUSH))
        full, rest = divmod(inflated_bytes, BOMB_STEP)
        if full:
            block = c.compress(bytes(BOMB_STEP)) + c.flush(zlib.Z_FULL_FLUSH)  # the same bytes for every block
            for _ in range(full):
                fh.write(block)
        fh.write(c.compress(bytes(rest)) + c.flush())
        return fh.tell()


# -- one builder per error type --------------------------------------------------------------------


def not_dicom(path, marker: str = MARKER) -> None:
    Path(path).write_bytes((marker + " is no DICOM file\n").encode() * 300)


def parse_error(path, marker: str = MARKER) -> None:
    """A dataset element (the marked PatientName) whose VR is no VR."""
    data = _bytes(_dataset(marker=marker))
    at = data.find(b"\x10\x00\x10\x00PN")
    Path(path).write_bytes(data[:at + 4] + b"Q!" + data[at + 6:])


def parse_error_meta(path, marker: str = MARKER) -> None:
    """File meta information cut inside an element and followed by the marker."""
    Path(path).write_bytes(_bytes(_dataset(marker=marker))[:153] + marker.encode() * 4)


def truncated_file(path, marker: str = MARKER) -> None:
    """Cut in the middle of the marked ImageComments value: its length runs past the end."""
    data = _bytes(_dataset(marker=marker))
    at = data.find(f"comment {marker}".encode())
    Path(path).write_bytes(data[:at + 5])


def nesting_too_deep(path, marker: str = MARKER) -> None:
    data = _bytes(_dataset(marker=marker))
    at = data.find(b"\xe0\x7f\x10\x00")
    Path(path).write_bytes(data[:at] + deep_sequence(1000) + data[at:])


def non_image_sop_class(path, marker: str = MARKER) -> None:
    ds = _dataset(marker=marker)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR
    del ds.PixelData
    Path(path).write_bytes(_bytes(ds))


def dicomdir(path, marker: str = MARKER) -> None:
    """A DICOMDIR (Media Storage Directory, 1.2.840.10008.1.3.10): an index, no image."""
    ds = pydicom.dcmread(get_testdata_file("DICOMDIR"))
    ds.FileSetID = marker[:16]
    Path(path).write_bytes(_bytes(ds))


def no_pixel_data(path, marker: str = MARKER) -> None:
    ds = _dataset(marker=marker)
    del ds.PixelData
    Path(path).write_bytes(_bytes(ds))


def pixel_budget_exceeded(path, marker: str = MARKER) -> None:
    ds = _dataset(marker=marker)
    ds.Rows = ds.Columns = 65535
    ds.NumberOfFrames = 1000
    Path(path).write_bytes(_bytes(ds))


def private_uid(marker: str = MARKER) -> str:
    """A private UID whose digits encode the marker (a UID holds digits only)."""
    return "1.2." + "".join(str(b + 100) for b in marker.encode())[:58]


def unsupported_transfer_syntax(path, marker: str = MARKER) -> None:
    """A private transfer syntax UID (its digits are the marker's bytes)."""
    from pydicom.encaps import encapsulate

    ds = _dataset(marker=marker)
    ds.file_meta.TransferSyntaxUID = private_uid(marker)
    ds.PixelData = encapsulate([ds.PixelData])
    Path(path).write_bytes(_bytes(ds))


def unsupported_photometric(path, marker: str = MARKER) -> None:
    ds = _dataset(marker=marker)
    _raw(ds, 0x00280004, "CS", (marker.upper()[:16] + " " * (len(marker[:16]) % 2)).encode())
    Path(path).write_bytes(_bytes(ds))


def missing_image_attribute(path, marker: str = MARKER) -> None:
    ds = _dataset(marker=marker)
    del ds.BitsStored
    Path(path).write_bytes(_bytes(ds))


def bad_image_attribute(path, marker: str = MARKER) -> None:
    """NumberOfFrames (an IS) holding the marker's text."""
    ds = _dataset(marker=marker)
    value = marker[:12].encode()
    _raw(ds, 0x00280008, "IS", value + b" " * (len(value) % 2))
    Path(path).write_bytes(_bytes(ds))


def truncated_pixel_data(path, marker: str = MARKER) -> None:
    Path(path).write_bytes(_bytes(_dataset(marker=marker))[:-5000])


def decode_error(path, marker: str = MARKER) -> None:
    """RLE pixel data with noise: pylibjpeg-rle (Rust) panics on it, a ``PanicException``, which
    is a ``BaseException``, not an ``Exception``."""
    Path(path).write_bytes(_noise(_bytes(_dataset("MR_small_RLE.dcm", marker)), 0.3))


def file_too_large(path, marker: str = MARKER) -> None:
    """A 1.1 MB deflate bomb that inflates past the default 1 GiB --max_file_bytes (and past any
    smaller one): refused while inflating, before anything large is allocated."""
    deflate_bomb(path, (1 << 30) + (4 << 20), marker)


ERROR_CASES: dict[str, Callable[..., None]] = {
    "not_dicom": not_dicom,
    "parse_error": parse_error,
    "truncated_file": truncated_file,
    "nesting_too_deep": nesting_too_deep,
    "non_image_sop_class": non_image_sop_class,
    "no_pixel_data": no_pixel_data,
    "pixel_budget_exceeded": pixel_budget_exceeded,
    "unsupported_transfer_syntax": unsupported_transfer_syntax,
    "unsupported_photometric": unsupported_photometric,
    "missing_image_attribute": missing_image_attribute,
    "bad_image_attribute": bad_image_attribute,
    "truncated_pixel_data": truncated_pixel_data,
    "decode_error": decode_error,
    "file_too_large": file_too_large,
}

# more files per error type: the same reason from another construction
MORE_ERROR_CASES: dict[str, tuple[str, Callable[..., None]]] = {
    "bad_meta": ("parse_error", parse_error_meta),
    "dicomdir": ("non_image_sop_class", dicomdir),
}


def _with_comment(text: str) -> Callable[..., None]:
    def build(path, marker: str = MARKER) -> None:
        ds = _dataset(marker=marker)
        ds.ImageComments = f"{text} {marker}"
        Path(path).write_bytes(_bytes(ds))
    return build


INJECTED_CASES: dict[str, Callable[..., None]] = {
    "decode_timeout": _with_comment("HANG-ME"),
    "decoder_crashed": _with_comment("CRASH-ME"),
    "out_of_memory": _with_comment("OOM-ME"),
}


class Panic(BaseException):
    """As pyo3's ``PanicException``: a BaseException, not an Exception."""


def injected_decode(data: bytes, frame_policy: str, limits):
    """The decoder child's function for :data:`INJECTED_CASES`: hangs on ``HANG-ME``, dies on
    ``CRASH-ME`` (as a segfaulting plugin would), runs out of memory on ``OOM-ME``, raises a
    BaseException on files starting with ``PANIC-ME`` (a Rust plugin's panic); the rest decodes."""
    from transforms.decode_worker import decode_bytes

    if b"HANG-ME" in data:
        time.sleep(3600)
    if b"CRASH-ME" in data:
        os._exit(11)
    if b"OOM-ME" in data:
        raise MemoryError(f"cannot allocate {data[-40:]!r}")  # a text that quotes the file, never written
    if data.startswith(b"PANIC-ME"):
        raise Panic(f"panicked at {data[:40]!r}")
    return decode_bytes(data, frame_policy, limits)


# -- hostile but valid: decoded --------------------------------------------------------------------


def big_endian(path, marker: str = MARKER) -> None:
    """Explicit VR Big Endian (retired, still in archives), 16-bit MR."""
    Path(path).write_bytes(Path(get_testdata_file("MR_small_bigendian.dcm")).read_bytes())


def float_pixels(path, marker: str = MARKER) -> None:
    """Float Pixel Data (7FE0,0008), a parametric map's real-world values (no BitsStored)."""
    import numpy as np

    ds = _dataset(marker=marker)
    del ds.PixelData
    for kw in ("BitsStored", "HighBit", "PixelRepresentation", "RescaleSlope", "RescaleIntercept",
               "WindowCenter", "WindowWidth"):
        if kw in ds:
            delattr(ds, kw)
    ds.BitsAllocated = 32
    ds.FloatPixelData = np.linspace(-1.5, 2.5, ds.Rows * ds.Columns, dtype="<f4").tobytes()
    Path(path).write_bytes(_bytes(ds))


def palette_colour(path, marker: str = MARKER) -> None:
    Path(path).write_bytes(Path(get_testdata_file("examples_palette.dcm")).read_bytes())


def private_markers(path, marker: str = MARKER) -> None:
    """Markers in a private sequence and private text tags, besides the usual ones."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = _dataset(marker=marker)
    block = ds.private_block(0x0011, "EPEE PRIVATE", create=True)
    item = Dataset()
    item.add_new(0x00110010, "LO", "EPEE PRIVATE")
    item.add_new(0x00111001, "UT", f"note {marker}")
    block.add_new(0x01, "SQ", Sequence([item]))
    block.add_new(0x02, "UT", f"text {marker} " * 20)
    Path(path).write_bytes(_bytes(ds))


def small_deflated(path, marker: str = MARKER) -> None:
    """A deflated file whose private element inflates to 64 KiB: well within every limit."""
    deflate_bomb(path, 64 << 10, marker)


DECODES: dict[str, Callable[..., None]] = {
    "big_endian": big_endian,
    "float_pixels": float_pixels,
    "palette_colour": palette_colour,
    "private_markers": private_markers,
    "small_deflated": small_deflated,
}
