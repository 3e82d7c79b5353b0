"""From :class:`~epee.data.Example` to model input (:class:`EncodedSample`) and training target.

Relation extraction marks the two entities in the text with punctuation markers, ``@ e1 @`` and
``# e2 #`` (the "entity marker (punct)" scheme of Zhou & Chen, 2021): the markers are ordinary
tokens of every pretrained vocabulary, so no embedding is added, and the exit head reads the
states of the two opening markers. Event extraction tags every content token with BIO tags of
the trigger (``Trigger.<event type>``) and argument spans it overlaps.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from .data import Example
from .inputs import EncodedSample

IGNORE = -100  # target of positions that carry no label (special tokens, unscored tokens)

# Where a text may be cut so that its beginning tokenises exactly as in the whole text (see
# TextPreprocessor._leading_tokens): just before an ASCII whitespace character. Not Python's
# str.isspace(), which also counts characters (U+001C..U+001F) that BERT's normaliser deletes.
_CUT = re.compile(r"[ \t\n\r]")
# Backend pre-tokenisers that split words at whitespace before anything else, and normalisers
# that act character by character: with them a cut before whitespace changes no earlier token.
_WORD_PRE_TOKENIZERS = ("BertPreTokenizer", "Whitespace", "WhitespaceSplit")
_CHAR_NORMALIZERS = ("BertNormalizer", "Lowercase")
# characters tokenised per token wanted, first guess (English text: about 4.5 per WordPiece)
_CHARS_PER_TOKEN = 6


def prefix_safe(tokenizer) -> bool:
    """Whether a text cut just before whitespace tokenises to exactly the first tokens of the whole
    text, so a long note's first windows can be found without tokenising all of it (BERT's
    WordPiece and GPT-2's byte-level BPE: yes; SentencePiece (ALBERT) and unknown setups: no)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    pre, norm = backend.pre_tokenizer, backend.normalizer
    pre_ok = type(pre).__name__ in _WORD_PRE_TOKENIZERS or (
        type(pre).__name__ == "ByteLevel" and bool(getattr(pre, "use_regex", False)))
    return pre_ok and (norm is None or type(norm).__name__ in _CHAR_NORMALIZERS)


@dataclass(frozen=True)
class TextSettings:
    """How text is turned into tokens; stored in the model directory."""

    max_length: int = 256  # tokens per model input, special tokens included
    relation_markers: tuple[str, str, str, str] = ("@", "@", "#", "#")  # open/close e1, open/close e2

    def __post_init__(self) -> None:
        if not isinstance(self.max_length, int) or self.max_length < 8:
            raise ValueError(f"max_length ({self.max_length!r}) must be an integer >= 8")
        object.__setattr__(self, "relation_markers", tuple(self.relation_markers))
        if len(self.relation_markers) != 4 or not all(isinstance(m, str) and m.strip() for m in self.relation_markers):
            raise ValueError(f"relation_markers ({self.relation_markers!r}) must be 4 non-blank strings")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TextSettings":
        return cls(max_length=int(data.get("max_length", 256)), relation_markers=tuple(data.get("relation_markers", ("@", "@", "#", "#"))))


def bio_label_names(span_types: Sequence[str]) -> tuple[str, ...]:
    """"O" then B-/I- tags for each span type, in a stable order."""
    names = ["O"]
    for t in sorted(set(span_types)):
        names += [f"B-{t}", f"I-{t}"]
    return tuple(names)


@dataclass
class Encoded:
    sample: EncodedSample
    target: int | torch.Tensor | None  # class index; token task: (T,) tag ids with IGNORE
    offsets: list[tuple[int, int]] | None = None  # token task: character span of every token


