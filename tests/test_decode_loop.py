"""The one interleaved decode loop (megatron_vl/inference/decode_loop.py): its image rules on a
scripted fake model with exact expected sequences, and its three callers — the library's
generate / Generator, VLGPTForCausalLM.generate and the in-training evaluator — giving the same
tokens and images on the same model."""

from types import SimpleNamespace

import pytest
import torch

from helpers import VOCAB, tiny_hf_model
from megatron_vl.eval.in_training import EngineStep, TrainingEvaluator
from megatron_vl.inference.decode_loop import DecodeStep, Prompt, decode_loop
from megatron_vl.inference.generation import GenerationError, generate
from megatron_vl.inference.modeling_vlgpt import VLGPTForCausalLM
from megatron_vl.inference.sampling import Sampling

IMG, END, EOS, N = 8, 9, 2, 2   # the fake model's [IMG], [/IMG], EOS and embeddings per image
FALLBACK = 7                    # its second choice after every token


class Bigram(DecodeStep):
    """A fake model: after token t it wants follows[t] (FALLBACK second); its visual prediction
    is the number of forwards run so far, so an image's rows say when each was made. It
    records every forward it is given."""

    def __init__(self, follows, max_positions=float("inf")):
        super().__init__(img=IMG, img_end=END, num_image_tokens=N, visual_dim=1, device="cpu", dtype=torch.float32,
                         max_positions=max_positions)
        self.follows, self.calls, self.last = follows, [], None

    def forward(self, ids, visual, visual_mask, attention_mask, position_ids):
        self.calls.append({"ids": ids.tolist(), "visual": visual[..., 0].tolist(), "mask": visual_mask.tolist(),
                           "attn": attention_mask.tolist(), "pos": position_ids.tolist()})
        self.last = ids[:, -1].tolist()

    def logits(self):
        out = torch.zeros(len(self.last), 10)
        out[:, FALLBACK] = 1
        for r, t in enumerate(self.last):
            out[r, self.follows.get(t, FALLBACK)] = 2
        return out

    def regressed(self):
        return torch.full((len(self.last), 1), float(len(self.calls)))


FOLLOWS = {1: 5, 5: IMG, END: 6, 6: IMG}   # text, an image, text, an image, ...


def run(step, prompts, **sampling):
    decode = sampling.pop("decode", None)
    return decode_loop(step, prompts, Sampling(**sampling), EOS, decode)


def rows(image):
    return image[:, 0].tolist()


def test_an_opened_image_completes_outside_the_text_budget_and_its_predictions_are_fed_back():
    step = Bigram(FOLLOWS)
    out, = run(step, [Prompt([1], [None])], max_new_tokens=3)
    assert out.tokens == [5, IMG, 0, 0, END, 6] and out.stopped_by == "max tokens"
    assert out.kinds == ["text", "text", "visual", "visual", "close", "text"]
    assert [rows(i) for i in out.images] == [[3.0, 4.0]]   # predicted after forwards 3 and 4
    # Each prediction is the next element: id 0 with the visual mask set and the embedding.
    assert [(c["ids"], c["mask"], c["visual"]) for c in step.calls[3:5]] == [([[0]], [[True]], [[3.0]]),
                                                                           ([[0]], [[True]], [[4.0]])]
    assert step.calls[5]["ids"] == [[END]] and step.calls[5]["mask"] == [[False]]
    # Budget 2 is spent at [IMG]: the image is still whole, then nothing more.
    out, = run(Bigram(FOLLOWS), [Prompt([1], [None])], max_new_tokens=2)
    assert out.tokens == [5, IMG, 0, 0, END] and [rows(i) for i in out.images] == [[3.0, 4.0]]


def test_max_new_images_suppresses_img_and_text_only_suppresses_both_delimiters():
    out, = run(Bigram(FOLLOWS), [Prompt([1], [None])], max_new_tokens=4, max_new_images=1)
    assert out.tokens == [5, IMG, 0, 0, END, 6, FALLBACK] and len(out.images) == 1
    out, = run(Bigram({1: IMG, FALLBACK: END}), [Prompt([1], [None])], max_new_tokens=3, text_only=True)
    assert out.tokens == [FALLBACK] * 3 and out.images == []


@pytest.mark.parametrize("limit, tokens, images, not_opened", [
    (10, [5, IMG, 0, 0, END, 6], 1, True),                     # [IMG] at 7, [/IMG] at 10: not opened
    (11, [5, IMG, 0, 0, END, 6, IMG, 0, 0, END], 2, False),    # the second image ends at the table's last
])
def test_an_image_that_would_not_fit_the_position_table_is_never_opened(limit, tokens, images, not_opened):
    out, = run(Bigram(FOLLOWS, max_positions=limit), [Prompt([1], [None])], max_new_tokens=50)
    assert out.tokens == tokens and len(out.images) == images and all(i.shape == (N, 1) for i in out.images)
    assert out.stopped_by == "position limit" and out.image_not_opened == not_opened


