"""The paper's per-document sampling, made when preprocessing (``tools/preprocess_data.py
--doc-sampling paper``): each interleaved document becomes ONE subsequence of at most
``subsequence_length`` laid-out positions (text tokens, BOS and EOD included, plus N + 2 per
image block) holding at most ``max_images_per_doc`` of its images, chosen at random with their
sentences. VL-GPT (after Flamingo): "for each document, randomly sample at most 5 images with
their captions and build a subsequence of at most 512 tokens".

The rule, per document:

1. Choice. The document's images are put in the order of a 64-bit blake2b hash of (seed, the
   document's identity, image number); the first k = min(max_images_per_doc, n) of them that decode
   are chosen (an image that does not decode is counted as in pack mode and the next one is
   tried). The choice is uniform over the document's images, and only chosen images are ever
   read, stored and later extracted. The identity is the input file's name without its
   directory plus the record's place in it (line, zip member and line, parquet row): the same
   seed chooses the same images on any number of workers, partitions or nodes, from any
   working directory (renaming the input files changes it).
2. Fit. The chosen images, in document order, keep their sentences. The window from the
   first chosen sentence's start to the last one's end must fit in
   ``budget(k) = subsequence_length - k * (N + 2) - [BOS] - [EOD]``; while it does not, the
   chosen image whose sentence comes last in the document (the farthest from the first) is
   dropped, counted, and the budget recomputed. One chosen sentence alone longer than the
   budget is cut to its first budget tokens (counted); its image stays.
3. Context. The room left in the budget is filled with the text around the window: whole
   sentences before it up to half the room, whole sentences after it up to the rest, then
   more sentences before if the after side ran into the document's end or left room (a
   sentence that does not fit ends that side). Text without sentence boundaries grows by
   tokens the same way. The window never crosses the document's edges.
4. A document without images keeps its first budget(0) tokens (counted when cut).

Whether an image goes before or after its sentence is not decided here: the layout's coin
(packing.py) decides it when the dataset is read, as in pack mode. The image spans written
point into the cut text. Pack mode (the default) keeps every image and all of the text.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

from .records import DataUsageError

T = TypeVar("T")

MODES = ("pack", "paper")
INTERLEAVED_FORMATS = ("mmc4", "obelics")
"""The input formats the paper's rule applies to: documents of several sentences and images.
Pairs are one caption and one image already; conversations are laid out whole (stage 3)."""

# The reasons the report counts (Report.cut), for the storage arithmetic and the README.
NOT_CHOSEN = "image not chosen: at most --max-images-per-doc per document"
DROPPED = "chosen image dropped: its sentence too far from the first chosen one for --subsequence-length"
SENTENCE_CUT = "chosen sentence longer than --subsequence-length allows: cut"
TEXT_CUT = "document without images cut to --subsequence-length"


@dataclass(frozen=True)
class DocSampling:
    """How preprocessing turns each interleaved document into training text (meta.json's
    ``doc_sampling`` records it)."""

    mode: str = "pack"
    """pack: every image, all text (Megatron-style packing later); paper: the module's rule."""
    max_images_per_doc: int = 5
    """At most this many images per document (paper mode)."""
    subsequence_length: int = 512
    """Laid-out positions per document at most: tokens, BOS, EOD and N + 2 per image (paper mode)."""
    num_image_tokens: int = 32
    """N, the visual embeddings per image; training must use the same N (paper mode)."""
    seed: int = 0
    """Seed of the image choice (paper mode)."""

    def __post_init__(self):
        if self.mode not in MODES:
            raise DataUsageError(f"--doc-sampling {self.mode}: the modes are {', '.join(MODES)}")
        for flag, value in (("--max-images-per-doc", self.max_images_per_doc),
                            ("--subsequence-length", self.subsequence_length),
                            ("--num-image-tokens", self.num_image_tokens)):
            if value < 1:
                raise DataUsageError(f"{flag} {value}: must be at least 1")

    @property
    def paper(self) -> bool:
        return self.mode == "paper"

    def budget(self, images: int, bos: bool, eod: bool) -> int:
        """Text tokens (BOS and EOD excluded) a subsequence with `images` image blocks can hold."""
        return self.subsequence_length - images * (self.num_image_tokens + 2) - int(bos) - int(eod)

    def check(self, fmt: str, bos: bool, eod: bool) -> None:
        """A DataUsageError for paper mode on a format it does not apply to, or a length that
        leaves no text beside max_images_per_doc blocks."""
        if not self.paper:
            return
        if fmt not in INTERLEAVED_FORMATS:
            raise DataUsageError(f"--doc-sampling paper: --input-format {fmt} is not interleaved documents (the rule "
                                 f"applies to {', '.join(INTERLEAVED_FORMATS)}); leave --doc-sampling at pack")
        if self.budget(self.max_images_per_doc, bos, eod) < 1:
            raise DataUsageError(
                f"--subsequence-length {self.subsequence_length}: no room for text beside --max-images-per-doc "
                f"{self.max_images_per_doc} blocks of N + 2 = {self.num_image_tokens + 2} positions "
                f"(at least {self.subsequence_length - self.budget(self.max_images_per_doc, bos, eod) + 1} needed)")

    def meta(self) -> Dict:
        """What meta.json records (pack mode: the mode alone)."""
        return asdict(self) if self.paper else {"mode": self.mode}


