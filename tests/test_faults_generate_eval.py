"""Faults of the reliability sweep (issue 20) in generation and evaluation: each bad flag, prompt
or file ends in one line naming it with its documented exit code (2 usage, 1 otherwise), never
a traceback, a silent wrong answer or an overwritten file. The tools run in this process (their
main() through errors.run_cli); the model cases share the session's tiny export."""

import hashlib
import importlib.util
import json
import os

import pytest
import torch

from megatron_vl.errors import run_cli
from megatron_vl.inference.generation import GenerationError, Generator, Sampling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TOOLS = {}


def tool(script, *argv, capsys):
    """(exit code, stdout + stderr) of tools/<script> run as `python tools/<script> argv`."""
    if script not in _TOOLS:
        spec = importlib.util.spec_from_file_location(f"_faults_{script[:-3]}", os.path.join(ROOT, "tools", script))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _TOOLS[script] = module
    capsys.readouterr()
    try:
        code = run_cli(_TOOLS[script].main, [str(a) for a in argv])
    except SystemExit as exc:   # argparse
        code = exc.code
    out = capsys.readouterr()
    return code, out.out + out.err


def md5(path):
    return hashlib.md5(open(path, "rb").read()).hexdigest()


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("MEGATRON_VL_DEBUG", raising=False)


@pytest.fixture(scope="module")
def gen(export):
    return Generator(str(export), add_bos=False)


# --- generate: flags and prompts refused before a model loads ------------------------------

@pytest.mark.parametrize("argv, code, says", [
    (["--prompt", "a", "--batch-size", "0"], 2, "argument --batch-size: must be at least 1, got 0"),       # G15
    (["--prompt", "a", "--text-to-image", "--text-only"], 2, "not allowed with argument"),                   # G06
    (["--prompt", "a", "--max-new-tokens", "-1"], 2, "argument --max-new-tokens: must be at least 1"),      # G08
    (["--prompt", "a", "--temperature", "-1"], 2, "argument --temperature: must be 0 (greedy) or more"),    # G09
    (["--prompt", "a", "--sample", "--top-p", "2"], 2, "argument --top-p: must be in (0, 1]"),
    (["--prompt", "a", "--sample", "--top-k", "-5"], 2, "argument --top-k: must be 0 (off) or more"),
    (["--prompt", "", "--no-add-bos"], 2, "--prompt 1 is empty and --no-add-bos leaves nothing"),          # G02
    (["--prompt", "ok", "--prompt", "caf\udcff\udcfe"], 2,                                                  # G13
     "--prompt 2 is not valid UTF-8 text (undecodable byte 0xff at character 3)"),
])
def test_generate_refuses_bad_flags_and_prompts(export, capsys, argv, code, says):
    got, out = tool("generate.py", "--hf-dir", export, *argv, capsys=capsys)
    assert got == code and says in out, out
    assert "Traceback" not in out


def test_generate_hf_dir_must_be_a_local_model_directory(tmp_path, capsys):
    # G01: transformers took a missing path for a Hub repo id ("Repo id must be in the form").
    code, out = tool("generate.py", "--hf-dir", tmp_path / "nonexist", "--prompt", "hi", capsys=capsys)
    assert code == 1 and f"error: --hf-dir {tmp_path / 'nonexist'}: no such directory" in out, out
    assert "Repo id" not in out
    code, out = tool("generate.py", "--hf-dir", tmp_path, "--prompt", "hi", capsys=capsys)
    assert code == 1 and "no config.json: not a transformers model directory" in out, out
    with pytest.raises(FileNotFoundError, match="no such directory"):   # the library checks the same
        Generator(str(tmp_path / "nonexist"))


