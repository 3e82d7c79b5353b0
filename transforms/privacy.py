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
import os
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


class Pseudonymizer:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def __call__(self, value: str | None) -> str | None:
        if value is None:
            return None
        return hmac.new(self._key, value.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:32]

    def row(self, row: dict) -> dict:
        return {k: (self(v) if k in ID_FIELDS else v) for k, v in row.items()}
