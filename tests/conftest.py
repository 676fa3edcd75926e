import json
import os

import pytest
import torch

# tests/ is on sys.path (pytest.ini's pythonpath): the tests import data_helpers, pretrain_helpers
# and helpers as top-level modules.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
torch.set_num_threads(min(2, torch.get_num_threads()))


# `-m "not slow"`: the quick subset (under 3 minutes on 2 cores). Slow: whole training runs,
# multi-process jobs and exports, i.e. the modules below and any test on the session's tiny
# training data (building it alone runs preprocessing and feature extraction).
SLOW_MODULES = {"test_pretrain_script", "test_pretrain", "test_eval", "test_export_vlgpt", "test_finetune",
                "test_reshard", "test_stage1", "test_convert", "test_examples", "test_stage1_decode", "test_launcher",
                "test_zero3", "test_plan_memory", "test_generation", "test_tensor_parallel", "test_parallel_state",
                "test_faults_checkpoints", "test_pretrain_gpu"}
SLOW_FIXTURES = {"vl_data", "export"}


def pytest_collection_modifyitems(config, items):
    slow = pytest.mark.slow
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES or SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def vl_data(tmp_path_factory):
    """Dataset prefix of the tiny multimodal corpus the pretraining tests share."""
    from pretrain_helpers import build_vl_data
    return build_vl_data(str(tmp_path_factory.mktemp("vl_data")))


@pytest.fixture(scope="session")
def export(vl_data, tmp_path_factory):
    """A tiny VL-GPT export with an image tokenizer and an image detokenizer (tiny SD 1.5 +
    IP-Adapter-Plus beside it): what generation and evaluation run on."""
    from pretrain_helpers import EMBED_DIM, NUM_IMAGE_TOKENS, PY, run_script, tiny_args
    from megatron_vl.model.detokenizer_targets import condition_shapes
    from megatron_vl.model.image_detokenizer import ImageDetokenizer, ImageDetokenizerConfig
    from megatron_vl.model.image_tokenizer import ImageTokenizer, ImageTokenizerConfig, load_image_processor
    from megatron_vl.testing.tiny_models import save_tiny_ip_adapter, save_tiny_sd
    d = tmp_path_factory.mktemp("generation")
    root = os.path.dirname(os.path.dirname(vl_data))
    clip = os.path.join(root, "clip")
    ImageTokenizer.from_clip(clip, ImageTokenizerConfig(NUM_IMAGE_TOKENS, EMBED_DIM, 1, 2)).save_pretrained(
        str(d / "image_tokenizer"), load_image_processor(clip))
    save_tiny_sd(str(d / "sd"))
    save_tiny_ip_adapter(str(d / "ip"), str(d / "sd"), "ip.safetensors")
    shapes = condition_shapes(str(d / "ip" / "image_encoder"), str(d / "sd"))
    ImageDetokenizer(ImageDetokenizerConfig(EMBED_DIM, *shapes, width=32, num_layers=1, num_heads=2,
                                            sd_dir=str(d / "sd"), ip_adapter_dir=str(d / "ip"),
                                            ip_adapter_weight="ip.safetensors")).save_pretrained(str(d / "detok"))
    run_script([PY, "pretrain_vlgpt.py", *tiny_args(vl_data, "--save", d / "ckpt", iters=3)])
    run_script([PY, "tools/convert_checkpoint.py", "export-hf", "--load", d / "ckpt", "--save", d / "hf",
                "--image-tokenizer", d / "image_tokenizer", "--image-detokenizer", d / "detok"])
    return d / "hf"


@pytest.fixture(scope="session")
def annotations(vl_data, tmp_path_factory):
    """Tiny annotation files of every task, on the sample corpus's drawings."""
    d = tmp_path_factory.mktemp("annotations")
    root = os.path.join(os.path.dirname(os.path.dirname(vl_data)), "sample", "mmc4", "images")
    names = sorted(os.listdir(root))[:6]
    import shutil
    (d / "val2014").mkdir()
    for i, n in enumerate(names):
        shutil.copy(os.path.join(root, n), d / "val2014" / f"COCO_val2014_{i:012d}.jpg")
        shutil.copy(os.path.join(root, n), d / "val2014" / f"VizWiz_val_{i:08d}.jpg")
        shutil.copy(os.path.join(root, n), d / "val2014" / f"n{i}.jpg")
    karpathy = {"images": [{"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg", "cocoid": i,
                            "split": "test" if i < 3 else "train",
                            "sentences": [{"raw": f"a drawing number {i}"}, {"raw": f"shapes in picture {i}"}]}
                           for i in range(6)]}
    json.dump(karpathy, open(d / "dataset_coco.json", "w"))
    questions = {"questions": [{"question_id": 100 + i, "image_id": i, "question": f"what is shape {i}?"}
                               for i in range(6)]}
    answers = {"annotations": [{"question_id": 100 + i, "image_id": i, "multiple_choice_answer": "circle",
                                "question_type": "what", "answer_type": "other",
                                "answers": [{"answer": "circle" if k < 4 else "square", "answer_confidence": "yes",
                                             "answer_id": k + 1} for k in range(10)]} for i in range(6)]}
    json.dump(questions, open(d / "q.json", "w"))
    json.dump(answers, open(d / "a.json", "w"))
    json.dump([{"image": f"VizWiz_val_{i:08d}.jpg", "question": "what is it?", "answerable": 1, "answer_type": "other",
                "answers": [{"answer": "circle", "answer_confidence": "yes"}] * 10} for i in range(3)],
              open(d / "vizwiz.json", "w"))
    json.dump({f"q{i}": {"imageId": f"n{i}", "question": "is it red?", "answer": "yes"} for i in range(3)},
              open(d / "gqa.json", "w"))
    return d
