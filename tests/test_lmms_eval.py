"""`--model vlgpt` in lmms-eval 0.7.3 (megatron_vl/eval/lmms) on the tiny export, offline, over
local tasks (megatron_vl.testing.lmms_tasks) on the same VQA items as tests/test_eval.py:
its answers equal tools/evaluate.py's item by item, its log-likelihoods equal a direct forward
pass, multiple_choice takes the argmin, two torchrun ranks answer as one process does, and
bad settings fail in one line naming them. One lmms-eval CLI run is shared by the checks.
(The lmms-eval CLI exits 0 whatever happens: the checks read the files it writes.)"""

import glob
import json
import os
from importlib.metadata import entry_points

import pytest
import torch

from helpers import require_lmms_eval  # noqa: E402

require_lmms_eval("lmms-eval is not installed (pip install -e .[lmms]; tests/run.sh installs it)")

from megatron_vl.testing.lmms_tasks import task_names, write_vqa_tasks  # noqa: E402
from pretrain_helpers import PY, run_script  # noqa: E402

VQA, MC, LL = task_names("vlgpt_t")


def lmms_eval_argv(export, include, out, batch_size=4):
    return ["-m", "lmms_eval", "--model", "vlgpt", "--model_args", f"pretrained={export}", "--tasks",
            f"{VQA},{MC},{LL}", "--include_path", include, "--batch_size", batch_size, "--output_path", out,
            "--log_samples"]


def offline(tmp):
    """Nothing downloads; lmms-eval's dataset cache lives in the test's directory."""
    return {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp / "hf")}


def read_run(out, log):
    """(results.json, {task: {doc_id: sample}}) that an lmms-eval run wrote under `out`."""
    results = glob.glob(os.path.join(out, "**", "*_results.json"), recursive=True)
    assert len(results) == 1, f"lmms-eval wrote no results (it exits 0 on errors); its output ends:\n{log[-3000:]}"
    samples = {}
    for task in (VQA, MC, LL):
        [path] = glob.glob(os.path.join(out, "**", f"*_samples_{task}.jsonl"), recursive=True)
        samples[task] = {s["doc_id"]: s for s in map(json.loads, open(path))}
    return json.load(open(results[0])), samples


@pytest.fixture(scope="module")
def tasks(annotations, tmp_path_factory):
    return write_vqa_tasks(tmp_path_factory.mktemp("lmms_tasks"), annotations, prefix="vlgpt_t")


@pytest.fixture(scope="module")
def run(export, annotations, tasks, tmp_path_factory):
    """One lmms-eval CLI run (batches of 4) and tools/evaluate.py's vqav2 answers (batches of 8)."""
    assert "vlgpt" in {e.name for e in entry_points(group="lmms_eval.models")}, \
        "megatron-vl is installed without its lmms_eval.models entry point: pip install -e .[lmms]"
    tmp = tmp_path_factory.mktemp("lmms_run")
    log = run_script([PY, *lmms_eval_argv(export, tasks, tmp / "out")], timeout=300, **offline(tmp))
    results, samples = read_run(tmp / "out", log)
    a = annotations
    run_script([PY, "tools/evaluate.py", "--hf-dir", export, "--tasks", "vqav2", "--questions", a / "q.json",
                "--annotations", a / "a.json", "--image-root", a / "val2014", "--output", tmp / "ours.json",
                "--no-progress"])
    ours = json.load(open(tmp / "ours.json"))["vqav2"]
    docs = [json.loads(line) for line in open(tasks / "data.jsonl")]
    return results, samples, ours, docs