@pytest.mark.parametrize("name, says", [
    ("model.safetensors", "cannot load the language model (SafetensorError"),
    ("vlgpt_config.json", "vlgpt_config.json: not valid JSON"),
    ("vlgpt_heads.safetensors", "vlgpt_heads.safetensors: cannot load the visual heads"),
    ("tokenizer.json", "cannot load the tokenizer"),
])
def test_generate_names_the_damaged_part_of_an_export(export, tmp_path, capsys, name, says):
    import shutil
    damaged = tmp_path / "hf"
    shutil.copytree(export, damaged, ignore=shutil.ignore_patterns("image_*"))
    config = json.load(open(damaged / "vlgpt_config.json"))
    json.dump(dict(config, image_tokenizer=None, image_detokenizer=None), open(damaged / "vlgpt_config.json", "w"))
    with open(damaged / name, "r+b") as fh:   # cut to its first 12 bytes
        fh.truncate(12)
    code, out = tool("generate.py", "--hf-dir", damaged, "--prompt", "a", capsys=capsys)
    assert code == 1 and says in out and "Traceback" not in out, out


def test_generate_never_overwrites_pngs_in_image_out(export, tmp_path, capsys):
    # G17: 000_0.png (the user's) was replaced by the generated image.
    (tmp_path / "000_0.png").write_text("mine")
    (tmp_path / "007_0.png").write_text("another prompt number: not ours")
    code, out = tool("generate.py", "--hf-dir", export, "--no-add-bos", "--prompt", "A photo of a red circle",
                     "--text-to-image", "--image-out", tmp_path, "--diffusion-steps", 1, capsys=capsys)
    assert code == 1 and f"--image-out {tmp_path} already holds 000_0.png" in out and "--overwrite" in out, out
    assert (tmp_path / "000_0.png").read_text() == "mine"
    code, out = tool("generate.py", "--hf-dir", export, "--prompt", "a", "--image-out", tmp_path / "000_0.png",
                     capsys=capsys)
    assert code == 2 and "is a file, not a directory" in out, out


# --- generate: the library's settings and prompts --------------------------------------------

@pytest.mark.parametrize("kwargs, says", [
    ({"max_new_tokens": -1}, "max_new_tokens must be at least 1, got -1"),
    ({"temperature": -1.0}, "temperature must be 0 (greedy) or more, got -1.0"),
    ({"top_p": 2.0}, "top_p must be in (0, 1]"),
    ({"top_k": -5}, "top_k must be 0 (off) or more"),
    ({"text_to_image": True, "text_only": True}, "text_to_image and text_only cannot both be set"),
    ({"stop": ("",)}, "stop strings must be non-empty"),
])
def test_sampling_settings_are_checked_by_the_python_api(kwargs, says):
    with pytest.raises(ValueError) as exc:
        Sampling(**kwargs)
    assert says in str(exc.value)


def test_empty_and_undecodable_prompts_are_refused_by_the_library(gen):
    with pytest.raises(GenerationError, match="is empty after tokenization"):
        gen.prompt("")
    with pytest.raises(GenerationError, match="not valid UTF-8"):
        gen.prompt("caf\udcff")
    with pytest.raises(ValueError, match="prompt 1 of 1 is empty"):
        gen.generate([type(gen.prompt("a"))([], [])], Sampling(max_new_tokens=2))


def test_prompts_beyond_the_position_table_are_refused_and_generation_stops_at_its_end(gen, export, capsys):
    # G10: an 881-element prompt on a 128-position model generated with no word.
    limit = gen.max_positions
    sentence = "the picture shows a red circle above a blue square. "
    code, out = tool("generate.py", "--hf-dir", export, "--no-add-bos", "--max-new-tokens", 4,
                     "--prompt", sentence * 80, capsys=capsys)
    n = len(gen.encode(sentence * 80))
    assert code == 2 and f"--prompt 1: prompt has {n} elements" in out and f"model's {limit} positions" in out, out
    # A prompt that fits, asked for more than is left: stops at the table's end, and says so.
    p = gen.prompt(sentence * 2)
    out = gen.generate([p], Sampling(max_new_tokens=limit, text_only=True))[0]
    assert out.stopped_by == "position limit" and len(p.tokens) + len(out.tokens) == limit


