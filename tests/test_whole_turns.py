"""Stage 3 keeps whole turns: a conversation longer than a sample has a sample to itself and ends
after its last assistant turn that fits; none continues into the next sample, and no answer is
trained without its question, packed or not, through the compiled index and a blend; how each
was cut is counted and reported."""

from typing import List, NamedTuple

import numpy as np
import pytest

from megatron_vl.data.conversation import ASSISTANT, USER, Conversation, Template, Turn
from megatron_vl.data.dataset import PackedDataset, build_train_valid_test
from megatron_vl.data.indexed import FeatureStoreWriter
from megatron_vl.data.layout import table_fingerprint
from megatron_vl.data.packing import (FIRST_ANSWER_CUT, FITS, IGNORE, NO_ANSWER, WHOLE_TURNS, PackingConfig,
                                      laid_out_document, materialize, turn_cut)
from megatron_vl.data.records import Report
from megatron_vl.data.writer import DatasetWriter

N, D = 4, 8                 # visual tokens per image, feature width
BLOCK = N + 2
IMG, END, EOS = 256, 257, 2
TOKENIZER = {"type": "test", "model": "-", "vocab_size": 258, "eod_id": EOS,
             "image_token_ids": {"[IMG]": IMG, "[/IMG]": END}}
# vicuna_v1's layout without its long system prompt; one token per character.
TEMPLATE = Template("whole_turns_test", user_prefix="U: ", image_suffix="\n", user_suffix=" A:", answer_prefix=" ")


# --- the exact case: positions written out -----------------------------------------------------

def _doc(*parts):
    """(tokens, spans, loss mask) from parts ("q"|"a", tokens) and ("qi"|"ai", image id): a
    user's or the assistant's tokens, or an image at that place (zero-length span)."""
    tokens, mask, spans, flags = [], [], [], []
    for kind, value in parts:
        if kind in ("qi", "ai"):
            spans += [len(tokens), len(tokens), value]
            flags.append(int(kind == "ai"))
        else:
            tokens += value
            mask += [int(kind == "a")] * len(value)
    return np.array(tokens, np.int64), np.array(spans, np.int64), np.array(mask + flags, np.uint8)


# Laid out: user block 0..5, user text 6..10, answer 11..16 (turn end 17), user text 17..24,
# answer block 25..30 and text 31..34 (turn end 35), user text 35..38, answer 39..43 (end 44).
THREE_TURNS = _doc(("qi", 0), ("q", [10, 11, 12, 13, 14]), ("a", [20, 21, 22, 23, 24, EOS]),
                   ("q", [40, 41, 42, 43, 44, 45, 46, 47]), ("ai", 1), ("a", [30, 31, 32, EOS]),
                   ("q", [50, 51, 52, 53]), ("a", [60, 61, 62, 63, EOS]))
# The next conversation opens with an answer element: a target there must not be trained from
# the cut one before it.
OPENS_WITH_ANSWER = _doc(("a", [70, 71, EOS]))


def _sample(doc, seq_length, max_images, nxt=OPENS_WITH_ANSWER, reset_attention_mask=False):
    cfg = PackingConfig(seq_length=seq_length, num_image_tokens=N, max_images=max_images, embed_dim=D,
                        reset_attention_mask=reset_attention_mask, whole_documents=True)
    docs = [doc, nxt]
    features = np.arange(2 * N * D, dtype=np.float16).reshape(2, N, D)
    return materialize((0, 0), (1, 0), np.array([0, 1]), lambda d: docs[d], features, cfg, IMG, END)


def _flags(doc):
    """(visual index, answer flag) per laid-out element: turn_cut's inputs."""
    tokens, spans, mask = doc
    _, _, visual, answer = laid_out_document(tokens, spans, PackingConfig(num_image_tokens=N), 0, IMG, END, mask)
    return visual, answer


def test_a_long_conversation_ends_after_its_last_whole_turn():
    s = _sample(THREE_TURNS, 40, 2)
    assert s["num_positions"] == 35 and s["num_images"] == 2
    expected = np.full(40, IGNORE)
    expected[10:16] = [20, 21, 22, 23, 24, EOS]   # answer 1, predicted from the element before each
    expected[24], expected[29] = IMG, END          # the produced image's block edges ...
    expected[30:34] = [30, 31, 32, EOS]            # ... and answer 2's text; position 34's target is cut off
    assert s["labels"].tolist() == expected.tolist()
    assert np.flatnonzero(s["regression_mask"]).tolist() == [25, 26, 27, 28]   # the produced image's features
    assert s["tokens"][:35].tolist() == [IMG, 0, 0, 0, 0, END, 10, 11, 12, 13, 14, 20, 21, 22, 23, 24, EOS,
                                         40, 41, 42, 43, 44, 45, 46, 47, IMG, 0, 0, 0, 0, END, 30, 31, 32, EOS]
    assert not s["tokens"][35:].any()
    # The boundary exactly at the sample's end is kept; one position less drops that turn.
    assert turn_cut(*_flags(THREE_TURNS), 35, 2, BLOCK) == (35, WHOLE_TURNS)
    assert _sample(THREE_TURNS, 35, 2)["num_positions"] == 35
    assert _sample(THREE_TURNS, 34, 2)["num_positions"] == 17
    # Room for one image only: the produced image (the second) and its turn are dropped.
    one = _sample(THREE_TURNS, 64, 1)
    assert one["num_positions"] == 17 and one["num_images"] == 1
    assert one["labels"][10:16].tolist() == [20, 21, 22, 23, 24, EOS] and (one["labels"][16:] == IGNORE).all()
    # Everything fits: nothing is cut.
    assert _sample(THREE_TURNS, 64, 2)["num_positions"] == 44