def test_a_prompt_ending_inside_an_image_completes_it_with_its_given_embeddings_first():
    out, = run(Bigram(FOLLOWS), [Prompt([1, IMG, 0], [None, None, torch.tensor([0.5])])], max_new_tokens=1)
    assert out.tokens == [0, END, 6] and [rows(i) for i in out.images] == [[0.5, 1.0]]
    with pytest.raises(GenerationError, match="prompt 1 of 1 ends inside an image that cannot be completed"):
        run(Bigram(FOLLOWS, max_positions=4), [Prompt([1, IMG, 0], [None, None, torch.tensor([0.5])])])


def test_text_to_image_forces_one_image_and_stops_after_it():
    out, = run(Bigram({1: 5}), [Prompt([1], [None])], max_new_tokens=5, text_to_image=True,
               decode=lambda ids: " ".join(map(str, ids)))
    assert out.tokens == [0, 0, END] and out.stopped_by == "image" and out.text == "<image>"
    assert [rows(i) for i in out.images] == [[1.0, 2.0]]
    short, fits = run(Bigram({}, max_positions=5), [Prompt([1, 1], [None] * 2), Prompt([1], [None])],
                      text_to_image=True)
    assert (short.tokens, short.stopped_by, short.image_not_opened) == ([], "position limit", True)
    assert (fits.tokens, fits.stopped_by) == ([0, 0, END], "image")


def test_eos_and_stop_strings_end_the_text_which_never_holds_eos():
    text = lambda ids: " ".join(map(str, ids))   # noqa: E731
    out, = run(Bigram({1: 5, 5: EOS}), [Prompt([1], [None])], max_new_tokens=9, decode=text)
    assert (out.tokens, out.stopped_by, out.text) == ([5, EOS], "eos", "5")
    out, = run(Bigram({1: 5, 5: 6, 6: 4}), [Prompt([1], [None])], max_new_tokens=9, stop=("6",), decode=text)
    assert (out.tokens, out.stopped_by, out.text) == ([5, 6], "stop string", "5 ")


def test_prompts_are_left_padded_with_positions_from_their_first_element():
    step = Bigram({1: 5, 3: 5, 5: 6})
    a, b = run(step, [Prompt([1], [None]), Prompt([3, 1], [None, None])], max_new_tokens=2)
    assert a.tokens == b.tokens == [5, 6]
    first, second = step.calls[:2]
    assert first["ids"] == [[0, 1], [3, 1]] and first["attn"] == [[0, 1], [1, 1]]
    assert first["pos"] == [[0, 0], [0, 1]]
    assert second["pos"] == [[1], [2]] and second["attn"] == [[0, 1, 1], [1, 1, 1]]


def test_every_process_continues_with_the_shared_tokens():
    class RankOnesChoice(Bigram):
        def share(self, tokens):
            return torch.full_like(tokens, 4)
    step = RankOnesChoice(FOLLOWS)
    out, = run(step, [Prompt([1], [None])], max_new_tokens=3)
    assert out.tokens == [4, 4, 4] and [c["ids"] for c in step.calls[1:]] == [[[4]], [[4]], [[4]]]


# --- the three callers on one tiny VL-GPT ----------------------------------------------------

D, MN = 8, 3                      # visual_embed_dim, num_image_tokens
MIMG, MEND, MEOS = 1001, 1002, 2


