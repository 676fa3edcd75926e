"""Stage 3's data: templates render conversations into exactly the documented strings, the
loss mask covers the answers only (token by token, through packing), each instruction format
is read from files in its real schema with its broken records counted, and the targets of a
sample do not depend on context tokens."""

import io
import json

import numpy as np
import pytest

from megatron_vl.data.conversation import (ASSISTANT, DEFAULT_SYSTEM, USER, Conversation, Template, Turn,
                                           encode_pieces, get_template, register)
from megatron_vl.data.packing import IGNORE, PackingConfig, materialize
from pretrain_helpers import PY, run_script

IMG, END, EOS = 900, 901, 2


def conv(image=False, edit=False):
    first = Turn(USER, "What is it?", ["IN"] if image or edit else [])
    if edit:
        return Conversation("t", [first, Turn(ASSISTANT, "", ["OUT"])])
    return Conversation("t", [first, Turn(ASSISTANT, "A cat."), Turn(USER, "Color?"), Turn(ASSISTANT, "Black.")])


def text_of(pieces):
    """The pieces as one string: context in [..], answers in {..}, images as <IN>/<OUT>."""
    out = ""
    for kind, value, answer in pieces:
        s = "</s>" if kind == "eos" else f"<{value}>" if kind == "image" else value
        out += "{" + s + "}" if answer else "[" + s + "]"
    return out


EXPECTED = {
    ("vicuna_v1", False): f"[{DEFAULT_SYSTEM} USER: What is it? ASSISTANT:]{{ A cat.}}{{</s>}}[USER: Color? ASSISTANT:]"
                          "{ Black.}{</s>}",
    ("vicuna_v1", True): f"[{DEFAULT_SYSTEM} USER: ][<IN>][\nWhat is it? ASSISTANT:]{{ A cat.}}{{</s>}}"
                         "[USER: Color? ASSISTANT:]{ Black.}{</s>}",
    ("llama2_chat", False): f"[[INST] <<SYS>>\n{DEFAULT_SYSTEM}\n<</SYS>>\n\nWhat is it? [/INST]]{{ A cat. }}{{</s>}}"
                            "[[INST] Color? [/INST]]{ Black. }{</s>}",
    ("llama2_chat", True): f"[[INST] <<SYS>>\n{DEFAULT_SYSTEM}\n<</SYS>>\n\n][<IN>][\nWhat is it? [/INST]]"
                           "{ A cat. }{</s>}[[INST] Color? [/INST]]{ Black. }{</s>}",
    ("plain", False): "[What is it?]{A cat.}{</s>}[Color?]{Black.}{</s>}",
    ("plain", True): "[][<IN>][What is it?]{A cat.}{</s>}[Color?]{Black.}{</s>}",
}


@pytest.mark.parametrize("name,image", sorted(EXPECTED))
def test_templates_render_the_documented_strings(name, image):
    assert text_of(get_template(name).render(conv(image))) == EXPECTED[(name, image)]


def test_edit_record_and_a_new_template_in_a_few_lines():
    assert text_of(get_template("vicuna_v1").render(conv(edit=True))) == \
        f"[{DEFAULT_SYSTEM} USER: ][<IN>][\nWhat is it? ASSISTANT:]{{<OUT>}}{{</s>}}"
    register(Template("bare_test", user_prefix="Q: ", user_suffix="\nA:", answer_prefix=" ", system_prompt=""))
    assert text_of(get_template("bare_test").render(conv())) == "[Q: What is it?\nA:]{ A cat.}{</s>}[Q: Color?\nA:]{ Black.}{</s>}"
    with pytest.raises(ValueError, match="known templates are"):
        get_template("nope")


def encode(text):   # one id per character: every token is traceable to its character
    return [1000 + ord(c) for c in text]


def packed(conversation, template="vicuna_v1", replace=None, n_visual=2):
    """(tokens, answer mask, images, the packed sample); replace: a token index to change."""
    tokens, mask, images = encode_pieces(get_template(template).render(conversation), encode, EOS)
    if replace is not None:
        tokens[replace] += 1
    spans = np.array([x for i, (pos, _, _) in enumerate(images) for x in (pos, pos, i)], np.int64)
    loss_mask = np.array(mask + [int(a) for _, _, a in images], np.uint8)
    cfg = PackingConfig(seq_length=512, num_image_tokens=n_visual, max_images=4, reset_attention_mask=True)
    feats = np.zeros((len(images), n_visual, 3), np.float16)
    sample = materialize((0, 0), (1, 0), np.array([0]), lambda d: (np.array(tokens), spans, loss_mask), feats, cfg,
                         IMG, END)
    return tokens, mask, images, sample