def test_answers_equal_tools_evaluate_item_by_item(run):
    results, samples, ours, docs = run
    assert len(docs) == 6
    answers = ours["answers"]["0"]
    got = {str(docs[d]["question_id"]): s["filtered_resps"] for d, s in samples[VQA].items()}
    assert got == answers
    assert any(a.strip() for a in answers.values())   # not all empty: a real comparison
    assert samples[VQA][0]["input"] == "<image>Question: what is shape 0? Short answer:"
    # The task's vqa_accuracy is our metric on each answer: the mean is tools/evaluate.py's figure.
    assert results["results"][VQA]["vqa_accuracy,none"] == pytest.approx(ours["shots"]["0"]["accuracy"])
    assert results["results"][VQA]["exact_match,none"] == \
        pytest.approx(sum(a == "circle" for a in answers.values()) / 6)


def expected(gen, doc, continuation):
    """(mean NLL of the continuation's tokens, each of them the argmax, their count) by one
    unpadded forward of VLGPTForCausalLM: the continuation's tokens are those prompt +
    continuation has beyond the prompt's."""
    from megatron_vl.model.directory import open_image
    image = [open_image(doc["image"])]
    text = f"<image>Question: {doc['question']} Short answer:"
    ctx, whole = gen.prompt(text, image), gen.prompt(text + continuation, image)
    n = len(whole.tokens) - len(ctx.tokens)
    assert n > 0 and whole.tokens[:len(ctx.tokens)] == ctx.tokens
    ids = torch.tensor([whole.tokens])
    mask = torch.tensor([[v is not None for v in whole.visual]])
    vis = torch.stack([v if v is not None else torch.zeros(gen.model.config["visual_embed_dim"])
                       for v in whole.visual])[None]
    with torch.no_grad():
        logits = gen.model(ids, vis, mask).logits[0].float()
    log_probs = torch.log_softmax(logits[-n - 1:-1], -1)
    nll = -float(log_probs.gather(-1, ids[0, -n:, None]).double().mean())
    return nll, bool((log_probs.argmax(-1) == ids[0, -n:]).all()), n


def test_loglikelihood_equals_a_forward_pass_and_multiple_choice_takes_the_argmin(run, export):
    from megatron_vl.inference.generation import Generator
    results, samples, _, docs = run
    gen = Generator(str(export))
    lengths = set()
    for d, doc in enumerate(docs):
        ll = samples[LL][d]
        assert ll["target"] == " " + doc["answer"]
        nll, greedy, _ = expected(gen, doc, " circle")
        assert ll["nll"] == pytest.approx(nll, rel=1e-5, abs=1e-6) and ll["acc"] == float(greedy)
        # multiple_choice: one request per choice, " " + choice; lmms-eval keeps the argmin.
        want = [expected(gen, doc, " " + c) for c in doc["choices"]]
        got = [(float(nll), greedy == "True") for nll, greedy in samples[MC][d]["filtered_resps"]]
        assert [g for _, g in got] == [w[1] for w in want]
        assert [n for n, _ in got] == pytest.approx([w[0] for w in want], rel=1e-5, abs=1e-6)
        assert samples[MC][d]["acc"] == float(min(range(3), key=lambda k: want[k][0]) == doc["label"])
        lengths |= {w[2] for w in want}
    assert lengths == {1, 3}   # " star" takes 3 tokens: a mean, not a sum
    assert {doc["label"] for doc in docs} == {0, 1, 2}   # the answer's place varies: acc 1 is no accident
    assert results["results"][MC]["acc,none"] == 1.0   # the tiny model ranks "circle" first


@pytest.mark.slow
def test_two_torchrun_ranks_answer_as_one_process(run, export, tasks, tmp_path):
    from megatron_vl.testing.distributed import free_port
    _, one, _, _ = run
    log = run_script([PY, "-m", "torch.distributed.run", "--nproc_per_node", 2, "--master_port", free_port(),
                      *lmms_eval_argv(export, tasks, tmp_path / "out", batch_size=2)], timeout=300,
                     **offline(tmp_path))
    assert "Running on rank 1 (local rank 1)" in log
    _, two = read_run(tmp_path / "out", log)
    assert {d: s["filtered_resps"] for d, s in two[VQA].items()} == \
        {d: s["filtered_resps"] for d, s in one[VQA].items()}
    assert [two[LL][d]["nll"] for d in range(6)] == pytest.approx([one[LL][d]["nll"] for d in range(6)], rel=1e-5)
    assert [two[MC][d]["acc"] for d in range(6)] == [one[MC][d]["acc"] for d in range(6)]


