"""Image loading and preprocessing: PNG, NumPy and DICOM pixels to a normalised (C, H, W) tensor.

A flat module of pure functions (inputs are never modified) in the style of pydicom's
``pixels/processing.py``. The path every image takes is::

    raw pixels -> to_unit_range -> to_channels -> resize -> (x - mean) / std -> tensor (C, H, W)

DICOM pixels first go through :func:`dicom_to_array`, which turns stored values into display values
(modality LUT, VOI LUT, MONOCHROME1 inversion, colour conversion) as PS3.3 section C.11 describes.

Failures come in three tiers, as in pydicom: ``ValueError`` naming the tag for missing or
invalid input, ``NotImplementedError`` for valid input this module does not support, and a logged
warning for suspicious but usable input. No message or log line ever contains a tag value (a
private UID or photometric value can carry site or patient information, a count can be a planted
marker), nor the text of an exception that touched the file: only tag names and numbers, the
names of standard UIDs and defined terms from pydicom's dictionaries and our own lists, and sizes
we computed. DICOM Part 10 files are checked byte by byte before pydicom parses them
(:func:`check_part10`): the file meta information, every element's declared length against the
end of the file and of its sequence or item, the nesting depth, and a deflated dataset inflated in
bounded chunks against ``DicomLimits.max_inflated_bytes``.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import pydicom
from PIL import Image
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi_lut,
    as_pixel_options,
    convert_color_space,
    get_decoder,
)
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.uid import UID

from .errors import InputError

if TYPE_CHECKING:  # torch is imported where it is used: the DICOM decoder process never needs it
    import torch

logger = logging.getLogger(__name__)

FRAME_POLICIES = ("middle", "all")
CHANNEL_COUNTS = (1, 3)
# ITU-R BT.601 luma weights for R, G, B (the weights Pillow's convert("L") uses too).
BT601_LUMA = (0.299, 0.587, 0.114)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NPY_MAGIC = b"\x93NUMPY"
DICOM_PREFIX_OFFSET = 128  # PS3.10 section 7.1: 128-byte preamble, then "DICM"


class DicomRejected(InputError):
    """A DICOM file that will not become an image. ``reason`` (= ``error_type``) is a short
    machine-readable reason (``not_dicom``, ``parse_error``, ``truncated_file``,
    ``nesting_too_deep``, ``file_too_large``, ``no_pixel_data``, ``non_image_sop_class``,
    ``pixel_budget_exceeded``, ``truncated_pixel_data``, ``decode_error``, ...). Messages are
    written here and never quote a tag value (an :class:`epee.errors.InputError`)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(reason, message)
        self.reason = reason


class DicomUnsupported(NotImplementedError):
    """Valid DICOM this path does not handle (``unsupported_transfer_syntax``,
    ``unsupported_photometric``). Its message is ours too (``message``, as :class:`InputError`)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = self.error_type = reason
        self.message = message


@dataclass(frozen=True)
class DicomLimits:
    """What a DICOM file may cost before it is decoded.

    ``max_pixel_bytes``: the decoded size its header declares (Rows x Columns x frames decoded x
    Samples per Pixel x bytes per sample) must stay within it; checked before any decoding, so a
    header that claims a 100000 x 100000 x 1000 volume costs nothing. ``max_inflated_bytes``: a
    Deflated Explicit VR Little Endian dataset (1.2.840.10008.1.2.1.99) may inflate to at most this
    many bytes; it is inflated in 1 MiB steps and, when it could exceed the limit at all, counted
    in a first pass that keeps nothing, so a 1 MB file that inflates to gigabytes is refused
    (``file_too_large``) before anything large is allocated. ``0`` disables either check.
    """

    max_pixel_bytes: int = 1 << 30
    max_inflated_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        for name in ("max_pixel_bytes", "max_inflated_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} ({value!r}) must be an integer >= 0")


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


@dataclass(frozen=True)
class ImageSettings:
    """How raw pixels become the model's ``pixel_values``; stored beside the model."""

    image_size: int = 224  # square side the model takes; ViT cost grows with (size / patch)^2 tokens
    num_channels: int = 1  # 1 grey (X-ray, CT, MR) or 3 RGB (ultrasound, photos, RGB-pretrained ViTs)
    mean: tuple[float, ...] = (0.5,)  # per channel, subtracted after scaling pixels to [0, 1]
    std: tuple[float, ...] = (0.5,)  # per channel, > 0; (0.5,) with mean (0.5,) maps [0, 1] to [-1, 1]
    frame_policy: str = "middle"  # multi-frame DICOM: "middle" frame only, or "all" frames as a stack

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"image_size ({self.image_size!r}) must be an integer >= 1")
        if isinstance(self.num_channels, bool) or self.num_channels not in CHANNEL_COUNTS:
            raise ValueError(f"num_channels ({self.num_channels!r}) must be one of {CHANNEL_COUNTS}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            try:
                values = tuple(float(v) for v in values)
            except (TypeError, ValueError):
                raise ValueError(f"{name} ({values!r}) must be a sequence of numbers, one per channel") from None
            if len(values) != self.num_channels:
                raise ValueError(
                    f"{name} ({values}) has {len(values)} values but num_channels is {self.num_channels}: "
                    "give one value per channel"
                )
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"{name} ({values}) must be finite")
            object.__setattr__(self, name, values)
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std ({self.std}) must be > 0 in every channel")
        if self.frame_policy not in FRAME_POLICIES:
            raise ValueError(f"frame_policy ({self.frame_policy!r}) must be one of {FRAME_POLICIES}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "num_channels": self.num_channels,
            "mean": list(self.mean),
            "std": list(self.std),
            "frame_policy": self.frame_policy,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ImageSettings":
        known = {"image_size", "num_channels", "mean", "std", "frame_policy"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown image settings keys: {sorted(unknown)}")
        return cls(**{k: tuple(v) if k in ("mean", "std") else v for k, v in data.items()})


# --------------------------------------------------------------------------------------------------
# Generic pixel functions
# --------------------------------------------------------------------------------------------------


def to_unit_range(arr: np.ndarray) -> np.ndarray:
    """Return `arr` as ``float32`` scaled to [0, 1].

    Parameters
    ----------
    arr : numpy.ndarray
        An image of any shape with a boolean, integer or floating-point dtype.

    Returns
    -------
    numpy.ndarray
        A new ``float32`` array of the same shape:

        * ``uint8``: divided by 255, so the 8-bit scale is kept (a dark photo stays dark).
        * ``bool``: False -> 0, True -> 1.
        * every other integer type and every float type: min-max scaled over the whole image
          (all channels together, so colour balance is kept), because their nominal range
          (12-bit CT in 16 bits, Hounsfield units, parametric maps) says little about the values
          actually present. A constant image becomes all zeros.

    Raises
    ------
    ValueError
        If `arr` is empty, not numeric, or holds NaN or infinite values.
    """
    arr = np.asarray(arr)
    if arr.size == 0:
        raise ValueError(f"cannot scale an empty image (shape {arr.shape})")
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"cannot scale an image of dtype {arr.dtype}: expected integers or floats")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255.0)
    values = arr.astype(np.float64)  # exact for every integer up to 2**53, and native byte order
    if not np.isfinite(values).all():
        raise ValueError("image holds NaN or infinite values")
    lo, hi = float(values.min()), float(values.max())
    if hi == lo:
        return np.zeros(arr.shape, dtype=np.float32)
    return ((values - lo) / (hi - lo)).astype(np.float32)