@pytest.mark.parametrize("template", ["vicuna_v1", "llama2_chat", "plain"])
@pytest.mark.parametrize("image", [False, True])
def test_labels_are_the_answers_token_by_token(template, image):
    tokens, mask, images, s = packed(conv(image), template)
    n = s["num_positions"]
    # The laid-out elements: tokens with a 4-element block ([IMG] v v [/IMG]) at each image.
    elements, answer = [], []
    for i, (tok, m) in enumerate(zip(tokens, mask)):
        for pos, _, a in images:
            if pos == i:
                elements += [IMG, -1, -1, END]
                answer += [a] * 4
        elements.append(tok)
        answer.append(bool(m))
    assert n == len(elements)
    expected = [elements[t + 1] if answer[t + 1] and elements[t + 1] >= 0 else IGNORE for t in range(n - 1)]
    assert s["labels"][:n - 1].tolist() == expected
    assert s["labels"][n - 1] == IGNORE and not s["regression_mask"].any()
    # What the loss sees, decoded: exactly the answers and their end-of-turn tokens.
    seen = "".join("</s>" if t == EOS else chr(t - 1000) for t in s["labels"] if t != IGNORE)
    answers = {"vicuna_v1": " A cat.</s> Black.</s>", "llama2_chat": " A cat. </s> Black. </s>",
               "plain": "A cat.</s>Black.</s>"}
    assert seen == answers[template]


def test_an_edit_records_output_image_is_a_target_and_its_input_image_is_not():
    tokens, mask, images, s = packed(conv(edit=True))
    (in_pos, _, in_answer), (out_pos, _, out_answer) = images
    assert (in_answer, out_answer) == (False, True)
    visual = np.flatnonzero(s["visual_mask"])
    assert len(visual) == 4                                     # two images of N = 2
    input_block, output_block = visual[:2], visual[2:]
    # Position t regresses element t + 1: the output image's visual positions (and the
    # [IMG]/[/IMG] around them) are targets; the input image's are not.
    assert s["regression_mask"].tolist() == [t + 1 in output_block for t in range(len(s["regression_mask"]))]
    out_open, out_close = output_block[0] - 1, output_block[-1] + 1
    assert s["labels"][out_open - 1] == IMG and s["labels"][out_close - 1] == END
    assert s["labels"][input_block[0] - 2] == IGNORE and s["labels"][input_block[-1]] == IGNORE
    assert [t for t in s["labels"].tolist() if t != IGNORE] == [IMG, END, EOS]


def test_targets_ignore_context_tokens_and_follow_answer_tokens():
    """Replacing a context token leaves every target as it was (it carries none, so the loss
    sees the same targets); replacing an answer token changes exactly its own target."""
    tokens, mask, _, base = packed(conv(True))
    context = packed(conv(True), replace=mask.index(0))[3]
    assert np.array_equal(context["labels"], base["labels"])
    assert np.array_equal(context["regression_mask"], base["regression_mask"])
    answer = packed(conv(True), replace=mask.index(1))[3]
    moved = np.flatnonzero(answer["tokens"] != base["tokens"])
    assert len(moved) == 1
    assert np.flatnonzero(answer["labels"] != base["labels"]).tolist() == [moved[0] - 1]


def _png(seed):
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    run_script([PY, "tools/make_sample_data.py", "--output", d, "--documents", "4", "--pairs", "4", "--instruct", "0"])
    return str(d / "tokenizer.model")


def _preprocess(tmp_path, tokenizer, fmt, path, *extra):
    return run_script([PY, "tools/preprocess_data.py", "--input-format", fmt, "--input", path,
                       "--output-prefix", tmp_path / fmt, "--tokenizer-model", tokenizer, "--no-progress", *extra])