# --- in this process: the model class itself ----------------------------------------------------

def request(kind, args, doc_id=0, task=VQA):
    from lmms_eval.api.instance import Instance
    return Instance(request_type=kind, arguments=(*args, doc_id, task, "test"), idx=0,
                    metadata={"task": task, "doc_id": doc_id, "repeats": 1})


@pytest.fixture(scope="module")
def lm(export, tasks):
    from megatron_vl.eval.lmms.model import VLGPTLmms
    model = VLGPTLmms(pretrained=str(export), batch_size="2")
    docs = [json.loads(line) for line in open(tasks / "data.jsonl")]
    model.task_dict = {VQA: {"test": docs}}
    return model


def one_image(doc):
    from megatron_vl.model.directory import open_image
    return [open_image(doc["image"])]


def test_bad_settings_fail_in_one_line_naming_them(lm, export, tmp_path):
    from megatron_vl.errors import UsageError
    from megatron_vl.eval.lmms.model import VLGPTLmms
    cases = [
        (lambda: VLGPTLmms(pretrained=str(tmp_path / "none")),
         f"model_args pretrained={tmp_path / 'none'}: no such directory (a tools/convert_checkpoint.py export-hf "
         "output)"),
        (lambda: VLGPTLmms(pretrained=str(export), beams=2),
         "model_args beams: unknown to the vlgpt model; it takes pretrained, image_tokenizer, device, batch_size, "
         "dtype, image_outputs, text_to_image, diffusion_steps, guidance_scale, image_size"),
        (lambda: VLGPTLmms(pretrained=str(export), image_tokenizer=str(tmp_path / "none")),
         f"model_args image_tokenizer={tmp_path / 'none'}: no such directory"),
        (lambda: VLGPTLmms(pretrained=str(export), dtype="float8"),
         "model_args dtype=float8: expected one of auto, float32, bfloat16, float16"),
        (lambda: VLGPTLmms(pretrained=str(export), batch_size="auto"),
         "model_args batch_size=auto: expected a whole number, 1 or more (auto is not supported)"),
        (lambda: lm.generate_until([request("generate_until", ("<image>Q: a? A:", {"num_beams": 2}, one_image))]),
         f"task {VQA} doc 0: gen_kwargs num_beams=2: the vlgpt model has no beam search (greedy or sampling only); "
         "use num_beams=1"),
        (lambda: lm.generate_until([request("generate_until", ("<image><image>Q: a? A:", {}, one_image))]),
         f"task {VQA} doc 0: the prompt has 2 <image> tag(s) for 1 image(s) from doc_to_visual; give one tag per "
         "image, in order, or none (then they go in front)"),
        (lambda: lm.loglikelihood([request("loglikelihood", ("<image><image>Q: a? A:", " b", one_image))]),
         f"task {VQA} doc 0: the prompt has 2 <image> tag(s) for 1 image(s) from doc_to_visual; give one tag per "
         "image, in order, or none (then they go in front)"),
        (lambda: lm.generate_until_multi_round([]),
         "the vlgpt model does not run generate_until_multi_round tasks (multi-round chat): use generate_until, "
         "loglikelihood or multiple_choice tasks"),
        (lambda: lm.chat_template,
         "--apply_chat_template: the vlgpt model has no chat template (VL-GPT prompts are plain text); run without it"),
    ]
    for call, message in cases:
        with pytest.raises(UsageError) as caught:
            call()
        assert str(caught.value) == message
    # model_args batch_size and device over the CLI's (lmms-eval passes --batch_size always).
    model = VLGPTLmms.create_from_arg_string(f"pretrained={export},batch_size=3,device=cpu",
                                             {"batch_size": "1", "max_batch_size": None, "device": None})
    assert model.batch_size == 3 and str(model.device) == "cpu"


