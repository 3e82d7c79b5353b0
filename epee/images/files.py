"""Image files to arrays: PNG (Pillow), DICOM Part 10 (pydicom) and NumPy ``.npy``, chosen by content."""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from PIL import Image
from pydicom.errors import InvalidDicomError

from .attributes import _check_frame_policy, check_dicom
from .limits import DicomLimits, DicomRejected
from .part10 import DICOM_PREFIX_OFFSET, check_part10
from .pixels import dicom_to_array

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NPY_MAGIC = b"\x93NUMPY"


def read_png(path_or_bytes: str | os.PathLike[str] | bytes | bytearray | memoryview) -> np.ndarray:
    """Read a PNG file (or its bytes) with Pillow into a new array.

    Returns
    -------
    numpy.ndarray
        * mode L (8-bit grey): (H, W) ``uint8``; mode 1 (bilevel) becomes L, 0 or 255.
        * 16-bit grey (Pillow mode I;16): (H, W) ``uint16``, all 16 bits kept.
        * mode I (32-bit grey): (H, W) ``int32``.
        * RGB: (H, W, 3) ``uint8``; RGBA: (H, W, 4) ``uint8``; LA: grey with alpha dropped.
        * palette (P, PA): converted to RGB through the palette, (H, W, 3) ``uint8``.

        Pillow reads 16-bit-per-channel RGB PNGs as 8-bit RGB; that precision is lost.

    Raises
    ------
    ValueError
        If the data is not a readable PNG image.
    """
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        src: BinaryIO = io.BytesIO(bytes(path_or_bytes))
    else:
        src = open(path_or_bytes, "rb")  # a missing file raises FileNotFoundError, as open() does
    with src:
        if src.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
            raise ValueError("not a PNG image: no PNG signature")
        src.seek(0)
        try:
            with Image.open(src, formats=["PNG"]) as img:
                img.load()
                return np.array(_to_array_mode(img))
        except (OSError, SyntaxError) as exc:  # Pillow's errors for truncated or corrupt streams
            raise ValueError(f"corrupt PNG image ({type(exc).__name__})") from exc


def _to_array_mode(img: Image.Image) -> Image.Image:
    """Convert Pillow modes without a direct NumPy meaning to one that has one."""
    if img.mode == "1":
        return img.convert("L")
    if img.mode == "LA":
        return img.getchannel("L")
    if img.mode in ("P", "PA"):
        return img.convert("RGB")
    if img.mode.startswith("I;16"):  # I;16, I;16B, I;16L all become native uint16
        return img  # NumPy reads these as uint16 of the right byte order
    if img.mode in ("L", "I", "F", "RGB", "RGBA"):
        return img
    raise ValueError(f"unsupported PNG mode {img.mode!r}")


def read_dicom(
    path_or_file: str | os.PathLike[str] | BinaryIO | bytes, frame_policy: str = "middle",
    limits: DicomLimits | None = None,
) -> np.ndarray:
    """Read a DICOM Part 10 file and return :func:`dicom_to_array` of it, after
    :func:`check_part10` (its byte structure) and :func:`check_dicom` (what it is).

    The file must have the 128-byte preamble and "DICM" prefix (PS3.10 section 7.1): headerless
    datasets are rejected rather than guessed at.

    Parameters
    ----------
    path_or_file : str | os.PathLike | file-like | bytes
        The file, a binary file-like opened at its start, or its bytes.
    frame_policy : str
        ``"middle"`` for one (H, W[, 3]) frame, ``"all"`` for the (F, H, W[, 3]) stack.
    limits : DicomLimits, optional
        The pixel budget and the limit on inflated data (default :class:`DicomLimits`).

    Raises
    ------
    DicomRejected (a ValueError)
        Not a DICOM Part 10 file, unreadable file meta or dataset structure, a file that ends
        inside an element, sequences nested too deeply, a deflated dataset that inflates past
        its limit, a non-image SOP class, no pixel data, over the pixel budget; and everything
        :func:`dicom_to_array` raises. Messages never quote a tag value: parser errors are
        reported by type only.
    DicomUnsupported (a NotImplementedError)
        As :func:`dicom_to_array`.
    """
    _check_frame_policy(frame_policy)
    if isinstance(path_or_file, (bytes, bytearray, memoryview)):
        data = path_or_file
    elif isinstance(path_or_file, (str, os.PathLike)):
        data = Path(path_or_file).read_bytes()
    else:
        data = path_or_file.read()
    part10 = check_part10(data, limits)
    source = part10.data if isinstance(part10.data, io.BytesIO) else io.BytesIO(part10.data)
    del data
    try:
        ds = pydicom.dcmread(source, force=False)
    except InvalidDicomError:
        raise DicomRejected("not_dicom", "not a DICOM Part 10 file (PS3.10 7.1)") from None
    except RecursionError:
        raise DicomRejected("nesting_too_deep", "sequences are nested deeper than the parser can follow") from None
    except MemoryError:
        raise DicomRejected("parse_error", "cannot parse DICOM file: an element declares more memory than is available") from None
    except (EOFError, ValueError, KeyError, IndexError, TypeError, OverflowError, struct.error,
            UnicodeError, AttributeError, LookupError) as exc:  # malformed in ways the byte check does not see
        kind = "truncated_file" if isinstance(exc, EOFError) else "parse_error"
        raise DicomRejected(kind, f"cannot parse DICOM file ({type(exc).__name__})") from None
    del source
    try:
        check_dicom(ds, frame_policy, limits)
        return dicom_to_array(ds, frame_policy)
    except RecursionError:
        raise DicomRejected("nesting_too_deep", "sequences are nested deeper than the parser can follow") from None


def load_image_file(path: str | os.PathLike[str] | bytes, name: str = "") -> np.ndarray:
    """Read one image file (a local path, or its bytes and ``name`` for the suffix) as an array,
    choosing the reader by content.

    * "DICM" at byte 128 (PS3.10 7.1), or a ``.dcm`` suffix: :func:`read_dicom`, middle frame.
    * the PNG signature: :func:`read_png`.
    * the NumPy ``.npy`` magic, or a ``.npy`` suffix: :func:`numpy.load` with
      ``allow_pickle=False``.

    Raises
    ------
    ValueError
        ``"unsupported image file type"`` for anything else, and whatever the reader raises.
    """
    if isinstance(path, (bytes, bytearray, memoryview)):
        data, suffix = bytes(path), Path(name).suffix.lower()
        head = data[: DICOM_PREFIX_OFFSET + 4]
    else:
        path = Path(path)
        with open(path, "rb") as f:
            head = f.read(DICOM_PREFIX_OFFSET + 4)
        data, suffix = path, path.suffix.lower()
    if head[DICOM_PREFIX_OFFSET:] == b"DICM" or suffix == ".dcm":
        return read_dicom(data, frame_policy="middle")
    if head.startswith(PNG_SIGNATURE):
        return read_png(data)
    if head.startswith(NPY_MAGIC) or suffix == ".npy":
        try:
            arr = np.load(io.BytesIO(data) if isinstance(data, bytes) else data, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ValueError(f"cannot read .npy image: {exc}") from exc
        if not isinstance(arr, np.ndarray):
            raise ValueError("a .npy image file must hold a single array")
        return arr
    raise ValueError(
        f"unsupported image file type (suffix {suffix or 'none'!r}): expected DICOM, PNG or .npy"
    )
