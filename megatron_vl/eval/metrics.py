"""The metrics of VL-GPT's evaluation, each as its field computes it.

- VQA accuracy (VQAv2, OK-VQA, VizWiz): the official evaluation's rule. The answer is
  normalised (punctuation, number words to digits, articles dropped, contractions restored);
  the ten human answers are normalised for punctuation when they disagree; the score is the
  mean over the ten leave-one-out subsets of min(#matching humans / 3, 1); the figure is 100 ×
  the mean over questions, rounded to 2 decimals, printed as the official script prints it.
- GQA: exact match after the same answer normalisation.
- CIDEr (COCO captions): pycocoevalcap's CIDEr-D scorer on PTB-tokenized captions (its
  tokenizer runs Java's Stanford PTBTokenizer); without Java, a documented Python
  approximation (lowercase, PTB's punctuation removed, split on spaces) — said in the output.
- FID (text-to-image): Inception-v3 features (torchmetrics' network, weights from a local
  file only) into float64 running sums per batch, reduced across ranks; CLIP score:
  torchmetrics' definition on a local CLIP directory, a running sum and count likewise.
"""

from __future__ import annotations

import re
import shutil
from typing import Dict, List, Optional, Sequence, Tuple

# --- VQA answer normalisation ---------------------------------------------------------

_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!"]
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_DECIMAL = re.compile(r"(?!<=\d)(\.)(?!\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# The official evaluation's contraction table (vqaEval.py), entry for entry: no forms derived
# from it. Words it lacks stay as written: "shed", "shell", "id", "were" are answers in their own
# right, and the human answers are never contraction-normalised, so restoring them in the
# prediction alone would fail a right answer. Its capitalised keys ("Im", "Ive", "Id've", "I'dve")
# never meet the lowercased words and are left out; its reversed "somebody'd=somebodyd" is kept.
_CONTRACTIONS = dict(pair.split("=") for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd
howll=how'll hows=how's isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll maam=ma'am
mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at
shant=shan't shed've=she'd've she'dve=she'd've shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've
shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've somebody'dve=somebody'd've
somebodyll=somebody'll somebodys=somebody's someoned=someone'd someoned've=someone'd've
someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd
somethingd've=something'd've something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd theyd've=they'd've
they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've
we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's
whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll
whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've
y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've youll=you'll
youre=you're youve=you've""".split())


def strip_punctuation(text: str) -> str:
    out = text
    for p in _PUNCTUATION:
        # A mark beside a space, or any mark in text with a digit group comma, goes; others become spaces.
        if (p + " " in text or " " + p in text) or _COMMA_BETWEEN_DIGITS.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The official script passes re.UNICODE (32) where sub() takes its count: at most 32 periods go.
    return _PERIOD_NOT_DECIMAL.sub("", out, count=32)


def digits_and_articles(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return digits_and_articles(strip_punctuation(answer))


def vqa_score(answer: str, human_answers: Sequence[str]) -> float:
    """One question's accuracy in [0, 1] against its (ten) human answers."""
    if not human_answers:
        raise ValueError("a question without human answers cannot be scored")
    # The humans' answers as the official script takes them: no whitespace cleaning (only the
    # prediction gets that), punctuation stripped only when the ten disagree.
    humans = list(human_answers)
    if len(set(humans)) > 1:
        humans = [strip_punctuation(h) for h in humans]
    mine = normalize_answer(answer)
    subsets = [humans[:i] + humans[i + 1:] for i in range(len(humans))]
    return sum(min(1.0, sum(h == mine for h in others) / 3.0) for others in subsets) / len(subsets)


def vqa_accuracy(answers: Dict, humans: Dict) -> float:
    """100 × mean accuracy over the questions of `answers` ({question_id: answer}),
    `humans` {question_id: [ten answers]}; rounded as the official script rounds it."""
    _check_answers(answers)
    scores = [vqa_score(answers[q], humans[q]) for q in answers]
    return round(100.0 * sum(scores) / len(scores), 2)


def _check_answers(answers: Dict) -> None:
    """No answers, or one that is not text, is a caller's error: named, not a ZeroDivisionError
    or an AttributeError from the normalisation."""
    if not answers:
        raise ValueError("no answers to score")
    for q, a in answers.items():
        if not isinstance(a, str):
            raise ValueError(f"the answer to {q!r} is {a!r}, not a string")


def exact_match(answers: Dict, truth: Dict) -> float:
    """GQA: 100 × the share of answers equal to the truth after normalisation."""
    _check_answers(answers)
    hits = [normalize_answer(answers[q]) == normalize_answer(truth[q]) for q in answers]
    return round(100.0 * sum(hits) / len(hits), 2)


# --- CIDEr --------------------------------------------------------------------------

# The punctuation pycocoevalcap's PTBTokenizer wrapper removes after tokenizing.
_PTB_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                    "...", ";"}
# PTB writes brackets as -LRB- ...; lowercased, the wrapper's list above no longer drops them.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}


def java_available() -> bool:
    return shutil.which("java") is not None


def python_ptb_tokenize(text: str) -> str:
    """Without Java: lowercase, the PTB tokenizer's splits approximated (punctuation and
    clitics like 's split off, decimals kept whole, brackets as -lrb- ...), the punctuation
    tokens pycocoevalcap removes removed. Abbreviations ("m.") are not recognised."""
    tokens = re.findall(r"\d+(?:[.,]\d+)+|\w+(?='\w)|'\w+|\w+|\.\.\.|--|[^\w\s]", text.lower())
    return " ".join(_BRACKETS.get(t, t) for t in tokens if t not in _PTB_PUNCTUATION)


def tokenize_captions(captions: Dict[object, List[str]], use_java: bool = True) -> Tuple[Dict, str]:
    """{id: [caption]} -> ({id: [tokenized]}, which tokenizer ran)."""
    if use_java and java_available():
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
        data = {k: [{"caption": c} for c in v] for k, v in captions.items()}
        return PTBTokenizer().tokenize(data), "PTB (Stanford CoreNLP, Java)"
    return ({k: [python_ptb_tokenize(c) for c in v] for k, v in captions.items()},
            "Python approximation of PTB (no Java found)")


def cider(candidates: Dict[object, str], references: Dict[object, List[str]], use_java: bool = True):
    """(CIDEr-D over the candidates' ids, per-id scores, tokenizer used), pycocoevalcap's scorer."""
    from pycocoevalcap.cider.cider import Cider
    _check_answers(candidates)
    ids = list(candidates)
    refs, how = tokenize_captions({i: references[i] for i in ids}, use_java)
    cands, _ = tokenize_captions({i: [candidates[i]] for i in ids}, use_java)
    score, per_id = Cider().compute_score(refs, cands)
    return float(score), [float(s) for s in per_id], how


# --- text-to-image: statistics that stream ---------------------------------------------------
#
# Each rank updates running sums batch by batch and drops the images; at the end one
# all_reduce per sum over the process group passed in gives the statistics of every rank's
# images together. Memory is the sums' (O(d²) for FID's d-wide features), whatever the number
# of images or ranks (torchmetrics' own sync gathers every rank's state first: world × d²).

def _sum_over(tensors: Sequence, group) -> None:
    """Sums each tensor in place over the ranks of `group` (None: this process alone)."""
    if group is None:
        return
    import torch.distributed as dist
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)


