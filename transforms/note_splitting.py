"""Splitting a note file's bytes into lines and JSON array elements, streamed and bounded: only
the piece being read is held, and a piece over the limit is skipped (given as ``None``) without
ever being held whole. Pure functions of a binary stream; no Beam."""

from __future__ import annotations

import re
from typing import Iterator


def bounded_lines(fh, max_line: int, chunk: int = 1 << 20) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line bytes without the newline) for each line of a binary file, reading
    ``chunk`` bytes at a time; a line longer than ``max_line`` is skipped and given as ``None``,
    so one huge line never sits in memory whole."""
    n, buf, skipping = 0, b"", False
    while True:
        block = fh.read(chunk)
        if not block:
            break
        buf += block
        start = 0
        while True:
            cut = buf.find(b"\n", start)
            if cut < 0:
                break
            line = buf[start:cut]
            start = cut + 1
            n += 1
            yield n, (None if skipping or len(line) > max_line else line)
            skipping = False
        buf = buf[start:]
        if len(buf) > max_line:  # inside an over-long line: drop what we have, remember it
            buf, skipping = b"", True
    if buf or skipping:
        n += 1
        yield n, (None if skipping or len(buf) > max_line else buf)


_JSON_TOKEN = re.compile(rb'["\[\]{},]')
_JSON_IN_STRING = re.compile(rb'["\\]')


def json_array_elements(fh, max_value: int, chunk: int = 1 << 20) -> Iterator[tuple[int, bytes | None]]:
    """(element number, its bytes) for each element of the JSON array a binary file holds,
    streamed ``chunk`` bytes at a time: only the element being read is held; an element longer
    than ``max_value`` is skipped and given as ``None``. Splits at the array's own commas (strings
    and nesting followed); each element is then parsed on its own, so a broken one costs itself
    (a broken nesting can cost the rest of the array). The bytes after the closing ``]``, if any
    besides whitespace, come last as one more element, which will not parse."""
    buf, pos, start, depth = b"", 0, 0, 0
    in_str = esc = skipping = opened = closed = False
    n = 0
    while True:
        block = fh.read(chunk)
        if not block:
            break
        buf += block
        while pos < len(buf):
            if closed:
                pos = len(buf)
                break
            if esc:
                pos, esc = pos + 1, False
                continue
            m = (_JSON_IN_STRING if in_str else _JSON_TOKEN).search(buf, pos)
            if m is None:
                pos = len(buf)
                break
            c, pos = buf[m.start()], m.end()
            if in_str:
                if c == 0x22:
                    in_str = False
                else:
                    esc = True
            elif c == 0x22:
                in_str = True
            elif c in b"[{":
                if not opened:
                    opened, depth, start = True, 1, pos
                else:
                    depth += 1
            elif c in b"]}":
                depth -= 1
                if depth == 0:
                    element = buf[start:m.start()]
                    if skipping or element.strip() or n:
                        n += 1
                        yield n, (None if skipping or len(element) > max_value else element)
                    skipping, closed, start = False, True, pos
            elif c == 0x2C and depth == 1:
                n += 1
                element = buf[start:m.start()]
                yield n, (None if skipping or len(element) > max_value else element)
                skipping, start = False, pos
        if closed:  # what follows the array: kept only if it is more than whitespace
            rest = buf[start:].strip()
            buf, pos, start = rest[:max_value + 1], len(rest[:max_value + 1]), 0
            continue
        buf, pos, start = buf[start:], pos - start, 0
        if len(buf) > max_value:
            buf, pos, skipping = b"", 0, True
    if closed:
        if buf.strip():
            yield n + 1, (None if len(buf) > max_value else buf)
    elif opened:  # the file ends inside the array: what is left is one element that cannot parse
        yield n + 1, (None if skipping else buf[start:] + b"\x00")
