"""Rows of a table (JSONL, CSV or Parquet; local, ``s3://`` or ``gs://``) as dicts.

Error messages name rows and fields, never the text in them.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import IO, Any

def open_uri(uri: str, mode: str = "rb", s3_client_kwargs: dict[str, Any] | None = None) -> IO[Any]:
    """Open a local path or an ``s3://`` / ``gs://`` URI (smart-open); ``s3_client_kwargs`` are
    boto3 client arguments for s3:// (``endpoint_url``, ...; boto3's own settings otherwise)."""
    if "://" in uri:
        from smart_open import open as smart_open

        params = {}
        if s3_client_kwargs and uri.startswith("s3://"):
            import boto3

            params = {"client": boto3.client("s3", **s3_client_kwargs)}
        return smart_open(uri, mode, transport_params=params)
    return open(uri, mode)


def _suffix(uri: str) -> str:
    name = uri.rsplit("/", 1)[-1].lower()
    for ext in (".jsonl", ".ndjson", ".json", ".csv", ".parquet", ".npz"):
        if name.endswith(ext):
            return ext
    return Path(name).suffix


def read_records(uri: str, data: bytes | None = None) -> list[dict[str, Any]]:
    """Rows of a JSONL, CSV or Parquet file as dicts; ``data``: the file's bytes, already read
    (``uri`` then only names it)."""
    ext = _suffix(uri)

    def opened():
        return io.BytesIO(data) if data is not None else open_uri(uri, "rb")

    if ext in (".jsonl", ".ndjson", ".json"):
        rows = []
        with opened() as fh:
            for n, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                try:
                    rows.append(json.loads(raw))
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise ValueError(f"{uri}: line {n} is not valid JSON ({type(exc).__name__})") from None
        return rows
    if ext == ".csv":
        with opened() as fh:
            text = io.TextIOWrapper(fh, encoding="utf-8", newline="")
            return list(csv.DictReader(text))
    if ext == ".parquet":
        import pyarrow.parquet as pq

        with opened() as fh:
            return pq.read_table(fh).to_pylist()
    raise ValueError(f"{uri}: unsupported file type {ext!r}; use .jsonl, .csv or .parquet")


def _field(row: dict, name: str, where: str) -> Any:
    if name not in row or row[name] is None or row[name] == "":
        raise ValueError(f"{where}: missing field {name!r} (fields present: {sorted(row)})")
    return row[name]


def read_label_map(uri: str) -> dict[str, str]:
    """A two-column table (id, name), e.g. medical_abstracts/labels.csv."""
    rows = read_records(uri)
    if not rows:
        return {}
    id_key, name_key = list(rows[0])[:2]
    return {str(r[id_key]): str(r[name_key]) for r in rows}