class FeatureMoments:
    """What FID needs of a set of feature vectors, as float64 running sums: the count, the
    sum and the sum of outer products (sums add across batches and ranks, so the moments of
    the union are one all_reduce away). Created on `device`; its width is set by the first update."""

    def __init__(self, device="cpu"):
        import torch
        self.device = torch.device(device)
        self.count = 0
        self.sum = None     # [d]
        self.outer = None   # [d, d]

    def update(self, features) -> None:
        """features: [n, d] (or anything of n rows) for n images."""
        import torch
        f = features.detach().reshape(features.shape[0], -1).to(self.device, torch.float64)
        if self.sum is None:
            self.sum = torch.zeros(f.shape[1], dtype=torch.float64, device=self.device)
            self.outer = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64, device=self.device)
        elif f.shape[1] != self.sum.numel():
            raise ValueError(f"features of width {f.shape[1]} after features of width {self.sum.numel()}: one "
                             "feature extractor must score every image")
        self.count += f.shape[0]
        self.sum += f.sum(0)
        self.outer.addmm_(f.T, f)

    def reduced(self, group) -> "FeatureMoments":
        """The moments of every rank's features in `group` (None: this rank's own), on every
        rank. A rank that saw no image takes part with zeros of the others' width."""
        import torch
        if group is None:
            return self
        import torch.distributed as dist
        width = torch.tensor([0 if self.sum is None else self.sum.numel()], dtype=torch.int64, device=self.device)
        dist.all_reduce(width, op=dist.ReduceOp.MAX, group=group)
        d = int(width.item())
        if self.sum is not None and self.sum.numel() != d:
            raise ValueError(f"this rank's features are {self.sum.numel()} wide, another rank's {d}: one feature "
                             "extractor must score every image")
        out = FeatureMoments(self.device)
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.device)
        out.sum = self.sum.clone() if self.sum is not None else torch.zeros(d, dtype=torch.float64, device=self.device)
        out.outer = (self.outer.clone() if self.outer is not None
                     else torch.zeros(d, d, dtype=torch.float64, device=self.device))
        _sum_over([count, out.sum, out.outer], group)
        out.count = int(count.item())
        return out

    def mean_and_covariance(self):
        """(mean [d], unbiased covariance [d, d]), as torchmetrics derives them from its sums."""
        import torch
        mean = self.sum / self.count
        # In place: one d x d allocation (32 MB at Inception's 2048) rather than three.
        return mean, torch.outer(mean, mean).mul_(-self.count).add_(self.outer).div_(self.count - 1)


