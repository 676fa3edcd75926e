"""The evaluation harness: metrics against hand-computed expectations (VQA accuracy with its
normalisation and ten-subset averaging, CIDEr-D from its formula, FID and CLIP score with
tiny models), k-shot prompts exactly as documented, results files scored as the official
scripts print them, and every task end to end on a tiny export."""

import json
import math
import os
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron_vl.eval import metrics
from megatron_vl.eval.tasks import Item, prompt, support
from pretrain_helpers import PY, run_script


@pytest.mark.parametrize("answer,normalized", [
    ("Two", "2"), ("the dog.", "dog"), ("A man's hat!", "man's hat"), ("dont", "don't"), ("yes, it is", "yes it is"),
    ("1,000", "1000"), ("3.5", "3.5"), ("x/y", "x y"), ("Ten dogs", "10 dogs"), ("couldnt've", "couldn't've"),
    ("  none\t", "0"),
])
def test_answer_normalisation(answer, normalized):
    assert metrics.normalize_answer(answer) == normalized


def test_vqa_accuracy_averages_the_ten_leave_one_out_subsets():
    # 4 humans say "2": leaving out one of them leaves 3 matches (1.0), leaving out another leaves 4 (1.0).
    assert metrics.vqa_score("two", ["2"] * 4 + ["3"] * 6) == 1.0
    # 3 say "red": 3 subsets keep 2 matches (2/3), 7 keep 3 (1.0): (3 * 2/3 + 7) / 10 = 0.9.
    assert metrics.vqa_score("Red.", ["red"] * 3 + ["blue"] * 7) == pytest.approx(0.9)
    # 1 says "cat": 1 subset keeps 0, 9 keep 1 (1/3): 9 * (1/3) / 10 = 0.3.
    assert metrics.vqa_score("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)
    # Humans that agree are not normalised (the official rule): "the dog" never equals "dog".
    assert metrics.vqa_score("the dog", ["the dog"] * 10) == 0.0
    # ... but when they disagree, their punctuation is: "dog." counts as "dog"; "dog!" becomes
    # "dog " (a mark not beside a space turns into one, and humans' answers are not re-stripped).
    assert metrics.vqa_score("dog", ["dog."] * 3 + ["cat"] * 7) == pytest.approx(0.9)
    assert metrics.vqa_score("dog", ["dog!"] * 3 + ["cat"] * 7) == 0.0
    answers = {1: "two", 2: "cat"}
    humans = {1: ["2"] * 10, 2: ["cat"] + ["dog"] * 9}
    assert metrics.vqa_accuracy(answers, humans) == round(100 * (1.0 + 0.3) / 2, 2) == 65.0
    assert metrics.exact_match({1: "The Dog", 2: "no"}, {1: "dog", 2: "yes"}) == 50.0


def hand_cider(candidates, references, n=4, sigma=6.0):
    """CIDEr-D from its definition (Vedantam et al.; the coco-caption implementation's choices:
    document frequency over each image's reference set, log(#images) as the idf numerator,
    clipped candidate tf, a Gaussian length penalty, x10)."""
    def grams(words, k):
        return Counter(tuple(words[i:i + k]) for i in range(len(words) - k + 1))
    images = list(candidates)
    df = Counter()
    for i in images:
        seen = set()
        for ref in references[i]:
            for k in range(1, n + 1):
                seen.update(grams(ref.split(), k))
        df.update(seen)
    log_n = math.log(len(images))

    def vector(text):
        words = text.split()
        vec, norm = [], []
        for k in range(1, n + 1):
            v = {g: c * (log_n - math.log(max(1.0, df[g]))) for g, c in grams(words, k).items()}
            vec.append(v)
            norm.append(math.sqrt(sum(x * x for x in v.values())))
        return vec, norm, len(words)

    scores = []
    for i in images:
        cv, cn, cl = vector(candidates[i])
        total = np.zeros(n)
        for ref in references[i]:
            rv, rn, rl = vector(ref)
            for k in range(n):
                val = sum(min(x, rv[k].get(g, 0.0)) * rv[k].get(g, 0.0) for g, x in cv[k].items())
                if cn[k] and rn[k]:
                    val /= cn[k] * rn[k]
                total[k] += val * math.exp(-((cl - rl) ** 2) / (2 * sigma ** 2))
        scores.append(total.mean() / len(references[i]) * 10.0)
    return float(np.mean(scores)), scores


def test_cider_equals_the_formula_by_hand():
    refs = {1: ["a red circle above a blue square", "a red circle over a blue box", "red circle and blue square"],
            2: ["two dogs play in the park", "dogs playing in a park", "two dogs running"],
            3: ["a green triangle", "one green triangle on white", "a triangle that is green"]}
    cands = {1: "a red circle above a square", 2: "two dogs in the park", 3: "a blue circle"}
    expected, per_image = hand_cider(cands, refs)
    for use_java in (True, False):     # lowercase, no punctuation: both tokenizers leave these alone
        got, got_per, how = metrics.cider(cands, refs, use_java)
        assert got == pytest.approx(expected, rel=1e-9) and got_per == pytest.approx(per_image, rel=1e-9)
        assert how.startswith("PTB (Stanford") == (use_java and metrics.java_available())
    sentences = {0: ["A Dog's toy, (red)!"], 1: ["Two men -- one tall; one short."], 2: ["It's 3.5 meters long..."]}
    python, _ = metrics.tokenize_captions(sentences, use_java=False)
    assert python == {0: ["a dog 's toy -lrb- red -rrb-"], 1: ["two men one tall one short"],
                      2: ["it 's 3.5 meters long"]}
    if metrics.java_available():   # the approximation agrees with Java's PTB tokenizer on these
        java, how = metrics.tokenize_captions(sentences, use_java=True)
        assert how.startswith("PTB (Stanford") and java == python


def test_fid_and_clip_score_with_tiny_models(tmp_path):
    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8, generator=g)
    fake = torch.clamp(real.int() + 40, 0, 255).to(torch.uint8)

    class Pool(torch.nn.Module):        # a tiny feature extractor: 4 pooled channels-positions
        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x.float(), 2)[:, 0].flatten(1)

    def features(images):
        return Pool()(images).double().numpy()
    a, b = features(real), features(fake)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    trace_sqrt = np.sqrt(np.linalg.eigvals(cov_a @ cov_b).real.clip(min=0)).sum()
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt
    fid = metrics.StreamingFID(feature=Pool())
    for start in (0, 5, 10):            # batches of 5, 5, 2: only the sums are kept
        fid.update(real[start:start + 5], real=True)
        fid.update(fake[start:start + 5], real=False)
    assert (fid.real.count, fid.fake.count) == (12, 12) and fid.real.outer.shape == (4, 4)
    assert fid.compute() == pytest.approx(expected, rel=1e-9)
    with pytest.raises(FileNotFoundError, match="--fid-weights"):
        metrics.StreamingFID()
    missing = r"^FID Inception weights file .*none\.pth: no such file \(--fid-weights\)$"
    with pytest.raises(FileNotFoundError, match=missing):
        metrics.StreamingFID(str(tmp_path / "none.pth"))
    one = metrics.StreamingFID(feature=Pool())
    one.update(real[:1], real=True)
    one.update(fake, real=False)
    with pytest.raises(ValueError, match="^FID needs at least 2 real and 2 generated images, got 1 and 12$"):
        one.compute()

    clip_dir = save_tiny_clip_model(tmp_path / "clip")
    from transformers import CLIPModel, CLIPProcessor
    model, processor = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)
    captions = ["a red circle", "two dogs", "a green triangle"]
    images = real[:3]
    with torch.no_grad():
        inputs = processor(text=captions, images=[im.permute(1, 2, 0).numpy() for im in images], return_tensors="pt",
                           padding=True)
        out = model(**inputs)
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
    expected = float((100 * cos.clamp(min=0)).mean())
    clip = metrics.StreamingClipScore(clip_dir)
    clip.update(images[:2], captions[:2])
    clip.update(images[2:], captions[2:])
    assert clip.count == 3 and clip.compute() == pytest.approx(expected, rel=1e-4, abs=1e-4)
    with pytest.raises(ValueError, match="^2 images for 1 captions$"):
        clip.update(images[:2], captions[:1])


