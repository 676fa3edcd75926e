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
- FID (text-to-image): torchmetrics, Inception weights from a local file only; CLIP score:
  torchmetrics' definition on a local CLIP directory.
"""

from __future__ import annotations

import re
import shutil
from typing import Dict, List, Sequence, Tuple

# --- VQA answer normalisation ---------------------------------------------------------

_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!"]
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_DECIMAL = re.compile(r"(?!<=\d)(\.)(?!\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# Contractions as the official evaluation restores them; each is also reached from its
# forms with any one apostrophe dropped ("dont" -> "don't", "couldnt've" -> "couldn't've").
_CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he's how'd how'll how's i'd i'd've i'm i've isn't it'd it'd've it'll let's ma'am mightn't
mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd she'd've she'll she's
should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll
someone's something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've
they'll they're they've 'twas wasn't we'd we'd've we're we've weren't what'll what're what's what've when's
where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't
wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've""".split()


def _contraction_map() -> Dict[str, str]:
    out: Dict[str, str] = {}
    for word in _CONTRACTED:
        out[word.replace("'", "")] = word
        marks = [i for i, c in enumerate(word) if c == "'"]
        if len(marks) > 1:
            for i in marks:
                out[word[:i] + word[i + 1:]] = word
    return out


_CONTRACTIONS = _contraction_map()


def strip_punctuation(text: str) -> str:
    out = text
    for p in _PUNCTUATION:
        # A mark beside a space, or any mark in text with a digit group comma, goes; others become spaces.
        if (p + " " in text or " " + p in text) or _COMMA_BETWEEN_DIGITS.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_DECIMAL.sub("", out)


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
    humans = [h.replace("\n", " ").replace("\t", " ").strip() for h in human_answers]
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


# --- text-to-image --------------------------------------------------------------------

def fid(real_images, fake_images, weights: str = None, feature=None) -> float:
    """FID between two lists of uint8 [3, H, W] tensors, torchmetrics' FrechetInceptionDistance:
    Inception-v3 from the local `weights` file (torch-fidelity's pt_inception-2015-12-05),
    or an injected `feature` module (tests)."""
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance
    if feature is None:
        if not weights:
            raise FileNotFoundError("FID needs the Inception weights file (--fid-weights: torch-fidelity's "
                                    "pt_inception-2015-12-05-6726825d.pth); nothing is downloaded")
        import importlib.util
        if importlib.util.find_spec("torch_fidelity") is None:
            raise ImportError("FID with Inception-v3 needs torch-fidelity (pip install torch-fidelity, with the "
                              "torchvision that matches your torch)") from None
        metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights)
    else:
        metric = FrechetInceptionDistance(feature=feature)
    metric.update(torch.stack(list(real_images)), real=True)
    metric.update(torch.stack(list(fake_images)), real=False)
    return float(metric.compute())


def clip_score(images, captions: Sequence[str], clip_dir: str) -> float:
    """CLIP score (Hessel et al.; torchmetrics' definition): 100 × max(cos(image, text), 0)
    averaged, with a local CLIPModel directory. Computed here with transformers rather than
    torchmetrics' CLIPScore, which reads get_image_features() as a tensor and breaks on
    transformers 5 (it returns a model output there)."""
    import torch
    from transformers import CLIPModel, CLIPProcessor
    from ..model.directory import load_pretrained
    # complete: a directory lacking a tower or a projection (a CLIPVisionModel's) is refused by
    # name; transformers would score through random weights.
    model = load_pretrained(CLIPModel, clip_dir, "CLIP model (--clip-score-model)", complete=True).eval()
    processor = CLIPProcessor.from_pretrained(clip_dir)
    pictures = [im.permute(1, 2, 0).cpu().numpy() for im in images]
    with torch.no_grad():
        out = model(**processor(text=list(captions), images=pictures, return_tensors="pt", padding=True))
    cos = torch.nn.functional.cosine_similarity(out.image_embeds.float(), out.text_embeds.float())
    return float((100 * cos.clamp(min=0)).mean())