def frechet_distance(real: FeatureMoments, fake: FeatureMoments) -> float:
    """FID of two sets' moments: |mu_r - mu_f|² + tr(S_r + S_f - 2 (S_r S_f)^½), the trace of the
    square root as torchmetrics takes it (the sum of the square roots of S_r S_f's eigenvalues),
    in float64."""
    import torch
    if real.count < 2 or fake.count < 2:
        raise ValueError(f"FID needs at least 2 real and 2 generated images, got {real.count} and {fake.count}")
    mu_r, s_r = real.mean_and_covariance()
    mu_f, s_f = fake.mean_and_covariance()
    distance = float((mu_r - mu_f).square().sum() + s_r.trace() + s_f.trace())
    product = s_r @ s_f
    del s_r, s_f   # eigvals' workspace then takes their place: three d x d at most, not five
    return distance - 2 * float(torch.linalg.eigvals(product).sqrt().real.sum())


def inception_extractor(weights: str):
    """Inception-v3's 2048-wide pool features (torch-fidelity's network through torchmetrics),
    weights from the local file only (torch-fidelity's pt_inception-2015-12-05)."""
    import importlib.util
    import os
    if not weights:
        raise FileNotFoundError("FID needs the Inception weights file (--fid-weights: torch-fidelity's "
                                "pt_inception-2015-12-05-6726825d.pth); nothing is downloaded")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"FID Inception weights file {weights}: no such file (--fid-weights)")
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ImportError("FID with Inception-v3 needs torch-fidelity (pip install torch-fidelity, with the "
                          "torchvision that matches your torch)") from None
    from torchmetrics.image.fid import NoTrainInceptionV3
    return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                              feature_extractor_weights_path=weights)


class StreamingFID:
    """FID from batches of uint8 [b, 3, H, W] images: each batch's features go into the real or
    generated moments and the images are not kept. Inception-v3 from the local `weights` file,
    or an injected `feature` module (tests, benchmarks) taking the same uint8 batches."""

    def __init__(self, weights: Optional[str] = None, feature=None, device="cpu"):
        self.extractor = (feature if feature is not None else inception_extractor(weights)).to(device).eval()
        self.device = device
        self.real = FeatureMoments(device)
        self.fake = FeatureMoments(device)

    def update(self, images, real: bool) -> None:
        import torch
        with torch.no_grad():
            features = self.extractor(images.to(self.device))
        (self.real if real else self.fake).update(features)

    def reduced(self, group) -> Tuple[FeatureMoments, FeatureMoments]:
        """(real, generated) moments over every rank of `group` (None: this rank's own).
        Collective: every rank of the group calls it."""
        return self.real.reduced(group), self.fake.reduced(group)

    def compute(self, group=None) -> float:
        return frechet_distance(*self.reduced(group))


class StreamingClipScore:
    """CLIP score (Hessel et al.; torchmetrics' definition), 100 × max(cos(image, caption), 0)
    averaged, as a float64 running sum and count over batches, with a local CLIPModel
    directory. Computed with transformers rather than torchmetrics' CLIPScore, which reads
    get_image_features() as a tensor and breaks on transformers 5 (a model output there)."""

    def __init__(self, clip_dir: str, device="cpu"):
        from transformers import CLIPModel, CLIPProcessor
        from ..model.directory import load_pretrained
        # complete: a directory lacking a tower or a projection (a CLIPVisionModel's) is refused
        # by name; transformers would score through random weights.
        self.model = load_pretrained(CLIPModel, clip_dir, "CLIP model (--clip-score-model)",
                                     complete=True).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(clip_dir)
        self.device = device
        self.total = 0.0
        self.count = 0

    def update(self, images, captions: Sequence[str]) -> None:
        """images: uint8 [b, 3, H, W] (or b such tensors), captions: the b captions they were drawn from."""
        import torch
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images for {len(captions)} captions")
        pictures = [im.permute(1, 2, 0).cpu().numpy() for im in images]
        inputs = self.processor(text=list(captions), images=pictures, return_tensors="pt", padding=True,
                                truncation=True)
        with torch.no_grad():
            out = self.model(**inputs.to(self.device))
        cos = torch.nn.functional.cosine_similarity(out.image_embeds.float(), out.text_embeds.float())
        self.total += float((100 * cos.clamp(min=0)).double().sum())
        self.count += len(captions)

    def compute(self, group=None) -> float:
        """The score over every rank of `group` (None: this rank's own). Collective."""
        import torch
        sums = torch.tensor([self.total, float(self.count)], dtype=torch.float64,
                            device=next(self.model.parameters()).device)
        _sum_over([sums], group)
        if sums[1] == 0:
            raise ValueError("CLIP score of no images")
        return float(sums[0] / sums[1])
