"""DICOM image attributes: what decoding reads, checked and named without quoting a value.

Every element the checks, decoders and LUT steps read is converted once, up front
(:func:`_convert_attributes`); :func:`check_dicom` refuses, before decoding, non-image SOP classes,
a dataset without pixel data and a header over the pixel budget. Messages name tags by keyword and
number, standard UIDs by their dictionary name and photometric values by their defined term: a tag
value is never quoted.
"""

from __future__ import annotations

import math

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.uid import UID

from .arrays import FRAME_POLICIES
from .limits import DicomLimits, DicomRejected

# SOP classes that are not images (PS3.4 B.5): skipped with a reason rather than decoded.
# Prefix match on the SOP Class UID; the value is the name used in the message.
NON_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.": "structured report (SR)",
    "1.2.840.10008.5.1.4.1.1.481.": "radiotherapy object (RT)",
    "1.2.840.10008.5.1.4.1.1.66.": "segmentation, registration or fiducials (SEG/REG)",
    "1.2.840.10008.5.1.4.1.1.11.": "presentation state",
    "1.2.840.10008.5.1.4.1.1.9.": "waveform",
    "1.2.840.10008.5.1.4.1.1.104.": "encapsulated document",
    "1.2.840.10008.5.1.4.1.1.68.": "surface or mesh",
    "1.2.840.10008.5.1.4.1.1.200.": "protocol",
    "1.2.840.10008.5.1.4.1.1.66": "raw data",
    "1.2.840.10008.1.3.10": "media storage directory (DICOMDIR)",  # an index of other files: no pixels
}
RT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.1"  # RT Image (portal images): an image, decoded