def test_untagged_prompts_get_their_images_in_front_and_clean_keeps_the_model(lm, export):
    from lmms_eval.api.instance import GenerationResult
    from megatron_vl.eval.lmms.model import VLGPTLmms
    reqs = [request("generate_until", (text, {"until": ["\n"], "max_new_tokens": 10}, one_image), doc_id=d)
            for d, text in [(0, "Question: what is shape 0? Short answer:"),
                            (1, "<image>Question: what is shape 1? Short answer:")]]
    tagged = [request("generate_until", ("<image>Question: what is shape 0? Short answer:", {"until": ["\n"],
                                         "max_new_tokens": 10}, one_image), doc_id=0)]
    out = lm.generate_until(reqs)
    assert all(isinstance(o, GenerationResult) for o in out)
    assert out[0].text == lm.generate_until(tagged)[0].text
    # image_tokenizer=DIR (here the export's own, loaded from its directory): the same answers.
    other = VLGPTLmms(pretrained=str(export), image_tokenizer=str(export / "image_tokenizer"))
    other.task_dict = lm.task_dict
    assert [o.text for o in other.generate_until(reqs)] == [o.text for o in out]
    lm.probe = torch.nn.Linear(1, 1)   # lmms-eval's clean() deletes every nn.Module attribute
    lm.clean()
    assert isinstance(lm.probe, torch.nn.Linear) and lm.backend is not None


class FakeBackend:
    """Backend stand-in: records the sampling, makes one image per prompt, draws gray squares."""
    can_generate_images = True
    device = torch.device("cpu")

    def __init__(self):
        self.samplings, self.seeds = [], []

    def prompt(self, text, images):
        from megatron_vl.inference.decode_loop import Prompt
        return Prompt([1, 2, 3], [None] * 3)

    def generate(self, prompts, sampling):
        from megatron_vl.inference.decode_loop import Generation
        self.samplings.append(sampling)
        return [Generation(" a <image> b ", [5, 6, 0, 7], [torch.zeros(4, 8)], "eos") for _ in prompts]

    def image_decoder(self):
        from PIL import Image

        seeds = self.seeds

        class Decoder:
            def decode(self, embeds, mode, height, width, steps, guidance, seed):
                assert embeds.shape == (1, 4, 8)
                seeds.append(seed)
                return [Image.new("RGB", (8, 8), (128, 128, 128))]
        return Decoder()