class TextPreprocessor:
    """Tokenises examples for one task with one tokenizer; the same object serves training,
    calibration, evaluation and the pipelines, so every path sees identical inputs."""

    def __init__(self, tokenizer, task: str, label_names: Sequence[str], settings: TextSettings | None = None,
                 num_prompts: int = 0) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("a fast (Rust) tokenizer is needed for character offsets")
        self.tokenizer = tokenizer
        self.task = task
        self.label_names = tuple(label_names)
        self.label_index = {n: i for i, n in enumerate(self.label_names)}
        self.settings = settings or TextSettings()
        # the special tokens this tokenizer puts around content ([CLS] ... [SEP] for BERT, none for GPT-2)
        probe = tokenizer("a", add_special_tokens=True, return_special_tokens_mask=True)
        special = probe["special_tokens_mask"]
        first = special.index(0)
        last = len(special) - 1 - special[::-1].index(0)
        self._head = list(probe["input_ids"][:first])
        self._tail = list(probe["input_ids"][last + 1 :])
        # soft prompts: K reserved positions right after the leading special tokens; their ids are
        # placeholders (the pad id) whose embeddings the model replaces by its prompt vectors.
        # Every later position, entity marker and tag shifts with them, and they are never scored.
        self.num_prompts = int(num_prompts)
        self.prompt_position = len(self._head)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._head += [int(pad)] * self.num_prompts
        self._prefix = len(self._head)
        self._budget = self.settings.max_length - len(self._head) - len(self._tail)  # content tokens that fit
        if self._budget < 1:
            raise ValueError(f"max_length ({self.settings.max_length}) leaves no room for text after "
                             f"{len(self._head) + len(self._tail)} special and prompt positions")
        self._prefix_safe = prefix_safe(tokenizer)

    def _target(self, ex: Example) -> int | None:
        if ex.label is None:
            return None
        if ex.label not in self.label_index:
            raise ValueError(f"example {ex.id}: label {ex.label!r} is not one of the model's labels {self.label_names}")
        return self.label_index[ex.label]

    def _tokens(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def _finish(self, ids: list[int], **extra) -> EncodedSample:
        full = self._head + list(ids) + self._tail
        types = None
        if "token_type_ids" in self.tokenizer.model_input_names:
            types = torch.zeros(len(full), dtype=torch.long)
        return EncodedSample(input_ids=torch.tensor(full, dtype=torch.long), token_type_ids=types, **extra)

    def encode(self, ex: Example) -> Encoded:
        if ex.text is None:
            raise ValueError(f"example {ex.id} has no text")
        if self.task == "sequence":  # truncated: only the first budget tokens are needed
            ids, _, _ = self._leading_tokens(ex.text, self._budget)
            return Encoded(self._finish(ids[: self._budget]), self._target(ex))
        if self.task == "relation":
            return self._encode_relation(ex)
        if self.task == "token":
            return self._encode_tokens(ex)
        raise ValueError(f"TextPreprocessor does not handle task {self.task!r}")

    def _leading_tokens(self, text: str, need: int = 0) -> tuple[list[int], list[tuple[int, int]], bool]:
        """``(ids, offsets, complete)`` of ``text``'s tokens; ``complete`` False means more follow.

        ``need`` > 0 asks only for the first ``need`` + 1 tokens to be exact: where the tokenizer
        allows (:func:`prefix_safe`), a beginning of the text cut just before whitespace is
        tokenised instead of all of it, growing until it yields more than ``need`` tokens. Every
        token returned is then one of the whole text's first tokens, with the same offsets.
        """
        if need > 0 and self._prefix_safe:
            length = need * _CHARS_PER_TOKEN
            while length < len(text):
                cut = _CUT.search(text, length)
                if cut is None:
                    break
                ids, offsets = self._tokens(text[: cut.start()])
                if len(ids) > need:
                    return ids, offsets, False
                length = 2 * cut.start() + 1
        ids, offsets = self._tokens(text)
        return ids, offsets, True

    def encode_windows(self, ex: Example, overlap: float = 0.25) -> list[Encoded]:
        """Cover a long text with overlapping windows instead of truncating it.

        Sequence and token tasks: windows of the maximum length, each starting ``1 - overlap`` of a
        window after the previous one, the last one ending at the text's end; a text that fits
        gives one window. Relation inputs are cropped around their entities (:meth:`encode`).
        Token offsets stay relative to the whole text, so spans from every window line up.
        """
        return self.first_windows(ex, overlap)[0]

    def first_windows(self, ex: Example, overlap: float = 0.25, max_windows: int = 0) -> tuple[list[Encoded], bool]:
        """The first ``max_windows`` of :meth:`encode_windows`' windows (0: all of them) and whether
        any were left out. Only as much of a long text is tokenised as those windows need, where
        the tokenizer allows it (:meth:`_leading_tokens`); the windows are the same either way."""
        if max_windows < 0:
            raise ValueError(f"max_windows ({max_windows}) must be >= 0")
        if self.task == "relation" or ex.text is None:
            return [self.encode(ex)], False
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap ({overlap}) must lie in [0, 1)")
        step = max(1, int(self._budget * (1.0 - overlap)))
        # max_windows windows from the start: tokens up to (max_windows - 1) * step + budget; one
        # token more proves the text has further windows (the last one aligned to its end)
        need = (max_windows - 1) * step + self._budget if max_windows else 0
        ids, offsets, _ = self._leading_tokens(ex.text, need)
        if len(ids) <= self._budget:
            if self.task == "sequence":  # reuse the tokens rather than tokenising again
                return [Encoded(self._finish(ids), self._target(ex))], False
            return [self.encode(ex)], False
        starts = list(range(0, len(ids) - self._budget, step)) + [len(ids) - self._budget]
        truncated = bool(max_windows) and len(starts) > max_windows
        if truncated:
            starts = starts[:max_windows]
        out = []
        for start in starts:
            win_ids = ids[start : start + self._budget]
            if self.task == "sequence":
                out.append(Encoded(self._finish(win_ids), self._target(ex)))
            else:  # token task: no gold tags in inference windows
                win_off = offsets[start : start + self._budget]
                mask = torch.tensor(self._pad_target([True] * len(win_ids), False), dtype=torch.bool)
                out.append(Encoded(self._finish(win_ids, token_mask=mask), None, self._pad_target(win_off, (0, 0))))
        return out, truncated

    def _encode_relation(self, ex: Example) -> Encoded:
        if ex.entities is None:
            raise ValueError(f"example {ex.id}: relation task needs the two entity spans")
        o1, c1, o2, c2 = self.settings.relation_markers
        (s1, e1), (s2, e2) = ex.entities
        # insert from the right so earlier offsets stay valid; remember where the openers land
        inserts = sorted([(s1, 0, f" {o1} "), (e1, 1, f" {c1} "), (s2, 2, f" {o2} "), (e2, 3, f" {c2} ")],
                         key=lambda x: (x[0], x[1] in (1, 3), x[1]))
        text, opener_at = ex.text, {}
        pieces, pos = [], 0
        for at, kind, marker in inserts:
            pieces.append(ex.text[pos:at])
            shift_pos = sum(len(p) for p in pieces)
            if kind in (0, 2):
                opener_at[kind] = shift_pos + 1  # the marker character after its leading space
            pieces.append(marker)
            pos = at
        pieces.append(ex.text[pos:])
        text = "".join(pieces)
        ids, offsets = self._tokens(text)
        positions = []
        for kind in (0, 2):
            hit = [i for i, (a, b) in enumerate(offsets) if a <= opener_at[kind] < b]
            if not hit:
                raise ValueError(f"example {ex.id}: entity marker was not kept as a token")
            positions.append(hit[0])
        if len(ids) > self._budget:
            ids, positions = self._crop_around(ids, positions)
        e_pos = (positions[0] + self._prefix, positions[1] + self._prefix)
        return Encoded(self._finish(ids, entity_positions=e_pos), self._target(ex))

    def _crop_around(self, ids: list[int], positions: list[int]) -> tuple[list[int], list[int]]:
        """Fit a long relation input into the budget without losing either entity marker.

        One window centred on both markers when they fit in it; otherwise two half windows, one
        around each marker (the text between them is dropped, the entities and their immediate
        context are kept).
        """
        budget, lo, hi = self._budget, min(positions), max(positions)
        if hi - lo + 1 <= budget:
            start = max(0, min(lo - (budget - (hi - lo + 1)) // 2, len(ids) - budget))
            return ids[start : start + budget], [p - start for p in positions]
        half = budget // 2
        a0 = max(0, lo - half // 4)  # a little left context, more right context (entity tokens)
        a1 = a0 + half
        b0 = max(a1, min(hi - (budget - half) // 4, len(ids) - (budget - half)))
        b1 = b0 + (budget - half)
        cropped = ids[a0:a1] + ids[b0:b1]
        remap = [p - a0 if p < a1 else half + (p - b0) for p in positions]
        return cropped, remap

    def _encode_tokens(self, ex: Example) -> Encoded:
        ids, offsets = self._tokens(ex.text)
        ids, offsets = ids[: self._budget], offsets[: self._budget]
        tags = [self.label_index["O"]] * len(ids)
        taken = [False] * len(ids)
        target = None
        if ex.spans is not None:
            # triggers first, then longer spans: a token belongs to the first span that claims it
            for kind, s, e in sorted(ex.spans, key=lambda x: (not x[0].startswith("Trigger"), -(x[2] - x[1]), x[1])):
                inside = [i for i, (a, b) in enumerate(offsets) if a < e and b > s and b > a]
                if not inside or any(taken[i] for i in inside):
                    continue
                b_tag, i_tag = f"B-{kind}", f"I-{kind}"
                if b_tag not in self.label_index:
                    raise ValueError(f"example {ex.id}: span type {kind!r} is not among the model's tags")
                for j, i in enumerate(inside):
                    tags[i] = self.label_index[b_tag if j == 0 else i_tag]
                    taken[i] = True
            target = torch.tensor(self._pad_target(tags), dtype=torch.long)
        mask = torch.tensor(self._pad_target([True] * len(ids), False), dtype=torch.bool)
        sample = self._finish(ids, token_mask=mask)
        full_offsets = self._pad_target(offsets, (0, 0))
        return Encoded(sample, target, full_offsets)

    def _pad_target(self, values: list, fill: Any = IGNORE) -> list:
        """Align per-content-token values with the special tokens around them."""
        return [fill] * len(self._head) + list(values) + [fill] * len(self._tail)

    def decode_spans(self, offsets: list[tuple[int, int]], tag_ids: Sequence[int]) -> list[tuple[str, int, int]]:
        """BIO tags of one sample back to (type, start char, end char) spans."""
        spans: list[tuple[str, int, int]] = []
        current: list | None = None
        for (a, b), t in zip(offsets, tag_ids):
            name = self.label_names[t] if 0 <= t < len(self.label_names) else "O"
            if b <= a or name == "O":
                if b > a and current:
                    spans.append(tuple(current))
                    current = None
                continue
            prefix, kind = name.split("-", 1)
            if prefix == "B" or current is None or current[0] != kind:
                if current:
                    spans.append(tuple(current))
                current = [kind, a, b]
            else:
                current[2] = b
        if current:
            spans.append(tuple(current))
        return spans


class ImagePreprocessor:
    """Raw pixel arrays to normalised model input, by the model directory's image settings."""

    def __init__(self, label_names: Sequence[str], settings) -> None:
        self.label_names = tuple(label_names)
        self.label_index = {n: i for i, n in enumerate(self.label_names)}
        self.settings = settings
        self.task = "image"

    def encode(self, ex: Example) -> Encoded:
        from .images import preprocess

        if ex.image is None:
            raise ValueError(f"example {ex.id} has no image")
        target = None
        if ex.label is not None:
            if ex.label not in self.label_index:
                raise ValueError(f"example {ex.id}: label {ex.label!r} is not one of the model's labels {self.label_names}")
            target = self.label_index[ex.label]
        return Encoded(EncodedSample(pixel_values=preprocess(ex.image, self.settings)), target)


INPUT_MODES = ("windows", "truncate")


def model_inputs(preprocessor: TextPreprocessor | ImagePreprocessor, example: Example, mode: str = "windows",
                 overlap: float = 0.25, max_windows: int = 0) -> tuple[list[Encoded], bool]:
    """What the model reads of one example, and whether windows were left out (``max_windows``).

    ``windows``: a text longer than the model's maximum length is covered by overlapping windows
    (:meth:`TextPreprocessor.first_windows`), as the pipelines run it; ``truncate``: its beginning
    only (:meth:`TextPreprocessor.encode`). Images and relations are one input either way.
    """
    if mode not in INPUT_MODES:
        raise ValueError(f"mode ({mode!r}) must be one of {INPUT_MODES}")
    if mode == "truncate" or not isinstance(preprocessor, TextPreprocessor):
        return [preprocessor.encode(example)], False
    return preprocessor.first_windows(example, overlap, max_windows)