class LeansToImages(torch.nn.Module):
    """An lm_head that raises [IMG]: the tiny model opens images now and then."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, hidden):
        logits = self.head(hidden)
        logits[..., MIMG] += 2.5
        return logits


@pytest.fixture(scope="module")
def model():
    m = VLGPTForCausalLM(tiny_hf_model(seed=1, max_position_embeddings=64),
                         {"visual_embed_dim": D, "num_image_tokens": MN, "image_token_ids": {"[IMG]": MIMG,
                                                                                            "[/IMG]": MEND}})
    torch.manual_seed(5)
    with torch.no_grad():
        for p in list(m.visual_proj.parameters()) + list(m.regression.parameters()):
            p.normal_(0, 0.3)
    m.causal_lm.lm_head = LeansToImages(m.causal_lm.lm_head)
    return m.eval()


def prompts():
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, 1000, (6,), generator=g).tolist()
    given = [torch.randn(D, generator=g) for _ in range(MN)]
    return [Prompt(text, [None] * 6),
            Prompt(text + [MIMG] + [0] * MN + [MEND], [None] * 7 + given + [None]),   # a whole image inside
            Prompt(text + [MIMG, 0], [None] * 7 + given[:1])]                        # ends inside an image


def test_the_library_and_the_hf_class_generate_the_same_elements(model):
    made = 0
    for p in prompts():
        lib, = generate(model, [p], Sampling(max_new_tokens=12), eos_id=MEOS)
        mask = torch.tensor([[v is not None for v in p.visual]])
        embeds = torch.stack([v if v is not None else torch.zeros(D) for v in p.visual])[None]
        hf = model.generate(torch.tensor([p.tokens]), embeds, mask, max_new_tokens=12, eos_token_id=MEOS)
        assert hf.tokens[0, len(p.tokens):].tolist() == lib.tokens
        assert hf.visual_mask[0, len(p.tokens):].tolist() == [k == "visual" for k in lib.kinds]
        assert len(hf.images) == len(lib.images) and all(torch.equal(a, b) for a, b in zip(hf.images, lib.images))
        made += len(lib.images)
    assert made >= 3   # the comparison covered generated images, not text alone


class Engine:
    """The training engine's interface (engine(batch) -> (logits, visual predictions),
    module.head.full_logits) over the tiny model, run without a cache."""

    def __init__(self, m):
        self.m, self.module = m, SimpleNamespace(head=SimpleNamespace(full_logits=lambda local: local))

    def __call__(self, batch):
        out = self.m(batch["tokens"], batch["visual_embeds"], batch["visual_mask"], position_ids=batch["position_ids"])
        return out.logits, out.visual_predictions


def test_the_training_engine_step_decodes_as_the_cached_model_does(model):
    for p in prompts():
        lib, = generate(model, [p], Sampling(max_new_tokens=8), eos_id=MEOS)
        assert lib.stopped_by != "position limit"   # the engine step enforces no position table
        step = EngineStep(Engine(model), VOCAB, MIMG, MEND, MN, D, torch.device("cpu"), torch.float32)
        engine, = decode_loop(step, [p], Sampling(max_new_tokens=8), MEOS)
        assert engine.images and engine.tokens == lib.tokens and len(engine.images) == len(lib.images)
        for a, b in zip(engine.images, lib.images):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_in_training_evaluator_answers_as_the_library_does(model):
    def decode(ids):   # a newline now and then, so answers are cut
        return "".join(chr(97 + t % 26) + ("\n" if t % 4 == 0 else "") for t in ids)
    evaluator = TrainingEvaluator.__new__(TrainingEvaluator)   # only what _answer reads
    evaluator.cfg = SimpleNamespace(model=SimpleNamespace(vocab_size=VOCAB, visual_embed_dim=D),
                                    data=SimpleNamespace(num_image_tokens=MN))
    evaluator.engine, evaluator.device, evaluator.img, evaluator.img_end = Engine(model), "cpu", MIMG, MEND
    evaluator.tokenizer = SimpleNamespace(eod_id=MEOS, bos_id=1, decode=decode)
    stops = []
    for p in prompts()[:2]:
        lib, = generate(model, [p], Sampling(max_new_tokens=10, stop=("\n",), text_only=True), MEOS, decode)
        assert evaluator._answer(p, 10, torch.float32) == lib.text.strip() and lib.text.strip()
        stops.append(lib.stopped_by)
    assert "stop string" in stops, stops   # an answer was cut at its newline


def test_generator_and_the_hf_class_agree_on_an_export(export):
    from megatron_vl.inference.generation import Generator
    from pretrain_helpers import NUM_IMAGE_TOKENS
    gen = Generator(str(export), add_bos=False)
    ids = gen.model.image_token_ids
    text = gen.prompt("The picture shows a red circle above a")
    opened = Prompt(text.tokens + [ids["[IMG]"]], text.visual + [None])
    for p in (text, opened):
        lib, = gen.generate([p], Sampling(max_new_tokens=NUM_IMAGE_TOKENS + 4))
        hf = gen.model.generate(torch.tensor([p.tokens]), max_new_tokens=NUM_IMAGE_TOKENS + 4,
                                eos_token_id=gen.tokenizer.eos_token_id)
        assert hf.tokens[0, len(p.tokens):].tolist() == lib.tokens
        assert len(hf.images) == len(lib.images) and all(torch.equal(a, b) for a, b in zip(hf.images, lib.images))
    assert lib.images, "the opened prompt's image was compared"
