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

The package, one responsibility a module:

* :mod:`.arrays`: :class:`ImageSettings` and the generic pixel functions (:func:`preprocess`);
* :mod:`.files`: :func:`read_png`, :func:`read_dicom`, :func:`load_image_file`;
* :mod:`.part10`: :func:`check_part10`, the byte structure;
* :mod:`.attributes`: image attribute conversion and naming, :func:`check_dicom`;
* :mod:`.pixels`: :func:`dicom_to_array`, decoding and the PS3.3 C.11 transforms;
* :mod:`.limits`: :class:`DicomLimits` and the two failure types.
"""

from __future__ import annotations

from .arrays import (
    BT601_LUMA,
    CHANNEL_COUNTS,
    FRAME_POLICIES,
    ImageSettings,
    preprocess,
    resize,
    to_channels,
    to_unit_range,
)
from .attributes import (
    NON_IMAGE_SOP_CLASSES,
    PHOTOMETRIC_TERMS,
    RT_IMAGE_STORAGE,
    SUPPORTED_PHOTOMETRIC,
    check_dicom,
)
from .files import NPY_MAGIC, PNG_SIGNATURE, load_image_file, read_dicom, read_png
from .limits import DicomLimits, DicomRejected, DicomUnsupported
from .part10 import DICOM_PREFIX_OFFSET, INFLATE_STEP, MAX_SEQUENCE_DEPTH, Part10, check_part10
from .pixels import dicom_to_array

__all__ = [
    "BT601_LUMA", "CHANNEL_COUNTS", "DICOM_PREFIX_OFFSET", "FRAME_POLICIES", "INFLATE_STEP", "MAX_SEQUENCE_DEPTH",
    "NON_IMAGE_SOP_CLASSES", "NPY_MAGIC", "PHOTOMETRIC_TERMS", "PNG_SIGNATURE", "RT_IMAGE_STORAGE",
    "SUPPORTED_PHOTOMETRIC", "DicomLimits", "DicomRejected", "DicomUnsupported", "ImageSettings", "Part10",
    "check_dicom", "check_part10", "dicom_to_array", "load_image_file", "preprocess", "read_dicom", "read_png",
    "resize", "to_channels", "to_unit_range",
]