def test_user_text_never_becomes_special_tokens(gen):
    # G11: "[IMG]" in a text prompt became the image delimiter with no image after it.
    ids = gen.model.image_token_ids
    special = {ids["[IMG]"], ids["[/IMG]"], gen.tokenizer.eos_token_id, gen.tokenizer.bos_token_id}
    for text in ("a red [IMG] circle", "[/IMG] done", "end </s> more <s>"):
        assert not special & set(gen.encode(text)), text
        assert not special & set(gen.prompt(text).tokens), text


def test_answers_that_end_at_eos_carry_no_eos_text(gen, monkeypatch):
    # V23: the decoded answer kept the literal "</s>", which lowered CIDEr and VQA accuracy.
    lm = gen.model.causal_lm
    eos = gen.tokenizer.eos_token_id

    class EosOnThirdStep(torch.nn.Module):
        def __init__(self, head):
            super().__init__()
            self.head, self.calls = head, 0

        def forward(self, hidden):
            logits = self.head(hidden)
            self.calls += 1
            if self.calls >= 3:
                logits[..., eos] = 1e4
            return logits
    monkeypatch.setitem(lm._modules, "lm_head", EosOnThirdStep(lm.lm_head))
    out = gen.generate([gen.prompt("The picture shows a")], Sampling(max_new_tokens=10, text_only=True))[0]
    assert out.stopped_by == "eos" and out.tokens[-1] == eos and len(out.tokens) == 3
    assert "</s>" not in out.text and out.text == gen.decode(out.tokens[:-1])
    assert "</s>" not in gen.decode([*gen.encode("red"), eos])


# --- evaluate: results files --------------------------------------------------------------

@pytest.fixture(scope="module")
def ev(tmp_path_factory):
    d = tmp_path_factory.mktemp("ev")

    def put(name, data):
        with open(d / name, "w") as fh:
            json.dump(data, fh)
    qs = [{"question_id": i, "image_id": i, "question": f"what {i}?"} for i in (1, 2)]
    put("q.json", {"questions": qs})
    put("a.json", {"annotations": [{"question_id": i, "multiple_choice_answer": "red",
                                    "answers": [{"answer": "red"}] * 10} for i in (1, 2)]})
    put("r_ok.json", [{"question_id": 1, "answer": "red"}, {"question_id": 2, "answer": "red"}])
    put("r_empty.json", [])
    put("r_types.json", [{"question_id": 1, "answer": None}, {"question_id": 2, "answer": "red"}])
    put("r_dup.json", [{"question_id": 1, "answer": "red"}, {"question_id": 1, "answer": "blue"},
                       {"question_id": 2, "answer": "red"}])
    put("r_subset.json", [{"question_id": 1, "answer": "red"}])
    put("q_list.json", [1, 2])
    put("q_dup.json", {"questions": qs + qs[:1]})
    put("q_empty.json", {"questions": []})
    put("a_empty.json", {"annotations": []})
    put("a_noanswers.json", {"annotations": [{"question_id": 1}, {"question_id": 2}]})
    put("coco.json", {"images": [{"filepath": "x", "filename": f"{i}.jpg", "cocoid": i, "split": "test",
                                  "sentences": [{"raw": "a red circle"}]} for i in range(2)]})
    return d


def _score(ev, capsys, *extra, q="q.json", a="a.json", results="r_ok.json"):
    return tool("evaluate.py", "--task", "vqav2", "--questions", ev / q, "--annotations", ev / a,
                "--results", ev / results, *extra, capsys=capsys)