def test_gen_kwargs_and_image_outputs(tmp_path):
    from megatron_vl.eval.lmms.model import VLGPTLmms
    backend = FakeBackend()
    lm = VLGPTLmms(backend=backend, image_outputs=str(tmp_path / "img"))
    lm.task_dict = {"t2i": {"test": [{}] * 4}}
    kw = {"until": "\n\n", "max_new_tokens": 7, "temperature": 0.7, "top_p": 0.9, "do_sample": True,
          "image_aspect_ratio": "pad"}   # another model's setting: ignored
    [answer] = lm.generate_until([request("generate_until", ("draw", kw, lambda doc: []), doc_id=3, task="t2i")])
    s = backend.samplings[0]
    assert (s.max_new_tokens, s.temperature, s.top_p, s.stop, s.text_only) == (7, 0.7, 0.9, ("\n\n",), False)
    path = str(tmp_path / "img" / "t2i_3_0.png")
    assert json.loads(answer.text) == {"text": "a  b", "images": [path]} and os.path.isfile(path)
    assert backend.seeds == [[3]]   # one noise seed per doc: the same picture in any batch, on any rank
    lm.generate_until([request("generate_until", ("x", dict(kw, do_sample=False), lambda doc: []), task="t2i")])
    assert backend.samplings[1].temperature == 0.0   # do_sample false: greedy whatever the temperature
    # pope's, mathverse's, mmsearch's gen_kwargs: greedy, with top_p 0 (ignored, as transformers does).
    pope = {"max_new_tokens": 128, "temperature": 0, "top_p": 0, "num_beams": 1, "do_sample": False}
    lm.generate_until([request("generate_until", ("x", pope, lambda doc: []), task="t2i")])
    s = backend.samplings[2]
    assert (s.max_new_tokens, s.temperature, s.top_p, s.top_k) == (128, 0.0, 1.0, 0)
    # do_sample without a temperature samples at 1, as transformers does.
    lm.generate_until([request("generate_until", ("x", {"do_sample": True, "top_p": 0.5}, lambda doc: []),
                               task="t2i")])
    assert (backend.samplings[3].temperature, backend.samplings[3].top_p) == (1.0, 0.5)
    # text_to_image=true: every answer must open an image right after the prompt (text-to-image tasks).
    t2i = VLGPTLmms(backend=backend, image_outputs=str(tmp_path / "img"), text_to_image=True)
    t2i.task_dict = lm.task_dict
    t2i.generate_until([request("generate_until", ("a red circle", {"max_new_tokens": 40}, lambda doc: []),
                                task="t2i")])
    assert (backend.samplings[4].text_to_image, backend.samplings[4].text_only) == (True, False)
    from megatron_vl.errors import UsageError
    with pytest.raises(UsageError, match=r"^model_args text_to_image=true needs image_outputs=DIR \(where the images "
                                         r"go\)$"):
        VLGPTLmms(backend=backend, text_to_image=True)


def test_tasks_the_model_cannot_run_are_found_from_their_yaml(tmp_path):
    """--eval-harness lmms checks each task's YAML before training starts (groups expanded):
    its output type and its generation_kwargs, one line each."""
    from megatron_vl.eval.lmms.checks import resolve_tasks, task_problems
    common = ("dataset_path: json\ndataset_kwargs: {data_files: {test: /nowhere.jsonl}}\ntest_split: test\n"
              "doc_to_text: question\ndoc_to_target: answer\n")
    tasks = {
        "chk_ok": "output_type: generate_until\ngeneration_kwargs: {max_new_tokens: 8, temperature: 0, top_p: 0, "
                  "num_beams: 1, do_sample: false}\n",
        "chk_beams": "output_type: generate_until\ngeneration_kwargs: {max_new_tokens: 8, num_beams: 3}\n",
        "chk_rounds": "output_type: generate_until_multi_round\n",
        "chk_mc": "output_type: multiple_choice\ndoc_to_choice: choices\n",
        "chk_ll": "output_type: loglikelihood\n",
    }
    for name, body in tasks.items():
        (tmp_path / f"{name}.yaml").write_text(f"task: {name}\n{common}{body}")
    (tmp_path / "chk_group.yaml").write_text("group: chk_group\ntask: [chk_ok, chk_beams]\n")
    names = ["chk_group", "chk_rounds", "chk_mc", "chk_ok", "chk_ll"]
    manager, unknown = resolve_tasks(str(tmp_path), names)
    assert unknown == []
    assert task_problems(manager, names) == [
        "--eval-tasks chk_group (its task chk_beams): gen_kwargs num_beams=3: the vlgpt model has no beam search "
        "(greedy or sampling only); use num_beams=1",
        "--eval-tasks chk_rounds: output_type generate_until_multi_round; the vlgpt model runs generate_until, "
        "loglikelihood, multiple_choice tasks",
        "--eval-tasks chk_ll: a loglikelihood task needs its own process_results (lmms-eval 0.7.3's default "
        "unpacks the one-element results list as a pair and fails for any model: `ll, greedy = results[0]`, see "
        "megatron_vl/testing/lmms_tasks.py)"]
