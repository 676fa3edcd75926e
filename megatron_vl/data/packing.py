"""Packing documents into fixed-length samples.

A document is its text tokens plus images, each attached to the token span of its sentence.
Laid out, each image becomes a block ``[IMG] v_0 .. v_{N-1} [/IMG]`` placed immediately
before or after its sentence; the coin for that choice is a hash of (seed, position of the
document in the global order, image number), so a document occurrence always lays out the
same way, whoever reads it and whenever.

Samples are cut from the stream of laid-out documents: exactly ``seq_length`` positions
each, never splitting an image block, at most ``max_images`` blocks per sample (a sample
that cannot take the next block ends there and is padded). Text may continue into the
next sample, as in Megatron.

The one rule for targets: the output at position t predicts element t+1 — cross-entropy
when t+1 is a text token (``[IMG]`` and ``[/IMG]`` included), MSE against the stored
embedding when t+1 is a visual position. The last position's target is the first element
of the next sample. Exceptions: with document isolation (``reset_attention_mask``) a
target in the next document gets no loss, since the position cannot see that document; with
``eod_mask_loss`` neither does the target of an end-of-document token; and in instruction
data (a loss mask per document) only answer elements are targets — the assistant's tokens
and the whole block of an image it produces. Under ``whole_documents`` a sample's last target
is never trained: it lies in the next document, or was cut off.

``pack_documents=False`` starts every document in a sample of its own (padded); a document
longer than a sample continues in the next samples, except under ``whole_documents``.

``whole_documents`` (instruction data, packed or not: a continuation would train answers
without their question) never splits a conversation across samples: one that does not fit in
the rest of a sample starts the next one, and one longer than a sample (``seq_length``
positions or ``max_images`` blocks) has a sample to itself and keeps whole turns only
(``turn_cut``): it ends after the last assistant turn that fits (its end-of-turn token
included); the turns after it are not trained. When not even the first answer ends within the
sample, the conversation is kept up to the sample's end (before any block it would cut): the
answer is cut, but its question is whole, so no answer is trained without its question (and
when the first question alone fills the sample, nothing is trained). The dataset counts each
kind and the run reports the counts at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

IGNORE = -100
_MASK64 = (1 << 64) - 1


@dataclass
class PackingConfig:
    seq_length: int = 512
    num_image_tokens: int = 32
    max_images: int = 5
    seed: int = 1234
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    """Document isolation: a target in another document than its position gets no loss (the
    position cannot see that document)."""
    eod_mask_loss: bool = False
    """No loss on the target of an end-of-document token (Megatron's --eod-mask-loss)."""
    embed_dim: Optional[int] = None
    """d of the stored features; text-only datasets emit zero features of this width so they
    blend with image datasets (default: read from the feature store, 1 without one)."""
    pack_documents: bool = True
    """Several documents per sample; False: each document starts a new (padded) sample."""
    whole_documents: bool = False
    """Never split a document across samples (instruction data): one longer than a sample is
    kept alone in one, truncated at its last whole turn that fits (``turn_cut``)."""


def packing_config(cfg) -> PackingConfig:
    """The packing settings of a run's Config (megatron_vl.config.Config)."""
    return PackingConfig(seq_length=cfg.model.seq_length, num_image_tokens=cfg.data.num_image_tokens,
                         max_images=cfg.data.max_images_per_sample, seed=cfg.training.seed,
                         reset_position_ids=cfg.data.reset_position_ids,
                         reset_attention_mask=cfg.data.reset_attention_mask, eod_mask_loss=cfg.data.eod_mask_loss,
                         pack_documents=cfg.data.pack)


def _splitmix_bit(seed: int, doc_position: int, image_number: int) -> bool:
    x = (seed * 0x9E3779B97F4A7C15 + doc_position * 0xBF58476D1CE4E5B9 + image_number * 0x94D049BB133111EB) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return bool((x ^ (x >> 31)) >> 63)


def coin_after(seed: int, doc_position, image_number) -> np.ndarray:
    """True where the image goes after its sentence: a splitmix64 hash of (seed, position of
    the document in the global order, image number). Plain integers: documents hold a few
    images, where numpy's per-call overhead would dominate."""
    pos = np.broadcast_to(np.asarray(doc_position), np.shape(image_number)).ravel()
    img = np.asarray(image_number).ravel()
    return np.array([_splitmix_bit(seed, int(p), int(i)) for p, i in zip(pos, img)], dtype=bool)


def image_inserts(spans: np.ndarray, seed: int, doc_position: int) -> Tuple[np.ndarray, np.ndarray]:
    """(insert positions, image ids) sorted by position (stable): spans is the flat
    (start, end, image) int64 triples of one document."""
    flat = [int(x) for x in spans]
    if not flat:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    items = sorted(((e if _splitmix_bit(seed, doc_position, n) else s), n, img)
                   for n, (s, e, img) in enumerate(zip(flat[0::3], flat[1::3], flat[2::3])))
    return np.array([it[0] for it in items], np.int64), np.array([it[2] for it in items], np.int64)


def build_sample_starts(doc_order: np.ndarray, doc_tokens: np.ndarray, doc_spans: Callable[[int], np.ndarray],
                        cfg: PackingConfig, num_samples: int) -> np.ndarray:
    """[num_samples + 1, 2] (position in doc_order, element offset in that laid-out
    document) where each sample starts; the last row is where the next would start.
    doc_tokens[d] is document d's token count. Stops early if the order runs out."""
    S, block = cfg.seq_length, cfg.num_image_tokens + 2
    if cfg.max_images < 1:
        raise ValueError(f"max images per sample must be >= 1, got {cfg.max_images}")
    if block > S:
        raise ValueError(f"an image block ({block} positions) does not fit in --seq-length {S}")
    starts: List[Tuple[int, int]] = [(0, 0)]
    fill, images = 0, 0
    for k, d in enumerate(doc_order):
        n_tok = int(doc_tokens[d])
        if cfg.whole_documents:
            n_img = len(doc_spans(d)) // 3
            length = n_tok + n_img * block
            if fill and (fill + length > S or images + n_img > cfg.max_images or not cfg.pack_documents):
                starts.append((k, 0))   # this sample ends padded before the document
                fill, images = 0, 0
                if len(starts) > num_samples:
                    return np.asarray(starts, np.int64)
            fill, images = fill + length, images + n_img
            if fill >= S or images > cfg.max_images or (fill and not cfg.pack_documents):
                # Full, or a document truncated to one sample (materialize's turn_cut), or one per sample.
                starts.append((k + 1, 0))
                fill, images = 0, 0
                if len(starts) > num_samples:
                    return np.asarray(starts, np.int64)
            continue
        inserts, _ = image_inserts(doc_spans(d), cfg.seed, k)
        offset, prev = 0, 0   # offset: laid-out position in this document; prev: tokens consumed
        for pos in list(inserts) + [None]:
            text = (n_tok if pos is None else int(pos)) - prev
            while text > 0:
                take = min(text, S - fill)
                fill, text, offset, prev = fill + take, text - take, offset + take, prev + take
                if fill == S:
                    starts.append((k, offset))
                    fill, images = 0, 0
                    if len(starts) > num_samples:
                        return np.asarray(starts, np.int64)
            if pos is None:
                break
            if fill + block > S or images == cfg.max_images:
                starts.append((k, offset))   # this sample ends padded before the block
                fill, images = 0, 0
                if len(starts) > num_samples:
                    return np.asarray(starts, np.int64)
            fill, images, offset = fill + block, images + 1, offset + block
            if fill == S:
                starts.append((k, offset))
                fill, images = 0, 0
                if len(starts) > num_samples:
                    return np.asarray(starts, np.int64)
        if not cfg.pack_documents and fill > 0:   # this document's sample ends here, padded
            starts.append((k + 1, 0))
            fill, images = 0, 0
            if len(starts) > num_samples:
                return np.asarray(starts, np.int64)
    return np.asarray(starts, np.int64)


def laid_out_document(tokens: np.ndarray, spans: np.ndarray, cfg: PackingConfig, doc_position: int,
                      img_id: int, img_end_id: int, loss_mask: Optional[np.ndarray] = None):
    """(element tokens, image id per element or -1, visual index per element or -1, answer
    flag per element). loss_mask: one flag per token, then one per image in span order
    (instruction data); without it every element is a target."""
    inserts, images = image_inserts(spans, cfg.seed, doc_position)
    N, block = cfg.num_image_tokens, cfg.num_image_tokens + 2
    total = len(tokens) + block * len(inserts)
    toks = np.zeros(total, np.int64)
    imgs = np.full(total, -1, np.int64)
    vis = np.full(total, -1, np.int64)
    answer = np.ones(total, bool)
    if loss_mask is not None:
        token_flags = np.asarray(loss_mask[:len(tokens)], bool)
        flags = dict(zip(spans[2::3].tolist(), np.asarray(loss_mask[len(tokens):], bool).tolist()))
    prev, out = 0, 0
    for pos, image in zip(inserts.tolist(), images.tolist()):
        n = pos - prev
        toks[out:out + n] = tokens[prev:pos]
        if loss_mask is not None:
            answer[out:out + n] = token_flags[prev:pos]
            answer[out + n:out + n + block] = flags[image]
        out += n
        toks[out], toks[out + block - 1] = img_id, img_end_id
        imgs[out + 1:out + 1 + N] = image
        vis[out + 1:out + 1 + N] = np.arange(N)
        out += block
        prev = pos
    toks[out:] = tokens[prev:]
    if loss_mask is not None:
        answer[out:] = token_flags[prev:]
    return toks, imgs, vis, answer


def materialize(start: Sequence[int], end: Sequence[int], doc_order: np.ndarray, get_doc: Callable,
                features, cfg: PackingConfig, img_id: int, img_end_id: int, eod_id: Optional[int] = None) -> dict:
    """One sample: the laid-out elements from `start` up to `end` (exclusive), and the
    element at `end` as the last position's target. get_doc(d) -> (tokens, spans) or
    (tokens, spans, loss mask). `start` and `end` are (position in doc_order, element offset
    in that laid-out document) rows of the sample starts."""
    seq_length, image_tokens = cfg.seq_length, cfg.num_image_tokens

    def lay_out(order_position):
        """(element tokens, image id per element, visual index per element, answer flag per element)."""
        tokens, spans, *mask = get_doc(int(doc_order[order_position]))
        return laid_out_document(tokens, spans, cfg, order_position, img_id, img_end_id, mask[0] if mask else None)
    tokens = np.zeros(seq_length, np.int64)
    answer = np.zeros(seq_length, bool)
    element_image = np.full(seq_length, -1, np.int64)     # the image an element belongs to, -1 for text
    element_visual = np.full(seq_length, -1, np.int64)    # its visual token index in that image's block
    segment = np.zeros(seq_length, np.int64)
    position = np.zeros(seq_length, np.int64)
    filled, segment_number, blocks_placed = 0, 0, 0
    doc_position, offset = int(start[0]), int(start[1])
    end_position, end_offset = int(end[0]), int(end[1])
    laid_out = None
    while doc_position <= end_position and doc_position < len(doc_order):
        laid_out = lay_out(doc_position)
        doc_tokens, doc_images, doc_visual, doc_answer = laid_out
        stop = end_offset if doc_position == end_position else len(doc_tokens)
        count = stop - offset
        if cfg.whole_documents and count > 0:
            count, _ = turn_cut(doc_visual[offset:stop], doc_answer[offset:stop], seq_length - filled,
                                cfg.max_images - blocks_placed, image_tokens + 2)
            blocks_placed += int(np.count_nonzero(doc_visual[offset:offset + count] == 0))
            stop = offset + count
        if count > 0:
            window = slice(filled, filled + count)
            tokens[window], element_image[window] = doc_tokens[offset:stop], doc_images[offset:stop]
            element_visual[window] = doc_visual[offset:stop]
            answer[window] = doc_answer[offset:stop]
            segment[window] = segment_number
            position[window] = np.arange(count) if cfg.reset_position_ids else np.arange(filled, filled + count)
            filled, segment_number = filled + count, segment_number + 1
        if doc_position == end_position:
            break
        doc_position, offset = doc_position + 1, 0
    # The element at `end`; when `end` is the very end of its document, the next one's first.
    next_token, next_answer = IGNORE, False
    next_position, next_offset = end_position, end_offset
    while next_position < len(doc_order):
        next_laid_out = laid_out if (laid_out is not None and next_position == doc_position) else \
            lay_out(next_position)
        if next_offset < len(next_laid_out[0]):
            next_token, next_answer = int(next_laid_out[0][next_offset]), bool(next_laid_out[3][next_offset])
            break
        next_position, next_offset = next_position + 1, 0
    # The last position's target lies in another document when `end` starts one.
    last_crosses = next_position != end_position or end_offset == 0
    if filled < seq_length:   # padding: a segment of its own, no targets
        segment[filled:] = segment_number
        position[filled:] = np.arange(seq_length - filled) if cfg.reset_position_ids else \
            np.arange(filled, seq_length)
    visual = element_image >= 0
    labels = np.full(seq_length, IGNORE, np.int64)
    if filled >= 2:
        labels[:filled - 1] = np.where(visual[1:filled], IGNORE, tokens[1:filled])
    if filled >= 1 and not cfg.whole_documents:   # (whole conversations: the next one's, or cut off)
        labels[filled - 1] = next_token if next_answer else IGNORE
    # Only answer elements are targets (everything, outside instruction data).
    if filled >= 2:
        labels[:filled - 1][~answer[1:filled]] = IGNORE
    regression = np.zeros(seq_length, bool)
    regression[:seq_length - 1] = visual[1:] & answer[1:]
    if cfg.reset_attention_mask and filled >= 1:
        crosses = np.zeros(seq_length, bool)   # the target lies in another document than the position
        crosses[:filled - 1] = segment[:filled - 1] != segment[1:filled]
        crosses[filled - 1] = last_crosses
        labels[crosses] = IGNORE
        regression &= ~crosses
    if cfg.eod_mask_loss and eod_id is not None:
        labels[(tokens == eod_id) & ~visual] = IGNORE
    # Features in order of appearance; each visual position names its slot in that list.
    block_start = visual & (element_visual == 0)
    image_ids = element_image[block_start]
    sample_features = np.empty((cfg.max_images, image_tokens, features.shape[-1]), np.float16)
    for slot, image in enumerate(image_ids.tolist()):
        sample_features[slot] = features[image]
    sample_features[len(image_ids):] = 0
    feature_slot = np.cumsum(block_start) - 1
    return {"tokens": np.where(visual, 0, tokens), "labels": labels, "visual_mask": visual,
            "regression_mask": regression, "visual_slot": np.where(visual, feature_slot, -1),
            "visual_index": element_visual, "features": sample_features, "num_images": len(image_ids),
            "image_ids": np.concatenate([image_ids, np.full(cfg.max_images - len(image_ids), -1)]),
            "segment_ids": segment, "position_ids": position, "num_positions": filled}


def row_cut(visual_index: np.ndarray, room: int, image_room: int, block: int) -> int:
    """How many laid-out elements of a document (its visual index per element) fit in `room`
    positions and `image_room` image blocks without cutting a block: all of them, or the
    longest prefix that does."""
    n = len(visual_index)
    block_starts = np.flatnonzero(np.asarray(visual_index) == 0) - 1   # the [IMG] before v_0
    cut = min(n, room)
    if len(block_starts) > max(image_room, 0):
        cut = min(cut, int(block_starts[max(image_room, 0)]))
    inside = block_starts[(block_starts < cut) & (cut < block_starts + block)]
    return int(inside[0]) if len(inside) else cut


FITS, WHOLE_TURNS, FIRST_ANSWER_CUT, NO_ANSWER = "fits", "whole turns", "first answer cut", "no answer"
CUTS = {WHOLE_TURNS: "cut after their last whole turn that fits (later turns not trained)",
        FIRST_ANSWER_CUT: "cut inside their first answer, whose question is whole (the first exchange does not fit)",
        NO_ANSWER: "cut before their first answer (nothing of them is trained)"}
"""How ``turn_cut`` keeps a conversation longer than a sample, as the run reports it (FITS:
all of it)."""


def turn_cut(visual_index: np.ndarray, answer: np.ndarray, room: int, image_room: int, block: int) -> Tuple[int, str]:
    """(how many laid-out elements of a conversation a sample keeps, which of FITS,
    WHOLE_TURNS, FIRST_ANSWER_CUT, NO_ANSWER): all of them when they fit in `room` positions
    and `image_room` blocks, else up to the last turn boundary that fits. A turn boundary is
    where answer flags go from answer to context (an assistant turn's end, its end-of-turn
    token included); an image block's flags are all alike, so a boundary never cuts one."""
    answer = np.asarray(answer, bool)
    row = row_cut(visual_index, room, image_room, block)
    if row == len(answer):
        return row, FITS
    ends = np.flatnonzero(answer[:row] & ~answer[1:row + 1]) + 1   # boundaries at or before `row` (< len)
    if len(ends):
        return int(ends[-1]), WHOLE_TURNS
    return row, FIRST_ANSWER_CUT if answer[:row].any() else NO_ANSWER


def visual_sequence(sample: dict) -> np.ndarray:
    """[S, d] float32: the visual embedding at each visual position, zeros elsewhere (the
    model's visual input; shifted by one, its regression target)."""
    S = len(sample["tokens"])
    d = sample["features"].shape[-1]
    out = np.zeros((S, d), np.float32)
    m = sample["visual_mask"]
    out[m] = sample["features"][sample["visual_slot"][m], sample["visual_index"][m]]
    return out