@pytest.mark.parametrize("files, code, says", [
    ({"results": "r_empty.json"}, 1, "r_empty.json: no results to score"),                              # V_empty
    ({"q": "q_empty.json", "a": "a_empty.json"}, 1, "no questions to score"),                           # V14
    ({"results": "r_types.json"}, 1, "r_types.json: [0]: 'answer' is null, expected a string"),          # V_types
    ({"q": "q_list.json"}, 1, "q_list.json: expected an object with a 'questions' list"),                # V12
    ({"a": "a_noanswers.json"}, 1, "a_noanswers.json: annotations[0] (question 1): no 'answers' key"),   # V10/V11
    ({"results": "r_dup.json"}, 1, "r_dup.json: [1]: question_id 1 has a result already"),               # V_dup
    ({"results": "r_subset.json"}, 2, "answer 1 of the 2 annotated questions; 1 missing, e.g. 2"),       # V_subset
    ({"q": "q_dup.json"}, 1, "q_dup.json: question_id 1 appears twice"),                                 # V13
])
def test_evaluate_names_what_is_wrong_with_its_files(ev, capsys, files, code, says):
    got, out = _score(ev, capsys, **files)
    assert got == code and says in out, out
    assert "Traceback" not in out and "Overall Accuracy" not in out


def test_evaluate_flags_that_do_not_go_together(ev, capsys):
    # V16: --task --results without the annotation files: TypeError from open(None).
    code, out = tool("evaluate.py", "--task", "vqav2", "--results", ev / "r_ok.json", capsys=capsys)
    assert code == 2 and "--task vqav2 needs --questions and --annotations" in out, out
    # V18: --tasks was ignored beside --task.
    code, out = _score(ev, capsys, "--tasks", "vqav2")
    assert code == 2 and "not allowed with argument" in out, out
    code, out = _score(ev, capsys, "--hf-dir", ev)
    assert code == 2 and "drop --hf-dir" in out, out
    # The answers of a --max-items 1 run are scored against the first item only when asked to.
    code, out = _score(ev, capsys, "--max-items", 1, results="r_subset.json")
    assert code == 0 and "Overall Accuracy is: 100.00" in out, out
    code, out = tool("evaluate.py", "--task", "vqav2", "--questions", ev / "q.json", capsys=capsys)
    assert code == 2 and "--task names the task of a --results file" in out, out


def test_evaluate_writes_scores_to_output_and_never_over_an_input(ev, export, tmp_path, capsys):
    # V19: --output in scoring mode was not written, with no note.
    code, out = _score(ev, capsys, "--output", tmp_path / "s.json")
    assert code == 0 and "Overall Accuracy is: 100.00" in out, out
    assert json.load(open(tmp_path / "s.json"))["figures"] == {"accuracy": 100.0, "count": 2}
    code, out = _score(ev, capsys, "--output", tmp_path / "s.json")
    assert code == 1 and "already exists" in out and "--overwrite" in out, out
    assert _score(ev, capsys, "--output", tmp_path / "s.json", "--overwrite")[0] == 0
    # V21: --output = the annotations file: the annotations were replaced by the results.
    before = md5(ev / "coco.json")
    code, out = tool("evaluate.py", "--hf-dir", export, "--tasks", "coco_caption", "--coco_caption-annotations",
                     ev / "coco.json", "--max-items", 1, "--no-progress", "--output", ev / "coco.json", "--overwrite",
                     capsys=capsys)
    assert code == 1 and f"--output {ev / 'coco.json'} is also an input of this run" in out, out
    assert md5(ev / "coco.json") == before
    code, out = _score(ev, capsys, "--output", ev / "r_ok.json", "--overwrite")
    assert code == 1 and "is also an input" in out, out


def test_metrics_refuse_nothing_to_score():
    from megatron_vl.eval import metrics
    with pytest.raises(ValueError, match="no answers to score"):
        metrics.vqa_accuracy({}, {})
    with pytest.raises(ValueError, match="not a string"):
        metrics.vqa_accuracy({1: None}, {1: ["red"] * 10})
    assert metrics.vqa_accuracy({1: "red"}, {1: ["red"] * 10}) == 100.0
