"""Pseudonymised identifiers (``--pseudonymize_ids``): a keyed HMAC in place of record ids and URIs.

Record ids of notes are often medical record numbers, and the paths of DICOM archives hold
patient ids and UIDs. With ``--pseudonymize_ids`` every output (predictions, dead letters, the
inputs table and the manifest) carries ``HMAC-SHA256(key, value)`` (hex, 32 characters) instead:
stable across runs with the same key, so outputs can be joined, and reversible only by whoever
holds the key and the original values.

The key never travels on the command line or inside the pipeline graph (which runners upload and
show): the graph holds only *where* the key is, the environment variable ``EPEE_PSEUDONYM_KEY`` or
a secret file given by ``--pseudonym_key_file`` (local path or any Beam file system), and each
worker reads it when it starts.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import sys
from dataclasses import dataclass

KEY_ENV = "EPEE_PSEUDONYM_KEY"
MIN_KEY_BYTES = 16
ID_FIELDS = ("record_id", "source_uri", "uri")


class PseudonymKeyError(ValueError):
    """The pseudonymisation key is missing or too short."""


@dataclass(frozen=True)
class KeySource:
    """Where the key is read from: a secret file if given, else the environment variable."""

    key_file: str | None = None
    env_var: str = KEY_ENV

    def load(self) -> bytes:
        if self.key_file:
            from apache_beam.io.filesystems import FileSystems

            try:
                with FileSystems.open(self.key_file) as fh:
                    key = fh.read().strip()
            except Exception as exc:  # noqa: BLE001 - any failure: no key
                raise PseudonymKeyError(f"--pseudonym_key_file {self.key_file}: cannot read it ({type(exc).__name__})") from None
        else:
            key = os.environ.get(self.env_var, "").strip().encode()
            if not key:
                raise PseudonymKeyError(f"--pseudonymize_ids needs a key: set the environment variable {self.env_var} "
                                "or pass --pseudonym_key_file PATH (never the key itself on the command line)")
        if len(key) < MIN_KEY_BYTES:
            raise PseudonymKeyError(f"the pseudonymisation key must be at least {MIN_KEY_BYTES} bytes long")
        return key

    def pseudonymizer(self) -> "Pseudonymizer":
        """The key's pseudonymizer, for a worker or the launcher; from now on this process's log
        records carry pseudonymised paths too (:func:`scrub_logs`), whoever logs them."""
        pz = Pseudonymizer(self.load())
        scrub_logs(pz)
        return pz


class Pseudonymizer:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def __call__(self, value: str | None) -> str | None:
        if value is None:
            return None
        return hmac.new(self._key, value.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:32]

    def row(self, row: dict) -> dict:
        return {k: (self(v) if k in ID_FIELDS else v) for k, v in row.items()}

    def path(self, path: str | None) -> str | None:
        """A path or file pattern with every component replaced by its pseudonym (the scheme, the
        separators, and components that are only wildcards and extensions such as ``*.dcm`` or
        ``**`` are kept): ``/archive/DOE^JOHN_12345/*.dcm`` -> ``/p-3fa1.../p-9c0e.../*.dcm``.
        Archives name folders after patients and MRNs, so a path is as identifying as an id."""
        if path is None:
            return None
        scheme, rest = _split_scheme(path)
        return scheme + "/".join(c if (not c or _PUBLIC_COMPONENT.fullmatch(c)) else f"p-{self(c)[:16]}"
                                 for c in rest.split("/"))


_PUBLIC_COMPONENT = re.compile(r"[*?]+(\.[A-Za-z0-9]{1,10})*|\.{1,2}")  # "*", "**", "*.dcm", "*.jsonl.gz", ".", ".."


def _split_scheme(path: str) -> tuple[str, str]:
    m = re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", path)
    return (m.group(0), path[m.end():]) if m else ("", path)


def printable(path: str) -> str:
    """A file name as text that can be written anywhere (Parquet, JSON, logs). Bytes that are not
    UTF-8 (a Latin-1 file name from an old PACS export, which Python holds as surrogate escapes)
    are written as backslash-x escapes, and so are control characters (a newline in a name). The
    same name always gives the same text, so ids, sorting and hashing stay stable."""
    if _CLEAN.fullmatch(path):
        return path
    text = os.fsencode(path).decode("utf-8", "backslashreplace") if _has_surrogates(path) else path
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group(0)):02x}", text)


_CLEAN = re.compile(r"[^\x00-\x1f\x7f\ud800-\udfff]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


class PathWriter:
    """How paths are written by one run: always :func:`printable`; with ``--pseudonymize_ids``
    also pseudonymised, component by component. The one function every path that leaves a reader
    or reaches the manifest, report or a log goes through."""

    def __init__(self, pz: Pseudonymizer | None = None) -> None:
        self.pz = pz

    def __call__(self, path: str | None) -> str | None:
        if path is None:
            return None
        text = printable(path)
        return self.pz.path(text) if self.pz is not None else text


# -- logs ------------------------------------------------------------------------------------------
# A path or URI inside a log message: a scheme or a leading "/" at the start of a token.
_PATH_IN_TEXT = re.compile(r"(?<![\w.~])(?:[A-Za-z][A-Za-z0-9+.-]*://|/)[^\s'\"<>,;()\[\]{}]+")
_scrubbing: list[Pseudonymizer] = []


def _own_paths() -> tuple[str, ...]:
    """Where Python and this package live: their paths name no patient, and tracebacks stay readable."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return tuple({sys.prefix, sys.base_prefix, sys.exec_prefix, here} - {""})


def scrub_text(text: str, pz: Pseudonymizer) -> str:
    """Every path or URI in ``text`` pseudonymised component by component (Python's and this
    package's own files kept)."""
    own = _own_paths()

    def one(m: re.Match) -> str:
        path = m.group(0)
        return path if path.startswith(own) else pz.path(printable(path))

    return _PATH_IN_TEXT.sub(one, text)


def scrub_logs(pz: Pseudonymizer) -> None:
    """With ``--pseudonymize_ids``, every log record made in this process from now on (ours,
    Beam's, pydicom's, warnings captured by logging) has the paths in its message and traceback
    pseudonymised before any handler sees it: Beam's file systems log the paths they touch at
    DEBUG level, and archives name folders after patients. Installed once per process."""
    if _scrubbing:
        _scrubbing[0] = pz
        return
    _scrubbing.append(pz)
    make = logging.getLogRecordFactory()

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = make(*args, **kwargs)
        key = _scrubbing[0]
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record: let logging report it as usual
            return record
        record.msg, record.args = scrub_text(message, key), ()
        if record.exc_info and not record.exc_text:
            record.exc_text = scrub_text(logging.Formatter().formatException(record.exc_info), key)
        return record

    logging.setLogRecordFactory(factory)