def test_llava_records_with_every_kind_of_break_are_counted(tmp_path, tokenizer_model):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "ok.png").write_bytes(_png(0))
    (tmp_path / "img" / "cut.png").write_bytes(_png(1)[:40])
    good = [{"from": "human", "value": "What is this?\n<image>"}, {"from": "gpt", "value": "a square"}]
    records = [
        {"id": "ok", "image": "ok.png", "conversations": good},
        {"id": "text", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"id": "noreply", "image": "ok.png", "conversations": good[:1]},
        {"id": "tags", "conversations": good},                                   # <image> without an image
        {"id": "missing", "image": "gone.png", "conversations": good},
        {"id": "cut", "image": "cut.png", "conversations": good},
        {"id": "empty", "image": "ok.png", "conversations": [good[0], {"from": "gpt", "value": "  "}]},
        {"id": "role", "conversations": [{"from": "system", "value": "x"}, good[1]]},
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records))
    out = _preprocess(tmp_path, tokenizer_model, "llava", path, "--image-root", tmp_path / "img")
    for reason, record in (("conversation without an assistant reply", 2), ("<image> count differs from the "
                           "record's images", 3), ("image file missing", 4), ("image unreadable", 5),
                           ("empty answer", 6), ("turn of unknown role 'system'", 7)):
        assert f"skipped ({reason}): 1  first at {path}:record {record} (id {records[record]['id']})" in out, reason
    assert "documents written: 2" in out and "images placed: 1" in out
    meta = json.load(open(f"{tmp_path}/llava_text_document.meta.json"))
    assert meta["loss_mask"] and meta["conversation_template"] == "vicuna_v1"
    assert run_script([PY, "tools/preprocess_data.py", "--input-format", "llava", "--input", path, "--output-prefix",
                       tmp_path / "strict", "--tokenizer-model", tokenizer_model, "--image-root", tmp_path / "img",
                       "--strict"], expect=1).count("error: ") == 1


def test_coco_instructpix2pix_and_magicbrush_from_their_real_schemas(tmp_path, tokenizer_model):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from megatron_vl.data.indexed import IndexedDataset
    from megatron_vl.data.preprocess import sidecar
    (tmp_path / "coco" / "train2014").mkdir(parents=True)
    images = []
    for i in range(4):
        name = f"COCO_train2014_{i:012d}.jpg"
        (tmp_path / "coco" / "train2014" / name).write_bytes(_png(i))
        images.append({"filepath": "train2014", "filename": name, "split": ["train", "restval", "val", "train"][i],
                       "sentences": [] if i == 3 else [{"raw": f"caption {i} a"}, {"raw": f"caption {i} b"}]})
    (tmp_path / "coco" / "dataset_coco.json").write_text(json.dumps({"images": images}))
    out = _preprocess(tmp_path, tokenizer_model, "coco-captions", tmp_path / "coco" / "dataset_coco.json", "--image-root",
                      tmp_path / "coco")
    assert "documents written: 2" in out and "skipped (image without captions): 1" in out   # val left out

    cell = lambda seed: {"bytes": _png(seed), "path": f"{seed}.png"}  # noqa: E731
    pq.write_table(pa.table({"original_image": [cell(0), cell(1), None], "edit_prompt": ["make it red", "", "x"],
                             "edited_image": [cell(2), cell(3), cell(4)]}), tmp_path / "ip2p.parquet")
    out = _preprocess(tmp_path, tokenizer_model, "instructpix2pix", tmp_path / "ip2p.parquet")
    assert "documents written: 1" in out and "images placed: 2" in out
    assert f"skipped (edit record without an instruction): 1  first at {tmp_path}/ip2p.parquet:row 1" in out
    assert f"skipped (edit record without both images): 1  first at {tmp_path}/ip2p.parquet:row 2" in out
    flags = np.asarray(IndexedDataset(sidecar(str(tmp_path / "instructpix2pix_text_document"), "loss_mask"))[0])
    assert flags[-2:].tolist() == [0, 1]          # input image context, output image answer

    pq.write_table(pa.table({"img_id": ["7", "5", "7", "9", "9"], "turn_index": [2, 1, 1, 1, 1],
                             "source_img": [cell(0), cell(1), cell(2), cell(3), cell(4)],
                             "instruction": ["then blue", "add a hat", "make it red", "a", "b"],
                             "target_img": [cell(5), cell(6), cell(7), cell(8), cell(9)]}), tmp_path / "mb.parquet")
    out = _preprocess(tmp_path, tokenizer_model, "magicbrush", tmp_path / "mb.parquet")
    assert "documents written: 2" in out and "images placed: 5" in out     # 7: 1 + 2 targets; 5: 1 + 1
    assert "skipped (turn_index missing or repeated): 1  first at " in out
    prefix = str(tmp_path / "magicbrush_text_document")
    assert np.asarray(IndexedDataset(sidecar(prefix, "loss_mask"))[0])[-3:].tolist() == [0, 1, 1]