def to_channels(arr: np.ndarray, num_channels: int) -> np.ndarray:
    """Return an (H, W) or (H, W, C) image as a new (num_channels, H, W) array.

    Parameters
    ----------
    arr : numpy.ndarray
        (H, W) grey, or (H, W, C) with C = 1 (grey), 3 (RGB) or 4 (RGBA).
    num_channels : int
        1 for grey or 3 for RGB.

    Returns
    -------
    numpy.ndarray
        Channel-first copy. Grey to RGB repeats the grey plane; RGB to grey is the ITU-R BT.601
        luma ``0.299 R + 0.587 G + 0.114 B`` (a float result); RGBA drops alpha first. Otherwise
        the dtype is kept.

    Raises
    ------
    ValueError
        If `num_channels` is not 1 or 3, or `arr` is not (H, W) or (H, W, 1|3|4).
    """
    if isinstance(num_channels, bool) or num_channels not in CHANNEL_COUNTS:
        raise ValueError(f"num_channels ({num_channels!r}) must be one of {CHANNEL_COUNTS}")
    arr = np.asarray(arr)
    if arr.ndim == 2:
        grey = arr[np.newaxis]  # (1, H, W)
    elif arr.ndim == 3 and arr.shape[-1] == 1:
        grey = np.moveaxis(arr, -1, 0)  # (1, H, W)
    elif arr.ndim == 3 and arr.shape[-1] in (3, 4):
        rgb = np.moveaxis(arr[..., :3], -1, 0)  # (3, H, W); alpha dropped
        if num_channels == 3:
            return np.array(rgb, copy=True, order="C")
        weights = np.asarray(BT601_LUMA, dtype=np.result_type(arr.dtype, np.float32))
        return np.tensordot(weights, rgb, axes=1)[np.newaxis]  # (1, H, W)
    else:
        raise ValueError(
            f"expected an image of shape (H, W) or (H, W, C) with C in (1, 3, 4), got shape {arr.shape}"
        )
    if num_channels == 3:
        return np.repeat(grey, 3, axis=0)  # (3, H, W), a new array
    return np.array(grey, copy=True, order="C")


