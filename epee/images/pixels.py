"""DICOM pixels to display values: decode, then the PS3.3 C.11 transforms (modality LUT, VOI LUT,
MONOCHROME1 inversion) and colour conversion (PS3.3 C.7.6.3), with pydicom's own functions."""

from __future__ import annotations

import copy
import logging
import struct

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import parse_fragments
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi_lut,
    as_pixel_options,
    convert_color_space,
    get_decoder,
)
from pydicom.pixels.processing import apply_presentation_lut
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID

from .attributes import (
    _DECODED_PHOTOMETRIC,
    _FUNCTIONAL_GROUP_SEQUENCES,
    _INTEGER_REQUIRED_KEYWORDS,
    _LUT_KEYWORDS,
    _PALETTE_DATA_KEYWORDS,
    _REQUIRED_KEYWORDS,
    _check_frame_policy,
    _convert_attributes,
    _number_of_frames,
    _photometric_message,
    _pixel_data_keyword,
    _syntax_name,
    _tag_name,
)
from .limits import DicomRejected, DicomUnsupported

logger = logging.getLogger(__name__)

# Presentation LUT module (PS3.3 C.11.6): a MONOCHROME2 image's P-values
_PRESENTATION_KEYWORDS = ("PresentationLUTSequence", "PresentationLUTShape")


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
    A MONOCHROME2 image's Presentation LUT (Presentation LUT Sequence (2050,0010) or Shape
    (2050,0020), PS3.3 C.11.4) is applied last, with :func:`pydicom.pixels.apply_presentation_lut`;
    a MONOCHROME1 image's Shape INVERSE states the inversion above (PS3.3 C.8.11.6.1.2), which is
    not applied twice.

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
    keyword = _pixel_data_keyword(ds)
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
        # the decoders' messages may quote values: ours names the exception type only
        truncated = _shorter_than_declared(ds, keyword, UID(str(syntax)))
        raise DicomRejected("truncated_pixel_data" if truncated else "decode_error",
                            f"cannot decode {_tag_name(keyword)}: {type(exc).__name__}"
                            + (" (pixel data shorter than the header declares)" if truncated else "")) from exc
    return arr, str(properties.get("photometric_interpretation", ds.PhotometricInterpretation))


def _shorter_than_declared(ds: Dataset, keyword: str, syntax: UID) -> bool:
    """Whether the pixel data holds fewer bytes than its header declares: native (uncompressed)
    data shorter than :func:`pydicom.pixels.utils.get_expected_length`, or encapsulated data
    whose last fragment item (PS3.5 A.4, found by :func:`pydicom.encaps.parse_fragments`) runs
    past the end of the value."""
    try:
        value = ds[keyword].value
        if not syntax.is_encapsulated:
            return len(value) < get_expected_length(ds)
        _, offsets = parse_fragments(value)
        if not offsets:
            return False
        (length,) = struct.unpack_from("<L", value, offsets[-1] + 4)
        return offsets[-1] + 8 + length > len(value)
    except Exception:  # noqa: BLE001 - an attribute that does not convert, items that do not parse: not this reason
        return False


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
        return _invert(out, lo, hi)
    return _apply_presentation(out, ds)


def _apply_presentation(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """The Presentation LUT of a MONOCHROME2 frame (PS3.3 C.11.4): IDENTITY returns `arr` as it
    is. A value pydicom does not handle is suspicious but usable: logged, never quoted, not applied."""
    if not any(kw in ds for kw in _PRESENTATION_KEYWORDS):
        return arr
    view = Dataset()
    for kw in _PRESENTATION_KEYWORDS:
        if kw in ds:
            view[kw] = copy.deepcopy(ds[kw])
    try:
        return apply_presentation_lut(arr, view)
    except Exception as exc:  # noqa: BLE001 - pydicom's NotImplementedError quotes the value
        logger.warning("Presentation LUT (2050,0010, 2050,0020) not applied (%s)", type(exc).__name__)
        return arr


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