def test_a_first_exchange_longer_than_the_sample_keeps_its_question_and_the_answers_start():
    long_answer = _doc(("q", [10, 11, 12, 13, 14]), ("a", list(range(100, 150)) + [EOS]), ("q", [15]),
                       ("a", [16, EOS]))
    s = _sample(long_answer, 40, 2, reset_attention_mask=True)
    assert s["num_positions"] == 40
    expected = np.full(40, IGNORE)
    expected[4:39] = range(100, 135)               # the answer up to the sample's end; its question whole
    assert s["labels"].tolist() == expected.tolist()
    assert turn_cut(*_flags(long_answer), 40, 2, BLOCK) == (40, FIRST_ANSWER_CUT)
    # A question alone longer than the sample: kept to its end, nothing trained.
    long_question = _doc(("q", list(range(10, 55))), ("a", [60, EOS]))
    s = _sample(long_question, 40, 2)
    assert s["num_positions"] == 40 and (s["labels"] == IGNORE).all()
    assert turn_cut(*_flags(long_question), 40, 2, BLOCK) == (40, NO_ANSWER)
    assert turn_cut(*_flags(long_question), 60, 2, BLOCK) == (47, FITS)


# --- a corpus: every sample, packed or not, through the compiled index and a blend ------------

class Reference(NamedTuple):
    """A conversation laid out by the test itself (images at zero-length spans: no coin)."""
    elements: List[int]      # token per element, -1 at visual positions
    answer: List[bool]
    blocks: List[int]        # where each image block starts ([IMG])
    turn_ends: List[int]     # the element after each assistant turn's end-of-turn token


def _encode(conv):
    """(tokens, loss mask, [(position, is answer)], token position after each end-of-turn)."""
    tokens, mask, images, ends = [], [], [], []
    for piece in TEMPLATE.render(conv):
        if piece.kind == "image":
            images.append((len(tokens), piece.answer))
            continue
        ids = [EOS] if piece.kind == "eos" else [ord(c) for c in piece.value]
        tokens += ids
        mask += [int(piece.answer)] * len(ids)
        if piece.kind == "eos":
            ends.append(len(tokens))
    return tokens, mask, images, ends


def _reference(tokens, mask, images, ends) -> Reference:
    elements, answer, blocks = [], [], []
    for i in range(len(tokens) + 1):
        for pos, is_answer in images:
            if pos == i:
                blocks.append(len(elements))
                elements += [IMG] + [-1] * N + [END]
                answer += [is_answer] * BLOCK
        if i < len(tokens):
            elements.append(tokens[i])
            answer.append(bool(mask[i]))
    laid_ends = [e + BLOCK * sum(pos < e for pos, _ in images) for e in ends]
    return Reference(elements, answer, blocks, laid_ends)


def _expected_cut(ref: Reference, S: int, most: int):
    """(elements kept, kind): the rule of the README, from the end-of-turn positions."""
    if len(ref.elements) <= S and len(ref.blocks) <= most:
        return len(ref.elements), FITS
    row = min(S, ref.blocks[most] if len(ref.blocks) > most else S)
    row = next((b for b in ref.blocks if b < row < b + BLOCK), row)   # never cut a block
    whole = [e for e in ref.turn_ends if e <= row]
    if whole:
        return max(whole), WHOLE_TURNS
    return row, FIRST_ANSWER_CUT if any(ref.answer[:row]) else NO_ANSWER


def _conversations(seed, count):
    rng = np.random.default_rng(seed)

    def text(lo, hi):
        return "".join(chr(c) for c in rng.integers(97, 123, int(rng.integers(lo, hi))))
    convs = [Conversation("long question", [Turn(USER, text(100, 110)), Turn(ASSISTANT, text(3, 6))]),
             Conversation("long first answer", [Turn(USER, text(5, 10), ["in"]), Turn(ASSISTANT, text(100, 110)),
                                                Turn(USER, text(3, 5)), Turn(ASSISTANT, text(3, 5))])]
    for c in range(count - len(convs)):
        turns = []
        for exchange in range(int(rng.integers(1, 5))):
            turns.append(Turn(USER, text(2, 12), ["in"] * int(rng.random() < 0.3)))
            edit = rng.random() < 0.2
            turns.append(Turn(ASSISTANT, "" if edit else text(2, 10), ["out"] * edit))
        convs.append(Conversation(f"conversation {c}", turns))
    return convs


