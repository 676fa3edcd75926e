"""The evaluation tasks' seam: a task is one registered class, tools/evaluate.py's choices and
per-task flags come from the registry, a task registered here runs through the tool and the
runner on tiny data, and the library takes dataclasses (never an argparse Namespace) and names
files by what they are, leaving flag names to the tool."""

import argparse
import importlib.util
import json
import os
import typing
from types import SimpleNamespace

import pytest
from PIL import Image

from megatron_vl.errors import UsageError, run_cli
from megatron_vl.eval import metrics
from megatron_vl.eval.records import EvalFileError, Item
from megatron_vl.eval.registry import REGISTRY, EvalTask, register
from megatron_vl.eval.runner import evaluate, table, text_to_image
from megatron_vl.eval.settings import EvalSettings, TaskFiles, as_eval_settings
from megatron_vl.eval.tasks import get_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILT_IN = ["coco_caption", "vqav2", "okvqa", "vizwiz", "gqa", "t2i"]


def _tool():
    spec = importlib.util.spec_from_file_location("_registry_evaluate", os.path.join(ROOT, "tools", "evaluate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOOL = _tool()


def run_tool(capsys, *argv):
    """(exit code, stdout + stderr) of `python tools/evaluate.py argv`, in this process."""
    capsys.readouterr()
    try:
        code = run_cli(TOOL.main, [str(a) for a in argv])
    except SystemExit as exc:   # argparse
        code = exc.code
    out = capsys.readouterr()
    return code, out.out + out.err


def choices(parser, flag):
    return next(a for a in parser._actions if flag in a.option_strings).choices


def flags_of(parser, prefix):
    return {s for a in parser._actions for s in a.option_strings if s.startswith(prefix)}


class Colours(EvalTask):
    """A benchmark of this test: the colour of each picture, one annotations file."""
    name = "colours"
    reads = ("annotations", "image_root")
    requires = ("annotations",)
    support = "the annotations file's other pictures"
    answer_tokens = 4
    results_layout = ("id", "colour")

    def read_items(self, files, split):
        rows = json.load(open(files.annotations))
        return [Item(r["id"], os.path.join(files.image_root or "", r["image"]), "", [r["colour"]], r["colour"])
                for r in rows]

    def prompt(self, item, examples):
        return "".join(f"<image>Colour: {e.answer}\n" for e in examples) + "<image>Colour:"

    def figures(self, results, truth, use_java):
        return {"hits": metrics.exact_match(results, {k: v[0] for k, v in truth.items()}), "count": len(results)}

    def official_line(self, figures):
        return f"Colour hits: {figures['hits']:.1f}"


@pytest.fixture
def colours(tmp_path):
    """Colours registered for the test (and removed after), with its tiny files: two pictures."""
    register(Colours)
    for name, rgb in (("r.png", (255, 0, 0)), ("b.png", (0, 0, 255))):
        Image.new("RGB", (8, 8), rgb).save(tmp_path / name)
    json.dump([{"id": 1, "image": "r.png", "colour": "red"}, {"id": 2, "image": "b.png", "colour": "blue"}],
              open(tmp_path / "colours.json", "w"))
    yield tmp_path
    del REGISTRY["colours"]


class ScriptedGenerator:
    """The runner's view of a Generator: records each prompt's text and image sizes, answers 'red '."""

    def __init__(self):
        self.prompts, self.samplings = [], []

    def prompt(self, text, images=()):
        self.prompts.append((text, [im.size for im in images]))
        return text

    def generate(self, prompts, sampling):
        self.samplings.append(sampling)
        return [SimpleNamespace(text=" red \n") for _ in prompts]


# --- the registry drives the tool ---------------------------------------------------------

def test_the_tools_task_choices_and_per_task_flags_come_from_the_registry(capsys):
    assert list(REGISTRY) == BUILT_IN
    parser = TOOL.build_parser()
    assert choices(parser, "--task") == choices(parser, "--tasks") == BUILT_IN
    # Each task's own flags are the files it reads, no more.
    assert flags_of(parser, "--gqa-") == {"--gqa-questions", "--gqa-train-questions", "--gqa-image-root"}
    assert flags_of(parser, "--coco_caption-") == {"--coco_caption-annotations", "--coco_caption-image-root"}
    assert flags_of(parser, "--vizwiz-") == {"--vizwiz-annotations", "--vizwiz-train-annotations",
                                             "--vizwiz-image-root"}
    # t2i's options are flags too; --t2i-size is its option, the others its files.
    assert flags_of(parser, "--t2i-") == {"--t2i-annotations", "--t2i-image-root", "--t2i-size"}
    for option in ("--fid-weights", "--clip-score-model", "--diffusion-steps", "--guidance-scale"):
        assert flags_of(parser, option) == {option}
    code, out = run_tool(capsys, "--task", "gqa", "--gqa-annotations", "a.json", "--results", "r.json")
    assert code == 2 and "unrecognized arguments: --gqa-annotations a.json" in out, out


def test_a_registered_task_is_a_choice_with_its_flags_and_scores_its_results_file(colours, capsys):
    parser = TOOL.build_parser()
    assert choices(parser, "--task") == BUILT_IN + ["colours"]
    assert flags_of(parser, "--colours-") == {"--colours-annotations", "--colours-image-root"}
    json.dump([{"id": 1, "colour": "Red"}, {"id": 2, "colour": "red"}], open(colours / "r.json", "w"))
    code, out = run_tool(capsys, "--task", "colours", "--colours-annotations", colours / "colours.json",
                         "--results", colours / "r.json")
    assert (code, out) == (0, "Colour hits: 50.0\n")
    code, out = run_tool(capsys, "--task", "colours", "--results", colours / "r.json")
    assert (code, out) == (2, "error: --task colours needs --annotations (or --colours-annotations)\n")


def test_a_registered_task_runs_through_the_runner(colours):
    gen = ScriptedGenerator()
    settings = EvalSettings(files=TaskFiles(annotations=str(colours / "colours.json"), image_root=str(colours)),
                            batch_size=2, seed=3)
    r = evaluate(gen, "colours", settings, [0, 1])
    assert r == {"shots": {0: {"hits": 50.0, "count": 2}, 1: {"hits": 50.0, "count": 2}},
                 "answers": {0: {1: "red", 2: "red"}, 1: {1: "red", 2: "red"}}}
    # Zero-shot: the item's image alone; one shot: the other picture (the only candidate) first.
    assert gen.prompts == [("<image>Colour:", [(8, 8)]), ("<image>Colour:", [(8, 8)]),
                           ("<image>Colour: blue\n<image>Colour:", [(8, 8), (8, 8)]),
                           ("<image>Colour: red\n<image>Colour:", [(8, 8), (8, 8)])]
    assert [(s.max_new_tokens, tuple(s.stop), s.text_only) for s in gen.samplings] == [(4, ("\n",), True)] * 2
    assert table({"colours": r}).splitlines() == ["task          metric          0-shot    1-shot",
                                                  "colours       hits             50.00     50.00"]


# --- the library takes dataclasses --------------------------------------------------------

def test_library_functions_refuse_an_argparse_namespace(colours):
    flags = argparse.Namespace(annotations=str(colours / "colours.json"), image_root=str(colours), max_items=0)
    with pytest.raises(TypeError, match="^got an argparse Namespace where EvalSettings is expected"):
        evaluate(ScriptedGenerator(), "colours", flags, [0])
    with pytest.raises(TypeError, match="^got an argparse Namespace where TaskFiles is expected"):
        get_task("colours").items(flags)
    with pytest.raises(TypeError, match="^got an argparse Namespace where TaskFiles is expected"):
        EvalSettings(files=flags)


def test_library_signatures_are_typed_on_the_settings_dataclasses():
    assert typing.get_type_hints(evaluate)["settings"] is EvalSettings
    assert typing.get_type_hints(text_to_image)["settings"] is EvalSettings
    assert typing.get_type_hints(EvalTask.items)["files"] is TaskFiles
    assert typing.get_type_hints(EvalTask.read_items)["files"] is TaskFiles
    # argparse is imported by settings.py alone, to refuse its Namespace.
    eval_dir = os.path.join(ROOT, "megatron_vl", "eval")
    importing = sorted(n for n in os.listdir(eval_dir) if n.endswith(".py")
                       and "import argparse" in open(os.path.join(eval_dir, n)).read())
    assert importing == ["settings.py"]


def test_a_flat_record_of_the_settings_names_becomes_eval_settings():
    record = SimpleNamespace(annotations="a.json", image_root="img", max_items=3, batch_size=2, seed=1,
                             fid_weights=None, diffusion_steps=1, t2i_size=32)
    settings = as_eval_settings(record, [o.name for o in get_task("t2i").options])
    assert settings == EvalSettings(files=TaskFiles(annotations="a.json", image_root="img"), max_items=3, batch_size=2,
                                    seed=1, options={"diffusion_steps": 1, "t2i_size": 32})
    assert get_task("t2i").option_values(settings) == {"fid_weights": None, "clip_score_model": None,
                                                       "diffusion_steps": 1, "guidance_scale": 7.5, "t2i_size": 32,
                                                       "fid_feature": None, "generated_images_dir": None}
    with pytest.raises(TypeError, match=r"^not settings of this task: \['no_java'\]"):
        as_eval_settings(SimpleNamespace(no_java=True), [])
    with pytest.raises(TypeError, match=r"^gqa has no options \['fid_weights'\] \(it has: none\)"):
        get_task("gqa").option_values(EvalSettings(options={"fid_weights": "w"}))


def test_the_tool_builds_each_tasks_settings_from_its_flags():
    args = TOOL.build_parser().parse_args(["--hf-dir", "m", "--tasks", "t2i", "gqa", "--annotations", "a.json",
                                           "--questions", "q.json", "--gqa-questions", "g.json", "--image-root", "img",
                                           "--fid-weights", "w.pth", "--diffusion-steps", "3", "--no-java"])
    assert TOOL.task_settings(args, "t2i") == EvalSettings(
        files=TaskFiles(annotations="a.json", image_root="img"), use_java=False,
        options={"fid_weights": "w.pth", "diffusion_steps": 3, "guidance_scale": 7.5})
    assert TOOL.task_settings(args, "gqa") == EvalSettings(files=TaskFiles(questions="g.json", image_root="img"),
                                                           use_java=False)


# --- errors name files by what they are; the tool names flags ----------------------------------

def test_library_errors_name_the_file_not_a_flag(tmp_path):
    json.dump([1, 2], open(tmp_path / "q.json", "w"))
    json.dump({"annotations": []}, open(tmp_path / "a.json", "w"))
    json.dump([], open(tmp_path / "r.json", "w"))
    vqa = get_task("vqav2")
    with pytest.raises(EvalFileError) as bad:
        vqa.items(TaskFiles(questions=str(tmp_path / "q.json"), annotations=str(tmp_path / "a.json")))
    assert str(bad.value) == (f"questions file {tmp_path / 'q.json'}: expected an object with a 'questions' list "
                              "(the VQA questions layout), found list")
    with pytest.raises(EvalFileError) as bad:
        vqa.items(TaskFiles(questions="q.json", annotations="a.json", train_questions=str(tmp_path / "q.json"),
                            train_annotations=str(tmp_path / "a.json")), "train")
    assert str(bad.value).startswith(f"train questions file {tmp_path / 'q.json'}: expected an object")
    with pytest.raises(UsageError) as bad:
        vqa.items(TaskFiles(questions=str(tmp_path / "q.json")))
    assert str(bad.value) == "vqav2 needs its annotations file (settings annotations)"
    with pytest.raises(EvalFileError) as bad:
        vqa.read_results(str(tmp_path / "r.json"))
    assert str(bad.value) == f"results file {tmp_path / 'r.json'}: no results to score (an empty list)"
    json.dump({"questions": [{"question_id": 1, "image_id": 7, "question": "q?"}]}, open(tmp_path / "q1.json", "w"))
    json.dump({"annotations": [{"question_id": 1, "answers": [{"answer": "x"}]}]}, open(tmp_path / "a1.json", "w"))
    with pytest.raises(UsageError) as bad:
        vqa.items(TaskFiles(questions=str(tmp_path / "q1.json"), annotations=str(tmp_path / "a1.json"),
                            image_pattern="{imageid}.jpg"))
    assert str(bad.value) == (f"image file pattern '{{imageid}}.jpg' cannot name the image of questions file "
                              f"{tmp_path / 'q1.json'}: questions[0] (image_id 7): 'imageid'")


def test_the_tool_speaks_in_flags(tmp_path, capsys):
    code, out = run_tool(capsys, "--task", "vqav2", "--results", tmp_path / "r.json")
    assert (code, out) == (2, "error: --task vqav2 needs --questions and --annotations (or --vqav2-questions and "
                              "--vqav2-annotations)\n")
    code, out = run_tool(capsys, "--hf-dir", tmp_path, "--tasks", "coco_caption", "gqa", "--annotations", "a.json")
    assert (code, out) == (2, "error: --tasks gqa needs --questions (or --gqa-questions)\n")
    code, out = run_tool(capsys, "--task", "t2i", "--annotations", "a.json", "--results", tmp_path / "r.json")
    assert (code, out) == (2, "error: --task t2i has no results file to score: run the model on it with --hf-dir "
                              "and --tasks t2i\n")


def test_register_refuses_a_declaration_that_cannot_work():
    class Typo(Colours):
        name = "typo"
        reads = ("annotation",)
    with pytest.raises(ValueError, match=r"^Typo: reads \['annotation'\], not TaskFiles fields"):
        register(Typo)

    class Twice(Colours):
        name = "vqav2"
    with pytest.raises(ValueError, match=r"^Twice: task 'vqav2' is registered already \(VQAv2\)"):
        register(Twice)
    assert "typo" not in REGISTRY and REGISTRY["vqav2"].__name__ == "VQAv2"