def document_identity(source: str) -> str:
    """The record's place with its file's directory removed: 'docs_shard_3_v2.jsonl.zip!docs_shard_3_v2.jsonl:17',
    'train-00001-of-01335.parquet:row 4'."""
    path, bang, member = source.partition("!")
    if bang:
        return path.rsplit("/", 1)[-1] + bang + member
    path, colon, place = source.rpartition(":")
    return (path.rsplit("/", 1)[-1] + colon + place) if colon else source.rsplit("/", 1)[-1]


def image_order(seed: int, identity: str, n: int) -> List[int]:
    """The document's image numbers 0..n-1 in the order they are tried: a uniformly random
    permutation drawn by hashing (seed, identity, number)."""
    base = hashlib.blake2b(f"{seed}\x00{identity}\x00".encode("utf-8", "surrogatepass"), digest_size=8)

    def key(i: int) -> bytes:
        h = base.copy()
        h.update(str(i).encode())
        return h.digest()
    return sorted(range(n), key=lambda i: (key(i), i))


def choose_images(seed: int, identity: str, n: int, k: int,
                  load: Callable[[int], Optional[T]]) -> List[Tuple[int, T]]:
    """(image number, load(number)) for the first k images of image_order whose load is not
    None (None: the image does not decode, the next one is tried), by image number."""
    chosen = []
    for i in image_order(seed, identity, n):
        if len(chosen) == k:
            break
        payload = load(i)
        if payload is not None:
            chosen.append((i, payload))
    return sorted(chosen, key=lambda c: c[0])


@dataclass(frozen=True)
class Window:
    """What one document keeps."""

    start: int
    """First token kept (an index into the document's tokens)."""
    end: int
    """One past the last token kept."""
    kept: int
    """How many of the chosen images stay: the first `kept` in document order."""
    sentence_cut: bool = False
    """The one chosen sentence was longer than the budget and was cut."""


def plan_window(spans: Sequence[Tuple[int, int]], chosen_sentences: Sequence[int], budget: Callable[[int], int],
                whole_sentences: bool = True) -> Window:
    """The window of a document whose sentences cover the contiguous token ranges `spans` (in
    order), around the chosen images' sentences (`chosen_sentences`: one sentence index per
    chosen image, in document order). budget(k): the text tokens a subsequence with k images
    may hold. Steps 2-4 of the module's rule."""
    lo, hi = (spans[0][0], spans[-1][1]) if len(spans) else (0, 0)
    k = len(chosen_sentences)
    if k == 0:
        return Window(lo, min(hi, lo + budget(0)), 0)
    first = chosen_sentences[0]
    start = spans[first][0]
    while k > 1 and spans[chosen_sentences[k - 1]][1] - start > budget(k):
        k -= 1
    last = chosen_sentences[k - 1]
    end = spans[last][1]
    if end - start > budget(k):   # k == 1: its sentence alone is longer than the budget
        return Window(start, start + budget(k), 1, sentence_cut=True)
    room = budget(k) - (end - start)
    if whole_sentences:
        starts_before = [s for s, _ in spans[:first]]          # ascending
        ends_after = [e for _, e in spans[last + 1:]]          # ascending

        def back(r: int) -> int:
            return next((s for s in starts_before if start - s <= r), start)

        def forward(r: int) -> int:
            return next((e for e in reversed(ends_after) if e - end <= r), end)
    else:
        def back(r: int) -> int:
            return max(lo, start - r)

        def forward(r: int) -> int:
            return min(hi, end + r)
    before = start - back(room // 2)
    after = forward(room - before) - end
    before = start - back(room - after)
    return Window(start - before, end + after, k)


def cut_document(rule: DocSampling, doc, tokens, spans: Sequence[Tuple[int, int]],
                 read_image: Callable, bos: bool, eod_id: Optional[int], report):
    """The paper's rule on one tokenized document: (tokens, [(start, end, image bytes)],
    [(skip reason, where)]) as encode_document returns them. `tokens` starts with BOS when
    `bos` and holds no EOD; spans[i] is sentence i's token range in it; doc.images are
    (sentence index, ImageRef); read_image(ref) -> (bytes, None) or (None, reason). What
    the rule leaves out is counted in `report` (Report.cut); the skips are returned."""
    skips: List[Tuple[str, str]] = []
    n = len(doc.images)

    def load(i: int) -> Optional[bytes]:
        ref = doc.images[i][1]
        data, why = read_image(ref)
        if why:
            skips.append((why, ref.name if ref.path is None else f"{doc.source} {ref.path}"))
        return data

    chosen = choose_images(rule.seed, document_identity(doc.source), n, min(rule.max_images_per_doc, n), load)
    # Document order: by sentence, then by the image's place in the record.
    chosen.sort(key=lambda c: (doc.images[c[0]][0], c[0]))
    eod = eod_id is not None
    window = plan_window(spans, [doc.images[i][0] for i, _ in chosen], lambda k: rule.budget(k, bos, eod))
    report.cut(NOT_CHOSEN, doc.source, n - len(chosen) - len(skips))   # never read: not chosen, not unreadable
    report.cut(DROPPED, doc.source, len(chosen) - window.kept)
    report.cut(SENTENCE_CUT, doc.source, int(window.sentence_cut))
    report.cut(TEXT_CUT, doc.source, int(not chosen and window.end < (spans[-1][1] if len(spans) else 0)))
    head = int(bos)
    shift = window.start - head
    out = list(tokens[:head]) + list(tokens[window.start:window.end]) + ([eod_id] if eod else [])
    images = []
    for i, data in chosen[:window.kept]:
        s, e = spans[doc.images[i][0]]
        images.append((s - shift, min(e, window.end) - shift, data))   # the window starts at or before s
    return out, images, skips