_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Image Pixel module (PS3.3 C.7.6.3) elements every decoder needs; integer pixel data also needs
# Bits Stored and Pixel Representation.
_REQUIRED_KEYWORDS = ("Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated")
_INTEGER_REQUIRED_KEYWORDS = ("BitsStored", "PixelRepresentation")
# Elements the modality and VOI LUT steps read (PS3.3 C.11.1, C.11.2), copied into a per-frame view.
_LUT_KEYWORDS = (
    "PhotometricInterpretation", "BitsAllocated", "BitsStored", "PixelRepresentation",
    "ModalityLUTSequence", "RescaleSlope", "RescaleIntercept", "RescaleType",
    "VOILUTSequence", "WindowCenter", "WindowWidth", "VOILUTFunction",
)
# Defined terms of Photometric Interpretation (0028,0004) (PS3.3 C.7.6.3.1.2, retired ones included):
# the only values a message may name; anything else is "an unknown value", never quoted.
PHOTOMETRIC_TERMS = (
    "MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422",
    "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "XYB", "HSV", "ARGB", "CMYK",
)
SUPPORTED_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR")
# what the decoders may hand back for a supported input (JPEG 2000's YBR_ICT/YBR_RCT come back as RGB)
_DECODED_PHOTOMETRIC = SUPPORTED_PHOTOMETRIC + ("YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "YBR_PARTIAL_422")
# Enhanced multi-frame functional group macros that carry the same elements per frame:
# Pixel Value Transformation (PS3.3 C.7.6.16.2.9) and Frame VOI LUT (C.7.6.16.2.10).
_FUNCTIONAL_GROUP_SEQUENCES = ("PixelValueTransformationSequence", "FrameVOILUTSequence")
_PALETTE_DATA_KEYWORDS = tuple(
    f"{colour}PaletteColorLookupTableData" for colour in ("Red", "Green", "Blue", "Alpha")
)


# every element the checks, decoders and LUT steps read: converted once, up front, so that a value
# pydicom cannot convert (an IS that is no number, a US of one byte) is bad_image_attribute, named
_IMAGE_KEYWORDS = tuple(dict.fromkeys(
    _REQUIRED_KEYWORDS + _INTEGER_REQUIRED_KEYWORDS + _LUT_KEYWORDS + (
        "NumberOfFrames", "PlanarConfiguration", "HighBit", "SOPClassUID", "PixelPresentation",
    ) + tuple(f"{c}PaletteColorLookupTableDescriptor" for c in ("Red", "Green", "Blue", "Alpha"))
    + tuple(f"Segmented{c}PaletteColorLookupTableData" for c in ("Red", "Green", "Blue", "Alpha"))
    + _PALETTE_DATA_KEYWORDS
))


def _convert_attributes(ds: Dataset) -> None:
    """Convert (pydicom does it on first access) every element decoding reads; raise
    ``bad_image_attribute`` naming the first one that cannot be, never quoting it."""
    for kw in _IMAGE_KEYWORDS:
        try:
            value = ds.get(kw)
            if kw in _NUMBER_KEYWORDS and value not in (None, ""):  # pydicom keeps a bad DS/IS as text
                [float(v) for v in (value if isinstance(value, (list, tuple, MultiValue)) else [value])]
        except Exception:  # noqa: BLE001 - pydicom's conversion errors quote the value
            raise DicomRejected("bad_image_attribute", f"{_tag_name(kw)} has a value that cannot be read") from None


_NUMBER_KEYWORDS = frozenset(("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"))


def _tag_name(keyword: str) -> str:
    """``"PixelData"`` -> ``"PixelData (7FE0,0010)"``, for messages."""
    tag = tag_for_keyword(keyword)
    return f"{keyword} {Tag(tag)}" if tag is not None else keyword


def _check_frame_policy(frame_policy: str) -> None:
    if frame_policy not in FRAME_POLICIES:
        raise ValueError(f"frame_policy ({frame_policy!r}) must be one of {FRAME_POLICIES}")


def _pixel_data_keyword(ds: Dataset) -> str:
    """The keyword of the dataset's pixel data element; ``no_pixel_data`` when it has none."""
    keyword = next((kw for kw in _PIXEL_DATA_KEYWORDS if kw in ds), None)
    if keyword is None:
        raise DicomRejected(
            "no_pixel_data",
            "dataset has no PixelData (7FE0,0010), FloatPixelData (7FE0,0008) "
            "or DoubleFloatPixelData (7FE0,0009)"
        )
    return keyword


def _photometric_message(value: str) -> str:
    """The value is named only when it is a defined term (a constant of ours), else never quoted."""
    named = repr(value) if value in PHOTOMETRIC_TERMS else "(a value that is no defined term, not quoted)"
    return (f"PhotometricInterpretation (0028,0004) {named} is not supported: expected "
            + ", ".join(SUPPORTED_PHOTOMETRIC[:-1]) + f" or {SUPPORTED_PHOTOMETRIC[-1]}")


def _number_of_frames(ds: Dataset) -> int:
    try:
        value = ds.get("NumberOfFrames")  # pydicom converts the raw value here, and can raise
        if value in (None, ""):
            return 1
        n = int(value)
    except (TypeError, ValueError, OverflowError):
        raise DicomRejected("bad_image_attribute", "NumberOfFrames (0028,0008) is not an integer") from None
    if n < 1:
        raise DicomRejected("bad_image_attribute", "NumberOfFrames (0028,0008) must be >= 1")
    return n


def _syntax_name(syntax: UID) -> str:
    """A standard transfer syntax by its UID and name (public constants); any other UID is never
    quoted (a private UID carries the site's root and can carry more)."""
    return f"TransferSyntaxUID (0002,0010) {_uid_name(syntax)}"


def _uid_name(uid: str | UID) -> str:
    uid = UID(str(uid))
    if uid.name != str(uid) and uid.startswith("1.2.840.10008."):  # in pydicom's dictionary of the standard
        return f"{uid} ({uid.name})"
    return "(a private or unregistered UID, not quoted)"


def check_dicom(ds: Dataset, frame_policy: str = "middle", limits: DicomLimits | None = None) -> None:
    """Refuse, before decoding, what should not be decoded: a non-image SOP class (SR, RT, SEG,
    presentation states, waveforms, documents), no pixel data, or a header whose declared decoded
    size exceeds ``limits.max_pixel_bytes``. Raises :class:`DicomRejected`; returns None."""
    limits = limits or DicomLimits()
    _convert_attributes(ds)
    sop = str(ds.get("SOPClassUID", "") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "") or "")
    for prefix, kind in NON_IMAGE_SOP_CLASSES.items():
        if sop.startswith(prefix) and sop != RT_IMAGE_STORAGE:
            raise DicomRejected("non_image_sop_class",
                                f"SOP class {_uid_name(sop)} is a {kind}, not an image: skipped")
    if not any(kw in ds for kw in _PIXEL_DATA_KEYWORDS):
        _check_frame_policy(frame_policy)  # as dicom_to_array would, before its no_pixel_data
        _pixel_data_keyword(ds)
    if not limits.max_pixel_bytes:
        return
    try:
        rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        samples, bits = int(ds.get("SamplesPerPixel") or 1), int(ds.get("BitsAllocated") or 8)
    except (TypeError, ValueError):
        raise DicomRejected("bad_image_attribute", "Rows, Columns, SamplesPerPixel or BitsAllocated is not an integer") from None
    frames = _number_of_frames(ds) if frame_policy == "all" else 1
    # decoding "middle" still materialises one frame; LUTs and colour conversion work in float64
    declared = rows * cols * frames * samples * max(1, math.ceil(bits / 8))
    working = rows * cols * frames * samples * 8
    if max(declared, working) > limits.max_pixel_bytes:
        raise DicomRejected(  # the sizes are ours (computed); the header's values are not quoted
            "pixel_budget_exceeded",
            f"the image size the header declares (Rows, Columns, NumberOfFrames, SamplesPerPixel, BitsAllocated) "
            f"needs about {max(declared, working) / 2**20:.0f} MiB to decode, over the pixel budget of "
            f"{limits.max_pixel_bytes / 2**20:.0f} MiB",
        )