def _write(prefix, convs):
    writer = DatasetWriter(prefix, TOKENIZER, multimodal=True, loss_mask=True)
    refs, n_images = [], 0
    for conv in convs:
        tokens, mask, images, ends = _encode(conv)
        writer.add(tokens, [(pos, pos, b"image") for pos, _ in images], mask + [int(a) for _, a in images])
        refs.append(_reference(tokens, mask, images, ends))
        n_images += len(images)
    writer.finalize(Report(), {})
    store = FeatureStoreWriter(prefix + "_image_features", N, D, source=table_fingerprint(prefix))
    store.add(np.random.default_rng(0).standard_normal((n_images, N, D)))
    store.finalize()
    return refs


def _check_sample(ds, j, refs, S, most):
    """Sample j (in order) holds whole conversations from their first element, each kept to its
    expected cut; its targets are exactly the answers kept, each with its whole question."""
    start, end = ds.starts[j], ds.starts[j + 1]
    assert start[1] == 0 and end[1] == 0, "a sample starts inside a conversation"
    s = ds.sample_in_order(j)
    n = s["num_positions"]
    filled = 0
    for segment, k in enumerate(range(int(start[0]), int(end[0]))):
        ref = refs[int(ds.doc_order[k])]
        kept, kind = _expected_cut(ref, S, most)
        if kind != FITS:
            assert filled == 0 and int(end[0]) == k + 1, "a truncated conversation shares its sample"
        where = slice(filled, filled + kept)
        assert (s["segment_ids"][where] == segment).all() and s["segment_ids"][filled + kept - 1] == segment
        elements = np.array(ref.elements[:kept])
        assert s["tokens"][where].tolist() == np.where(elements < 0, 0, elements).tolist()
        for t in range(kept - 1):   # position t + filled predicts element t + 1
            trained = s["labels"][filled + t] != IGNORE or s["regression_mask"][filled + t]
            assert trained == ref.answer[t + 1], (j, k, t)
            if trained:   # its question: the context between the previous answer and this one
                answer_start = max(i for i in range(t + 2) if ref.answer[i] and (i == 0 or not ref.answer[i - 1]))
                question_start = max([e for e in ref.turn_ends if e <= answer_start], default=0)
                assert 0 <= question_start < answer_start <= t + 1 < kept
                assert not any(ref.answer[question_start:answer_start])
        assert s["labels"][filled + kept - 1] == IGNORE and not s["regression_mask"][filled + kept - 1]
        filled += kept
    assert filled == n and (s["labels"][n:] == IGNORE).all()


S, MOST = 96, 2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("whole_turns")
    prefixes = [str(root / f"chat{i}_text_document") for i in range(2)]
    refs = [_write(p, _conversations(seed, 30)) for seed, p in enumerate(prefixes)]
    return root, prefixes, refs


def _cfg(pack):
    return PackingConfig(seq_length=S, num_image_tokens=N, max_images=MOST, seed=3, embed_dim=D,
                         reset_attention_mask=True, pack_documents=pack)


@pytest.mark.parametrize("pack", [True, False])
def test_every_sample_keeps_whole_turns_and_the_cuts_are_counted(corpus, pack):
    root, prefixes, refs = corpus
    # Two epochs: each conversation at two order positions, across the epoch seam.
    ds = PackedDataset(prefixes[0], _cfg(pack), num_samples=80 if pack else 70, cache_dir=str(root / "cache"))
    assert len(ds.doc_order) >= 60
    for j in range(len(ds)):
        _check_sample(ds, j, refs[0], S, MOST)
    kinds = [_expected_cut(r, S, MOST)[1] for r in refs[0]]
    counts = {kind: kinds.count(kind) for kind in (WHOLE_TURNS, FIRST_ANSWER_CUT, NO_ANSWER)}
    assert ds.truncated == counts and min(counts.values()) >= 1, counts
    assert ds.notes == [
        f"{prefixes[0]} (documents 0:30): {30 - kinds.count(FITS)} of 30 conversations longer than --seq-length {S} "
        f"(or with more than --max-images-per-sample {MOST} images), each kept alone in one sample: "
        f"{counts[WHOLE_TURNS]} cut after their last whole turn that fits (later turns not trained); "
        f"{counts[FIRST_ANSWER_CUT]} cut inside their first answer, whose question is whole (the first exchange does "
        f"not fit); {counts[NO_ANSWER]} cut before their first answer (nothing of them is trained)"]


def test_a_blend_of_instruction_sets_keeps_whole_turns(corpus):
    root, prefixes, refs = corpus
    blend, _, _ = build_train_valid_test(["0.5", prefixes[0], "0.5", prefixes[1]], "100,0,0", _cfg(True),
                                         (40, 0, 0), str(root / "cache"))
    assert sorted(set(blend.dataset_index.tolist())) == [0, 1]
    for i in range(len(blend)):
        ds = blend.datasets[int(blend.dataset_index[i])]
        j = int(ds.shuffle[int(blend.sample_index[i])])
        assert blend[i]["tokens"].tolist() == ds.sample_in_order(j)["tokens"].tolist()
        _check_sample(ds, j, refs[prefixes.index(ds.prefix)], S, MOST)
