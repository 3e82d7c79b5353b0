"""How a DICOM file is refused, and what it may cost before it is decoded.

:class:`DicomRejected` (a ``ValueError``) for input that will not become an image,
:class:`DicomUnsupported` (a ``NotImplementedError``) for valid input this path does not handle,
:class:`DicomLimits` for the pixel budget and the limit on inflated data.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError


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