def resize(arr_chw: np.ndarray, size: int) -> np.ndarray:
    """Return a (C, H, W) image bilinearly resized to a new ``float32`` (C, size, size) array.

    Uses :func:`torch.nn.functional.interpolate` with ``align_corners=False`` (pixel centres, as
    Pillow and OpenCV resample) and ``antialias=True`` whenever either side shrinks, so that
    downscaling averages over the pixels it drops instead of aliasing. Aspect ratio is not kept:
    the image is stretched to a square, as ViT image processors do.

    Raises
    ------
    ValueError
        If `arr_chw` is not 3-D or `size` is not an integer >= 1.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size ({size!r}) must be an integer >= 1")
    arr_chw = np.asarray(arr_chw)
    if arr_chw.ndim != 3 or 0 in arr_chw.shape:
        raise ValueError(f"expected a non-empty (C, H, W) image, got shape {arr_chw.shape}")
    import torch
    import torch.nn.functional as F

    _, h, w = arr_chw.shape
    x = torch.from_numpy(np.array(arr_chw, dtype=np.float32, order="C"))  # a copy, never a view of the input
    if (h, w) == (size, size):
        return x.numpy()
    out = F.interpolate(
        x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=size < max(h, w)
    )  # (1, C, size, size)
    return out[0].numpy()


def preprocess(arr: np.ndarray, settings: ImageSettings) -> torch.Tensor:
    """Turn one image's raw pixels into the model's ``pixel_values``.

    raw pixels -> :func:`to_unit_range` -> :func:`to_channels` -> :func:`resize` ->
    ``(x - mean) / std`` per channel.

    Parameters
    ----------
    arr : numpy.ndarray
        One image, (H, W) or (H, W, C) as returned by :func:`load_image_file`. A frame stack from
        ``frame_policy="all"`` must be preprocessed one frame at a time.
    settings : ImageSettings
        Target size, channels and normalisation.

    Returns
    -------
    torch.Tensor
        ``float32`` (num_channels, image_size, image_size), ready for
        ``EncodedSample(pixel_values=...)``.
    """
    unit = to_unit_range(arr)
    chw = to_channels(unit, settings.num_channels)  # (C, H, W) in [0, 1]
    sized = resize(chw, settings.image_size)  # (C, S, S) float32
    mean = np.asarray(settings.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(settings.std, dtype=np.float32)[:, None, None]
    import torch

    return torch.from_numpy((sized - mean) / std)


# --------------------------------------------------------------------------------------------------
# PNG
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------------

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


def dicom_to_array(ds: Dataset, frame_policy: str = "middle") -> np.ndarray:
    """Return the display values of a DICOM image: decoded, LUTs applied, higher = brighter.

    1. Decode the pixel data with pydicom 3's decoders (pylibjpeg plugins for JPEG, JPEG-LS,
       JPEG 2000 and RLE), only the frame(s) needed: for multi-frame images
       (*Number of Frames* (0028,0008) > 1) ``"middle"`` decodes frame ``n // 2``;
       ``"all"`` decodes every frame.
    2. Monochrome (PS3.3 C.7.6.3.1.2): apply the modality LUT or rescale slope/intercept
       (:func:`pydicom.pixels.apply_modality_lut`, PS3.3 C.11.1), then the VOI LUT or window
       (:func:`pydicom.pixels.apply_voi_lut`, PS3.3 C.11.2), then invert MONOCHROME1 within its
       nominal output range so that higher values are brighter (in MONOCHROME1 the minimum is
       white). Float and Double Float Pixel Data (parametric maps) hold real-world values and get
       no LUT; a MONOCHROME1 float image is inverted within its own range.
    3. YBR_FULL and YBR_FULL_422 are converted to RGB with
       :func:`pydicom.pixels.convert_color_space` (PS3.3 C.7.6.3.1.2). The decoder reports the
       colour space of what it returns, so JPEG 2000 YBR_ICT/YBR_RCT (already RGB after decoding)
       and JPEG streams whose markers contradict (0028,0004) are never converted twice.
    4. PALETTE COLOR is mapped through its palette (:func:`pydicom.pixels.apply_color_lut`,
       PS3.3 C.7.6.3.1.5, C.7.9) to RGB; a palette alpha channel is dropped.

    Enhanced multi-frame images: pydicom 3.0's ``apply_modality_lut`` and ``apply_voi_lut`` read
    only top-level elements, so this function resolves, per frame, the Pixel Value Transformation
    and Frame VOI LUT macros of the Shared and Per-Frame Functional Groups Sequences (per-frame
    values win) into a small view dataset that it passes to them. Other Enhanced semantics (Real
    World Value Mapping, dimension organisation, segment frames of a SEG) are not interpreted.
    A Presentation LUT Shape (2050,0020) is not applied.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The dataset, with file meta information (its Transfer Syntax UID). It is not modified,
        and ``ds.pixel_array`` is not used because it caches the decoded array on the dataset.
    frame_policy : str
        ``"middle"`` or ``"all"``.

    Returns
    -------
    numpy.ndarray
        A new array in native byte order. ``"middle"``: (H, W) monochrome or (H, W, 3) colour.
        ``"all"``: (F, H, W) or (F, H, W, 3), with F = 1 for a single-frame image. Integer
        dtypes are kept where no LUT step ran; rescale and windowing give ``float64``.

    Raises
    ------
    ValueError
        No (7FE0,0010) *Pixel Data* (or float variant), a missing or invalid Image Pixel module
        element or Transfer Syntax UID (0002,0010), or pixel data that cannot be decoded
        (truncated, corrupt). The message names the tag.
    NotImplementedError
        Valid input this path does not support: a transfer syntax without an installed decoder,
        or a photometric interpretation other than MONOCHROME1/2, RGB, YBR_FULL(_422) and
        PALETTE COLOR, or YBR colour with more than 8 bits.
    """
    _check_frame_policy(frame_policy)
    keyword = next((kw for kw in _PIXEL_DATA_KEYWORDS if kw in ds), None)
    if keyword is None:
        raise DicomRejected(
            "no_pixel_data",
            "dataset has no PixelData (7FE0,0010), FloatPixelData (7FE0,0008) "
            "or DoubleFloatPixelData (7FE0,0009)"
        )
    _convert_attributes(ds)
    is_float = keyword != "PixelData"
    required = _REQUIRED_KEYWORDS + (() if is_float else _INTEGER_REQUIRED_KEYWORDS)
    for kw in required:
        if ds.get(kw) in (None, ""):
            raise DicomRejected("missing_image_attribute",
                                f"dataset has no {_tag_name(kw)}, which decoding {_tag_name(keyword)} needs")

    declared = str(ds.PhotometricInterpretation).strip()
    if declared not in _DECODED_PHOTOMETRIC:  # refused before decoding: the decoders reject it with their own words
        raise DicomUnsupported("unsupported_photometric", _photometric_message(declared))
    num_frames = _number_of_frames(ds)
    frames = [num_frames // 2] if frame_policy == "middle" else list(range(num_frames))
    arr, photometric = _decode(ds, keyword, index=frames[0] if frame_policy == "middle" else None)
    if frame_policy == "all" and num_frames == 1:
        arr = arr[np.newaxis]  # (1, H, W[, C]): "all" always has a frame axis
    arr = arr.astype(arr.dtype.newbyteorder("="), copy=False)  # big endian syntaxes decode as >u2

    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        if frame_policy == "middle":
            return _apply_grey_luts(arr, ds, frames[0], photometric, is_float)
        return np.stack([_apply_grey_luts(a, ds, f, photometric, is_float) for f, a in zip(frames, arr)])
    if photometric == "RGB":
        return np.ascontiguousarray(arr)
    if photometric in ("YBR_FULL", "YBR_FULL_422"):
        if arr.dtype != np.uint8:
            raise DicomUnsupported(
                "unsupported_photometric",
                f"{photometric} to RGB is supported for 8-bit samples only, not for the BitsAllocated "
                f"(0028,0100) of this file"
            )
        return convert_color_space(arr, photometric, "RGB")
    if photometric == "PALETTE COLOR":
        return _apply_palette(arr, ds)
    raise DicomUnsupported("unsupported_photometric", _photometric_message(photometric))


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


def _decode(ds: Dataset, keyword: str, index: int | None) -> tuple[np.ndarray, str]:
    """Decode one frame (or all, ``index=None``); return it and the colour space it is in.

    Decoded with ``as_rgb=False`` so that colour conversion happens in one visible place
    (:func:`dicom_to_array`); the decoder's returned Image Pixel properties say which colour space
    the array is really in (pylibjpeg-openjpeg returns YBR_ICT/YBR_RCT as RGB, and JPEG markers may
    override (0028,0004)).
    """
    file_meta = getattr(ds, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if not syntax:
        raise DicomRejected("missing_image_attribute",
                            "dataset has no TransferSyntaxUID (0002,0010) in its file meta information")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise DicomUnsupported("unsupported_transfer_syntax", f"no pixel data decoder for {_syntax_name(syntax)}") from None
    if not decoder.is_available:
        raise DicomUnsupported(
            "unsupported_transfer_syntax",
            f"no installed plugin decodes {_syntax_name(syntax)}: {decoder.missing_dependencies}"
        )
    try:
        arr, properties = decoder.as_array(ds, index=index, as_rgb=False, **as_pixel_options(ds))
    except NotImplementedError:  # pydicom's text names values of the file: not kept
        raise DicomRejected("decode_error", f"the decoder for {_syntax_name(syntax)} does not handle this "
                                            f"file's {_tag_name(keyword)} (NotImplementedError)") from None
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - corrupt data: many types, and Rust plugins panic (PanicException is no Exception)
        # The decoders' own messages are read for the reason only, never written: the message
        # names the exception type.
        text = str(exc).lower() if isinstance(exc, Exception) else ""
        truncated = any(w in text for w in ("less than expected", "truncat", "end of", "insufficient", "too short",
                                               "not enough", "premature", "missing"))
        raise DicomRejected("truncated_pixel_data" if truncated else "decode_error",
                            f"cannot decode {_tag_name(keyword)}: {type(exc).__name__}"
                            + (" (pixel data shorter than the header declares)" if truncated else "")) from exc
    return arr, str(properties.get("photometric_interpretation", ds.PhotometricInterpretation))


def _syntax_name(syntax: UID) -> str:
    """A standard transfer syntax by its UID and name (public constants); any other UID is never
    quoted (a private UID carries the site's root and can carry more)."""
    return f"TransferSyntaxUID (0002,0010) {_uid_name(syntax)}"


def _uid_name(uid) -> str:
    uid = UID(str(uid))
    if uid.name != str(uid) and uid.startswith("1.2.840.10008."):  # in pydicom's dictionary of the standard
        return f"{uid} ({uid.name})"
    return "(a private or unregistered UID, not quoted)"


def _frame_view(ds: Dataset, frame: int) -> Dataset:
    """A new dataset with the modality and VOI LUT elements that apply to `frame`.

    Top-level elements first, then the Shared Functional Groups Sequence (5200,9229), then the
    frame's item of the Per-Frame Functional Groups Sequence (5200,9230): later sources win.
    Elements are deep copies, so pydicom's functions cannot touch `ds` through the view.
    """
    view = Dataset()
    for kw in _LUT_KEYWORDS:
        if kw in ds:
            view[kw] = copy.deepcopy(ds[kw])
    sources: list[Dataset] = []
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        sources.append(shared[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame < len(per_frame):
        sources.append(per_frame[frame])
    for group in sources:
        for sequence in _FUNCTIONAL_GROUP_SEQUENCES:
            items = group.get(sequence)
            if items:
                for elem in items[0]:
                    if elem.keyword in _LUT_KEYWORDS:
                        view[elem.tag] = copy.deepcopy(elem)
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is not None:
        view.file_meta = file_meta  # read only: the byte order of OW LUT Data comes from its syntax
    return view


def _apply_grey_luts(
    frame: np.ndarray, ds: Dataset, index: int, photometric: str, is_float: bool
) -> np.ndarray:
    """Modality LUT, VOI LUT and MONOCHROME1 inversion for one (H, W) frame."""
    # `frame` is freshly decoded, never the caller's data, so it may be returned as is.
    if is_float:
        if photometric == "MONOCHROME1":
            finite = frame[np.isfinite(frame)]
            if finite.size:
                return _invert(frame, float(finite.min()), float(finite.max()))
        return frame
    view = _frame_view(ds, index)
    out = apply_modality_lut(frame, view)
    try:
        out = apply_voi_lut(out, view)
    except ValueError as exc:  # e.g. Window Width < 1: suspicious, but the pixels are usable
        logger.warning("VOI LUT (0028,1050-1056, 0028,3010) not applied (%s)", type(exc).__name__)
    if photometric == "MONOCHROME1":
        lo, hi = _nominal_range(view)
        out = _invert(out, lo, hi)
    return out


def _lut_depth(view: Dataset, sequence: str) -> int | None:
    """Bits per entry of the first LUT in `sequence`, when it is a usable LUT (else None)."""
    items = view.get(sequence)
    if not items:
        return None
    item = items[0]
    if item.get("LUTDescriptor") is None or item.get("LUTData") is None:
        return None
    return int(item.LUTDescriptor[2])


def _nominal_range(view: Dataset) -> tuple[float, float]:
    """Range of values after the modality and VOI steps, which MONOCHROME1 is inverted within.

    Mirrors pydicom: a VOI LUT outputs [0, 2^bits - 1]; windowing outputs the range the modality
    step outputs (PS3.3 C.11.2.1.2); a modality LUT outputs [0, 2^bits - 1]; rescale maps the
    stored range [0, 2^BitsStored - 1] (signed: [-2^(BitsStored-1), 2^(BitsStored-1) - 1]).
    """
    depth = _lut_depth(view, "VOILUTSequence") or _lut_depth(view, "ModalityLUTSequence")
    if depth is not None:
        return 0.0, float(2**depth - 1)
    bits = int(view.BitsStored)
    if int(view.PixelRepresentation) == 0:
        lo, hi = 0.0, float(2**bits - 1)
    else:
        lo, hi = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    if "RescaleSlope" in view and "RescaleIntercept" in view:
        slope, intercept = float(view.RescaleSlope), float(view.RescaleIntercept)
        lo, hi = sorted((lo * slope + intercept, hi * slope + intercept))
    return lo, hi


def _invert(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``lo + hi - arr``: the brightest value becomes the darkest; integer dtypes are kept."""
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        if info.min <= lo and hi <= info.max and lo == int(lo) and hi == int(hi):
            out = np.clip(int(lo) + int(hi) - arr.astype(np.int64), int(lo), int(hi))
            return out.astype(arr.dtype)
    return lo + hi - arr.astype(np.float64)


def _apply_palette(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """PALETTE COLOR -> RGB through the Palette Color Lookup Table (PS3.3 C.7.6.3.1.5)."""
    palette = ds
    little_endian = ds.file_meta.TransferSyntaxUID.is_little_endian
    if not little_endian and any(kw in ds for kw in _PALETTE_DATA_KEYWORDS):
        # pydicom 3.0.2's apply_color_lut reads (non-segmented) OW LUT Data in the machine's byte
        # order, which swaps 16-bit entries from big endian files; give it little endian copies.
        palette = Dataset()
        for elem in ds.group_dataset(0x0028):
            palette[elem.tag] = copy.deepcopy(elem)
        if "PixelPresentation" in ds:
            palette.PixelPresentation = ds.PixelPresentation
        for kw in _PALETTE_DATA_KEYWORDS:
            data = palette.get(kw)
            if isinstance(data, bytes) and len(data) % 2 == 0:
                palette[kw].value = np.frombuffer(data, dtype=">u2").astype("<u2").tobytes()
        palette.file_meta = ds.file_meta
    rgb = apply_color_lut(arr, palette)  # (..., 3) or (..., 4) with an alpha LUT
    return np.ascontiguousarray(rgb[..., :3])


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
    keyword = next((kw for kw in _PIXEL_DATA_KEYWORDS if kw in ds), None)
    if keyword is None:
        dicom_to_array(ds, frame_policy)  # raises its no_pixel_data rejection
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


# -- the Part 10 byte structure, checked before pydicom parses it ---------------------------------

MAX_SEQUENCE_DEPTH = 64  # sequences nested deeper are refused (nesting_too_deep); real files nest a few levels
INFLATE_STEP = 1 << 20  # a deflated dataset is inflated this many bytes at a time
# the most a deflate stream can expand (RFC 1951: a 258-byte match per 2 bits at best, about 1032:1)
_DEFLATE_MAX_RATIO = 1032
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
# explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2); the others have a 2-byte length
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split())
_IMPLICIT_LE, _EXPLICIT_BE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"
_DEFLATED = "1.2.840.10008.1.2.1.99"
_EXPLICIT_LE_VALUE = b"1.2.840.10008.1.2.1\x00"  # even length, NUL padded (PS3.5 9.1)


@dataclass(frozen=True)
class Part10:
    """What :func:`check_part10` found: the bytes pydicom is to parse (a deflated dataset comes
    back inflated, its file meta naming Explicit VR Little Endian, which the inflated bytes are)."""

    data: Any  # bytes, or a BytesIO holding the inflated file
    transfer_syntax: str
    inflated_bytes: int = 0


def check_part10(data, limits: DicomLimits | None = None) -> Part10:
    """Check a DICOM Part 10 file's byte structure before anything parses it; raise
    :class:`DicomRejected` with the reason, in our words:

    * ``not_dicom``: no "DICM" prefix after the 128-byte preamble;
    * ``parse_error``: file meta information (group 0002) that cannot be read (an invalid VR, a
      length past the end, no Transfer Syntax UID), an element with an invalid VR, a length past
      the end of its sequence or item, a broken item structure, a deflated stream that is not one;
    * ``truncated_file``: an element (other than the pixel data) whose declared length runs past
      the end of the file, or a sequence or item never closed before it ends;
    * ``truncated_pixel_data``: the top-level pixel data runs past the end of the file;
    * ``nesting_too_deep``: sequences nested deeper than :data:`MAX_SEQUENCE_DEPTH`;
    * ``file_too_large``: a deflated dataset that inflates past ``limits.max_inflated_bytes``.

    pydicom reads an element whose length runs past the end as a short value without a word, and
    inflates a deflated dataset whole: after this check every length it reads lies inside the file.
    The walk is iterative (no recursion) and reads only headers: about 1 us per element."""
    limits = limits or DicomLimits()
    view = memoryview(data)
    if len(view) < DICOM_PREFIX_OFFSET + 4 or bytes(view[DICOM_PREFIX_OFFSET:DICOM_PREFIX_OFFSET + 4]) != b"DICM":
        raise DicomRejected("not_dicom", "not a DICOM Part 10 file (PS3.10 7.1): no 'DICM' prefix after the "
                                         "128-byte preamble")
    meta_end, syntax, ts_at, gl_at = _walk_file_meta(view)
    if syntax == _DEFLATED:
        buf = io.BytesIO()
        buf.write(_meta_as_explicit_le(view, meta_end, ts_at, gl_at))
        start = buf.tell()
        _inflate(view, meta_end, limits.max_inflated_bytes, buf)
        size = buf.tell() - start
        with buf.getbuffer() as inflated:
            cut = _walk_dataset(inflated, start, implicit=False, little=True)
        if cut is not None:
            buf.truncate(cut)
        buf.seek(0)
        return Part10(buf, syntax, size)
    cut = _walk_dataset(view, meta_end, implicit=syntax == _IMPLICIT_LE, little=syntax != _EXPLICIT_BE)
    return Part10(data if cut is None else bytes(view[:cut]), syntax)


def _walk_file_meta(view: memoryview) -> tuple[int, str, tuple[int, int], int | None]:
    """(end of the file meta, its Transfer Syntax UID, (offset, length) of that value, offset of
    the group length value or None). Group 0002 is always explicit VR little endian (PS3.10 7.1)."""
    pos, end, syntax, ts_at, gl_at = DICOM_PREFIX_OFFSET + 4, len(view), None, None, None
    while pos + 8 <= end:
        group, elem = struct.unpack_from("<HH", view, pos)
        if group != 0x0002:
            break
        vr = bytes(view[pos + 4:pos + 6])
        if vr in _LONG_VRS:
            if pos + 12 > end:
                break
            (length,), head = struct.unpack_from("<L", view, pos + 8), 12
        elif vr in _SHORT_VRS:
            (length,), head = struct.unpack_from("<H", view, pos + 6), 8
        else:
            raise DicomRejected("parse_error", "the file meta information (0002,xxxx) cannot be parsed: an element "
                                               "has an invalid value representation")
        if length == _UNDEFINED or pos + head + length > end:
            raise DicomRejected("parse_error", "the file meta information (0002,xxxx) cannot be parsed: an element's "
                                               "length runs past the end of the file")
        if elem == 0x0010:
            if vr != b"UI":
                raise DicomRejected("parse_error", "TransferSyntaxUID (0002,0010) has the wrong value representation")
            syntax = bytes(view[pos + head:pos + head + length]).rstrip(b"\x00 ").decode("ascii", "replace")
            ts_at = (pos + head, length)
        elif elem == 0x0000 and vr == b"UL" and length == 4:
            gl_at = pos + head
        pos += head + length
    else:
        if pos != end:
            raise DicomRejected("parse_error", "the file meta information (0002,xxxx) cannot be parsed: the file "
                                               "ends inside it")
    if syntax is None:
        raise DicomRejected("parse_error", "the file meta information has no TransferSyntaxUID (0002,0010)")
    return pos, syntax, ts_at, gl_at


def _meta_as_explicit_le(view: memoryview, meta_end: int, ts_at: tuple[int, int], gl_at: int | None) -> bytes:
    """The preamble and file meta, with Explicit VR Little Endian as the transfer syntax (what an
    inflated deflated dataset is) and the group length corrected."""
    at, length = ts_at
    head = bytearray(view[:meta_end])
    head[at - 2:at + length] = struct.pack("<H", len(_EXPLICIT_LE_VALUE)) + _EXPLICIT_LE_VALUE
    if gl_at is not None:
        (group_length,) = struct.unpack_from("<L", head, gl_at)
        struct.pack_into("<L", head, gl_at, max(0, group_length + len(_EXPLICIT_LE_VALUE) - length))
    return bytes(head)


def _inflate(view: memoryview, start: int, limit: int, out: io.BytesIO) -> None:
    """The raw deflate stream after the file meta, inflated into ``out`` ``INFLATE_STEP`` bytes at
    a time and never past ``limit`` (0: no limit): when the compressed size could inflate past it,
    a first pass counts without keeping anything, so a bomb costs CPU, never memory."""
    compressed = view[start:]

    def inflate(keep: io.BytesIO | None) -> None:
        d, total, tail = zlib.decompressobj(-zlib.MAX_WBITS), 0, compressed
        try:
            while True:
                block = d.decompress(tail, INFLATE_STEP)
                tail = d.unconsumed_tail
                total += len(block)
                if limit and total > limit:
                    raise DicomRejected("file_too_large", f"the deflated dataset inflates past the {limit}-byte "
                                                          "limit on inflated data (--max_file_bytes); not decoded")
                if keep is not None:
                    keep.write(block)
                if d.eof or (not block and not tail):
                    break
        except zlib.error:
            raise DicomRejected("parse_error", "the deflated dataset (1.2.840.10008.1.2.1.99) is not a valid "
                                               "deflate stream") from None
        if not d.eof:
            raise DicomRejected("truncated_file", "the deflated dataset (1.2.840.10008.1.2.1.99) ends before its "
                                                  "deflate stream does")

    if limit and len(compressed) * _DEFLATE_MAX_RATIO > limit:
        inflate(None)
    inflate(out)


def _walk_dataset(view, pos: int, implicit: bool, little: bool) -> int | None:
    """Every element header of the dataset from ``pos`` to the end of ``view``: lengths inside the
    file and inside their sequence or item, items well formed, nesting bounded. Raises
    :class:`DicomRejected`; the values are never read. Returns None, or where to cut the file:
    bytes after the top-level pixel data that do not parse (zero padding or junk some writers
    leave, which pydicom tolerates) are dropped rather than refused."""
    try:
        _walk(view, pos, implicit, little)
    except _AfterPixels as cut:
        return cut.at
    return None


class _AfterPixels(Exception):
    def __init__(self, at: int) -> None:
        self.at = at


def _walk(view, pos: int, implicit: bool, little: bool) -> None:
    from pydicom.datadict import dictionary_VR

    end = len(view)
    order = "<" if little else ">"
    tag_len = struct.Struct(order + "HHL")
    short_len, long_len = struct.Struct(order + "H"), struct.Struct(order + "L")
    # frames: [kind, end offset or None (undefined length), implicit, limit (nearest defined end)]
    stack: list[list] = [["dataset", None, implicit, end]]
    depth, pixels_end = 0, None

    def past_end(what: str, pixels: bool = False) -> Exception:
        if pixels_end is not None and len(stack) == 1:
            return _AfterPixels(pixels_end)
        if pixels:
            return DicomRejected("truncated_pixel_data", f"{what}: the file ends inside the pixel data "
                                                         "(shorter than the header declares)")
        return DicomRejected("truncated_file", f"{what}: the file ends before it (an element's declared length "
                                               "runs past the end of the file)")

    def broken(what: str) -> Exception:
        if pixels_end is not None and len(stack) == 1:
            return _AfterPixels(pixels_end)
        return DicomRejected("parse_error", f"the dataset cannot be parsed: {what}")

    while True:
        kind, cend, impl, limit = stack[-1]
        if cend is not None and pos >= cend:
            if pos > cend:
                raise broken("an element runs past the end of its item or sequence")
            if len(stack) == 1:
                return
            if stack.pop()[0] == "sequence":
                depth -= 1
            continue
        if pos + 8 > end:
            if len(stack) == 1:
                return  # fewer than 8 bytes left after the last element: pydicom stops there too
            raise past_end("a sequence or item is not closed", pixels=kind == "fragments" and len(stack) == 2)
        group, elem, length = tag_len.unpack_from(view, pos)
        tag = group << 16 | elem
        if kind in ("sequence", "fragments"):
            pixels = kind == "fragments" and len(stack) == 2
            if tag == _SEQUENCE_END:
                pos += 8
                if stack.pop()[0] == "sequence":
                    depth -= 1
                elif pixels:
                    pixels_end = pos
                continue
            if tag != _ITEM:
                if pixels:
                    raise DicomRejected("decode_error", "the encapsulated pixel data is not a sequence of items")
                raise broken("a sequence holds something other than items")
            pos += 8
            if kind == "fragments":
                if length == _UNDEFINED:
                    raise DicomRejected("decode_error", "a fragment of the encapsulated pixel data has no length")
                if pos + length > end:
                    raise past_end("a pixel data fragment", pixels=pixels)
                pos += length
                continue
            if length == _UNDEFINED:
                stack.append(["item", None, impl, limit])
            else:
                if pos + length > end:
                    raise past_end("a sequence item")
                if pos + length > limit:
                    raise broken("an item runs past the end of its sequence")
                stack.append(["item", pos + length, impl, pos + length])
            continue
        if tag == _ITEM_END:
            if kind != "item" or cend is not None:
                raise broken("an item delimiter outside an item of undefined length")
            pos += 8
            stack.pop()
            continue
        if tag in (_ITEM, _SEQUENCE_END):
            raise broken("an item or sequence delimiter where an element belongs")
        if impl:
            head, vr = 8, None
            if length != _UNDEFINED:
                try:
                    vr = dictionary_VR(tag)
                except KeyError:  # private or unknown: skipped by its length
                    vr = None
        else:
            vr = bytes(view[pos + 4:pos + 6])
            if vr in _LONG_VRS:
                if pos + 12 > end:
                    raise past_end("an element header")
                (length,), head = long_len.unpack_from(view, pos + 8), 12
            elif vr in _SHORT_VRS:
                (length,), head = short_len.unpack_from(view, pos + 6), 8
            else:
                raise broken("an element has an invalid value representation")
            vr = vr.decode("ascii")
        start = pos + head
        top_pixels = tag in _PIXEL_TAGS and len(stack) == 1
        if length == _UNDEFINED:
            if tag in _PIXEL_TAGS:
                stack.append(["fragments", None, impl, limit])
            elif vr in (None, "SQ", "UN"):  # an undefined-length UN is a sequence in implicit VR LE (PS3.5 6.2.2)
                depth += 1
                if depth > MAX_SEQUENCE_DEPTH:
                    raise DicomRejected("nesting_too_deep", f"sequences are nested deeper than {MAX_SEQUENCE_DEPTH} "
                                                            "levels")
                stack.append(["sequence", None, impl or vr == "UN", limit])
            else:
                raise broken("an element that is not a sequence has an undefined length")
            pos = start
            continue
        if start + length > end:
            raise past_end("an element" if not top_pixels else "the pixel data", pixels=top_pixels)
        if start + length > limit:
            raise broken("an element runs past the end of its item or sequence")
        if vr == "SQ":
            depth += 1
            if depth > MAX_SEQUENCE_DEPTH:
                raise DicomRejected("nesting_too_deep", f"sequences are nested deeper than {MAX_SEQUENCE_DEPTH} levels")
            stack.append(["sequence", start + length, impl, start + length])
            pos = start
            continue
        pos = start + length
        if top_pixels:
            pixels_end = pos


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


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------


def load_image_file(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one image file as an array, choosing the reader by content.

    * "DICM" at byte 128 (PS3.10 7.1), or a ``.dcm`` suffix: :func:`read_dicom`, middle frame.
    * the PNG signature: :func:`read_png`.
    * the NumPy ``.npy`` magic, or a ``.npy`` suffix: :func:`numpy.load` with
      ``allow_pickle=False``.

    Raises
    ------
    ValueError
        ``"unsupported image file type"`` for anything else, and whatever the reader raises.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(DICOM_PREFIX_OFFSET + 4)
    suffix = path.suffix.lower()
    if head[DICOM_PREFIX_OFFSET:] == b"DICM" or suffix == ".dcm":
        return read_dicom(path, frame_policy="middle")
    if head.startswith(PNG_SIGNATURE):
        return read_png(path)
    if head.startswith(NPY_MAGIC) or suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ValueError(f"cannot read .npy image: {exc}") from exc
        if not isinstance(arr, np.ndarray):
            raise ValueError("a .npy image file must hold a single array")
        return arr
    raise ValueError(
        f"unsupported image file type (suffix {suffix or 'none'!r}): expected DICOM, PNG or .npy"
    )