def save_tiny_clip_model(path):
    """A random CLIPModel (text + vision) with a CLIPProcessor, no downloads."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    from megatron_vl.testing.tiny_models import save_tiny_sd_text
    save_tiny_sd_text(str(path / "sd"))
    tokenizer = CLIPTokenizer.from_pretrained(str(path / "sd" / "tokenizer"))
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=tokenizer.vocab_size, hidden_size=24, intermediate_size=48,
                                      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
                     vision_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                        image_size=32, patch_size=8), projection_dim=16)
    CLIPModel(cfg).save_pretrained(str(path))
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                     crop_size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(str(path))
    return str(path)


def test_k_shot_prompts_are_assembled_as_documented():
    pool = [Item(i, f"{i}.jpg", f"q{i}?", [f"a{i}"], f"a{i}") for i in range(10)]
    item = pool[3]
    examples = support(item, pool, 2, seed=5)
    assert item not in examples and len(set(e.id for e in examples)) == 2
    assert support(item, pool, 2, seed=5) == examples                # the same draw every time
    assert prompt("vqav2", item, examples) == (f"<image>Question: {examples[0].question} Short answer: "
                                                f"{examples[0].answer}\n<image>Question: {examples[1].question} "
                                                f"Short answer: {examples[1].answer}\n<image>Question: q3? Short answer:")
    assert prompt("coco_caption", item, examples[:1]) == f"<image>Caption: {examples[0].answer}\n<image>Caption:"
    assert prompt("gqa", item, []) == "<image>Question: q3? Short answer:"
    with pytest.raises(ValueError, match="8-shot prompts need 8 support examples"):
        support(item, pool[:5], 8, 0)


# --- files in the real formats, on the tiny export ----------------------------------------------

def test_results_files_are_scored_as_the_official_scripts_print(annotations, tmp_path):
    results = [{"question_id": 100 + i, "answer": ["Circle.", "square", "two"][i % 3]} for i in range(6)]
    json.dump(results, open(tmp_path / "r.json", "w"))
    out = run_script([PY, "tools/evaluate.py", "--task", "vqav2", "--questions", annotations / "q.json",
                      "--annotations", annotations / "a.json", "--image-root", annotations / "val2014",
                      "--results", tmp_path / "r.json"])
    # circle: 4 humans -> 1.0; square: 6 humans -> 1.0; two: 0. Two of each.
    assert "Overall Accuracy is: 66.67" in out
    json.dump([{"image_id": i, "caption": f"a drawing number {i}"} for i in range(3)], open(tmp_path / "c.json", "w"))
    out = run_script([PY, "tools/evaluate.py", "--task", "coco_caption", "--annotations",
                      annotations / "dataset_coco.json", "--image-root", annotations, "--results", tmp_path / "c.json"])
    refs = {i: [f"a drawing number {i}", f"shapes in picture {i}"] for i in range(3)}
    expected, _ = hand_cider({i: f"a drawing number {i}" for i in range(3)}, refs)
    assert f"CIDEr: {expected:.3f}" in out
    json.dump([{"question_id": 999, "answer": "x"}], open(tmp_path / "bad.json", "w"))
    out = run_script([PY, "tools/evaluate.py", "--task", "vqav2", "--questions", annotations / "q.json",
                      "--annotations", annotations / "a.json", "--results", tmp_path / "bad.json"], expect=2)
    assert "error: results name 1 id(s) the annotations lack, e.g. 999" in out


@pytest.mark.timeout(400)
def test_every_task_end_to_end_on_the_tiny_export(export, annotations, tmp_path):
    a = annotations
    out = run_script([PY, "tools/evaluate.py", "--hf-dir", export, "--tasks", "coco_caption", "vqav2", "okvqa",
                      "vizwiz", "gqa", "--shots", 0, 1, "--coco_caption-annotations", a / "dataset_coco.json",
                      "--coco_caption-image-root", a, "--questions", a / "q.json", "--annotations", a / "a.json",
                      "--train-questions", a / "q.json", "--train-annotations", a / "a.json",
                      "--image-root", a / "val2014", "--vizwiz-annotations", a / "vizwiz.json",
                      "--vizwiz-train-annotations", a / "vizwiz.json", "--gqa-questions", a / "gqa.json",
                      "--gqa-train-questions", a / "gqa.json", "--max-items", 2, "--output", tmp_path / "r.json",
                      "--no-progress"], timeout=380)
    header = [line for line in out.splitlines() if line.startswith("task")][0]
    assert header.split() == ["task", "metric", "0-shot", "1-shot"]
    for task, metric in (("coco_caption", "CIDEr"), ("vqav2", "accuracy"), ("okvqa", "accuracy"),
                         ("vizwiz", "accuracy"), ("gqa", "accuracy")):
        assert any(line.split()[:2] == [task, metric] for line in out.splitlines()), task
    saved = json.load(open(tmp_path / "r.json"))
    assert len(saved["vqav2"]["answers"]["1"]) == 2 and saved["vqav2"]["shots"]["0"]["count"] == 2
    # The figures are the scorer's on the saved answers: a results file gives the same number.
    json.dump([{"question_id": int(q), "answer": t} for q, t in saved["vqav2"]["answers"]["0"].items()],
              open(tmp_path / "v.json", "w"))
    again = run_script([PY, "tools/evaluate.py", "--task", "vqav2", "--questions", a / "q.json", "--annotations",
                        a / "a.json", "--results", tmp_path / "v.json", "--max-items", 2])
    assert f"Overall Accuracy is: {saved['vqav2']['shots']['0']['accuracy']:.02f}" in again
    out = run_script([PY, "tools/evaluate.py", "--hf-dir", export, "--tasks", "t2i", "--annotations",
                      a / "dataset_coco.json", "--image-root", a, "--max-items", 2, "--no-progress",
                      "--diffusion-steps", 1], expect=2)
    assert "error: FID needs the Inception weights file (--fid-weights" in out


@pytest.mark.timeout(300)
def test_text_to_image_task_scores_fid_and_clip_score(export, annotations, tmp_path):
    from megatron_vl.eval.runner import evaluate
    from megatron_vl.inference.generation import Generator

    class Pool(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x.float(), 2).flatten(1)
    clip_dir = save_tiny_clip_model(tmp_path / "clip")
    args = SimpleNamespace(annotations=str(annotations / "dataset_coco.json"), image_root=str(annotations),
                           max_items=3, batch_size=2, fid_weights=None, fid_feature=Pool(), clip_score_model=clip_dir,
                           t2i_size=32, diffusion_steps=1, guidance_scale=7.5, seed=0,
                           generated_images_dir=str(tmp_path / "generated"))
    r = evaluate(Generator(str(export)), "t2i", args, [0])
    figures = r["shots"][0]
    assert figures["count"] == 3 and 0 <= figures["CLIP score"] <= 100
    # The streamed figures are the stacked ones of the images it wrote (PNG: the same pixels)
    # against the real images resized to them.
    from PIL import Image
    from megatron_vl.eval.tasks import get_task
    items = get_task("t2i").items(metrics_files(annotations))[:3]
    assert sorted(os.listdir(tmp_path / "generated")) == sorted(f"{item.id}.png" for item in items)
    fake = [np.asarray(Image.open(tmp_path / "generated" / f"{item.id}.png").convert("RGB")) for item in items]
    real = [np.asarray(Image.open(item.image).convert("RGB").resize((32, 32))) for item in items]
    from torchmetrics.image.fid import FrechetInceptionDistance
    stacked = FrechetInceptionDistance(feature=Pool())   # its result in the features' float32
    stacked.update(torch.from_numpy(np.stack(real)).permute(0, 3, 1, 2), real=True)
    stacked.update(torch.from_numpy(np.stack(fake)).permute(0, 3, 1, 2), real=False)
    assert figures["FID"] == pytest.approx(float(stacked.compute()), rel=1e-6)
    clip = metrics.StreamingClipScore(clip_dir)
    clip.update(torch.from_numpy(np.stack(fake)).permute(0, 3, 1, 2), [item.question for item in items])
    assert figures["CLIP score"] == pytest.approx(clip.compute(), rel=1e-5)


def metrics_files(annotations):
    from megatron_vl.eval.settings import TaskFiles
    return TaskFiles(annotations=str(annotations / "dataset_coco.json"), image_root=str(annotations))


@pytest.mark.timeout(400)
def test_tasks_run_on_the_training_model_at_the_eval_interval(vl_data, annotations, tmp_path):
    """ZeRO-3 on 2 ranks: every rank answers every item in lockstep; rank 0 prints, the
    reporting rank logs the figures to TensorBoard beside the losses."""
    from megatron_vl.model.image_tokenizer import ImageTokenizer, ImageTokenizerConfig, load_image_processor
    from megatron_vl.testing.distributed import free_port
    from pretrain_helpers import EMBED_DIM, NUM_IMAGE_TOKENS, logged_losses, tiny_args
    clip = os.path.join(os.path.dirname(os.path.dirname(vl_data)), "clip")
    ImageTokenizer.from_clip(clip, ImageTokenizerConfig(NUM_IMAGE_TOKENS, EMBED_DIM, 1, 2)).save_pretrained(
        str(tmp_path / "itok"), load_image_processor(clip))
    a = annotations
    json.dump({"vqav2": {"questions": str(a / "q.json"), "annotations": str(a / "a.json"),
                         "train_questions": str(a / "q.json"), "train_annotations": str(a / "a.json"),
                         "image_root": str(a / "val2014")},
               "coco_caption": {"annotations": str(a / "dataset_coco.json"), "image_root": str(a)}},
              open(tmp_path / "tasks.json", "w"))
    out = run_script(["torchrun", "--nproc_per_node", 2, "--master_port", free_port(), "pretrain_vlgpt.py",
                      *tiny_args(vl_data, "--zero-stage", 3, "--eval-interval", 1, "--eval-tasks", "vqav2",
                                 "coco_caption", "--eval-tasks-config", tmp_path / "tasks.json",
                                 "--eval-image-tokenizer", tmp_path / "itok", "--eval-max-items", 1,
                                 "--eval-shots", 0, 1, "--tensorboard-dir", tmp_path / "tb", iters=2)], timeout=380)
    assert sorted(logged_losses(out)) == [1, 2]
    lines = [line for line in out.splitlines() if line.startswith("evaluation at iteration")]
    assert [line.split(" |")[0] for line in lines] == ["evaluation at iteration 1", "evaluation at iteration 2"]
    for part in ("vqav2 0-shot accuracy: ", "vqav2 1-shot accuracy: ", "coco_caption 0-shot CIDEr: "):
        assert part in lines[0], lines[0]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"eval/vqav2/accuracy_0shot", "eval/coco_caption/CIDEr_1shot", "train/lm_loss"} <= set(events.Tags()["scalars"])
    bad = run_script([PY, "pretrain_vlgpt.py", *tiny_args(vl_data, "--eval-tasks", "vqav2")], expect=2)
    assert "--eval-tasks needs --eval-tasks-config" in bad
