"""The DICOM Part 10 byte structure, checked before pydicom parses it (PS3.10 7.1, PS3.5 7).

:func:`check_part10` walks the file meta information, every element's declared length against the
end of the file and of its sequence or item, and the nesting depth, and inflates a deflated
dataset in bounded chunks against ``DicomLimits.max_inflated_bytes``. Only headers are read.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from .limits import DicomLimits, DicomRejected

DICOM_PREFIX_OFFSET = 128  # PS3.10 section 7.1: 128-byte preamble, then "DICM"

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


def check_part10(data: bytes | bytearray | memoryview, limits: DicomLimits | None = None) -> Part10:
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


def _walk_dataset(view: memoryview, pos: int, implicit: bool, little: bool) -> int | None:
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


def _walk(view: memoryview, pos: int, implicit: bool, little: bool) -> None:
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
