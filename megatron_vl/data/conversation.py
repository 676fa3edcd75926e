"""Conversations for instruction tuning (stage 3) and the templates that lay them out.

A ``Conversation`` is a list of turns, each ``(role, text, images)`` with role ``"user"`` or
``"assistant"``; ``images`` are the images of that turn (a user's inputs, or the images an
assistant produces, e.g. the edited image of InstructPix2Pix). A template renders a
conversation into ``Piece``s: text (tokenized piece by piece), an image (an
``[IMG] v_0 .. v_{N-1} [/IMG]`` block at that place) or the end-of-turn token, each marked
as an answer or not. Answers are what the loss sees: the assistant's text, its end-of-turn
token and the images it produces; the system prompt, the user's turns and input images are
context only.

The templates (``--conversation-template``), with their exact strings (``{sys}`` the system
prompt, ``<image>`` where a turn's images go, ``</s>`` the tokenizer's end-of-sequence id):

- ``vicuna_v1`` (LLaVA v1 / Vicuna v1.1)::

      {sys} USER: <image>\\n{user} ASSISTANT: {answer}</s>USER: {user} ASSISTANT: {answer}</s>

  with ``{sys}`` = "A chat between a curious user and an artificial intelligence assistant.
  The assistant gives helpful, detailed, and polite answers to the user's questions."; the
  answer is " {answer}" + ``</s>``.
- ``llama2_chat``::

      [INST] <<SYS>>\\n{sys}\\n<</SYS>>\\n\\n<image>\\n{user} [/INST] {answer} </s>[INST] {user} [/INST] {answer} </s>

  with the same default system prompt; the answer is " {answer} " + ``</s>`` (LLaVA's
  llama_2 layout, without the ``<s>`` it puts before later turns).
- ``plain`` (LLaVA's alignment format): ``<image>{user}{answer}</s>`` per turn, no roles, no
  system prompt.

In every template an assistant's images come first in its answer, before its text. A new
template is a ``Template`` with these strings, registered with ``register``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional

DEFAULT_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")
USER, ASSISTANT = "user", "assistant"


@dataclass
class Turn:
    role: str
    text: str
    images: List[object] = field(default_factory=list)   # ImageRef (preprocessing) or anything


@dataclass
class Conversation:
    source: str                # the record's id and place, for reports
    turns: List[Turn]


class Piece(NamedTuple):
    kind: str        # "text", "image" or "eos"
    value: object    # the text, the image, or None
    answer: bool


@dataclass
class Template:
    """A user turn renders as (first_)user_prefix, [its images, image_suffix], its text,
    user_suffix (all context); an assistant turn as [its images], answer_prefix + text +
    answer_end, end-of-turn (all answer), then answer_suffix (context). `system` ("{sys}" =
    system_prompt) comes before the first turn. Each text piece is tokenized on its own."""
    name: str
    system: str = ""                 # context before the first turn; "{sys}" is the system prompt
    first_user_prefix: Optional[str] = None   # default: user_prefix
    user_prefix: str = ""
    image_suffix: str = ""           # after a user's images, before the user's text
    user_suffix: str = ""            # after the user's text (the assistant's cue)
    answer_prefix: str = ""          # part of the answer, before its text
    answer_end: str = ""             # part of the answer, after its text, before end-of-turn
    answer_suffix: str = ""          # context after the end-of-turn token
    system_prompt: str = DEFAULT_SYSTEM

    def render(self, conv: Conversation) -> List[Piece]:
        pieces: List[Piece] = []
        context = self.system.format(sys=self.system_prompt)
        first = True
        for turn in conv.turns:
            if turn.role == USER:
                prefix = self.first_user_prefix if first and self.first_user_prefix is not None else self.user_prefix
                context += prefix.format(sys=self.system_prompt)
                first = False
                if turn.images:
                    pieces.append(Piece("text", context, False))
                    pieces.extend(Piece("image", im, False) for im in turn.images)
                    context = self.image_suffix
                context += turn.text + self.user_suffix
            elif turn.role == ASSISTANT:
                if context:
                    pieces.append(Piece("text", context, False))
                context = ""
                pieces.extend(Piece("image", im, True) for im in turn.images)
                text = self.answer_prefix + turn.text + self.answer_end if turn.text else ""
                if text:
                    pieces.append(Piece("text", text, True))
                pieces.append(Piece("eos", None, True))
                context = self.answer_suffix
            else:
                raise ValueError(f"{conv.source}: unknown role {turn.role!r}")
        if context:
            pieces.append(Piece("text", context, False))
        return pieces


TEMPLATES: Dict[str, Template] = {}


def register(template: Template) -> Template:
    TEMPLATES[template.name] = template
    return template


register(Template("vicuna_v1", system="{sys} ", user_prefix="USER: ", image_suffix="\n", user_suffix=" ASSISTANT:",
                  answer_prefix=" "))
register(Template("llama2_chat", system="", first_user_prefix="[INST] <<SYS>>\n{sys}\n<</SYS>>\n\n",
                  user_prefix="[INST] ", image_suffix="\n", user_suffix=" [/INST]", answer_prefix=" ",
                  answer_end=" "))
register(Template("plain", system_prompt=""))


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"--conversation-template {name!r}: known templates are {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def encode_pieces(pieces: List[Piece], encode, eos_id: int, bos_id: Optional[int] = None):
    """(tokens, answer mask per token, [(position, image, is answer)]) — images sit between
    tokens at `position` (a zero-length span: the block goes exactly there)."""
    tokens: List[int] = [bos_id] if bos_id is not None else []
    mask: List[int] = [0] * len(tokens)
    images = []
    for piece in pieces:
        if piece.kind == "text":
            ids = encode(piece.value)
        elif piece.kind == "eos":
            ids = [eos_id]
        else:
            images.append((len(tokens), piece.value, piece.answer))
            continue
        tokens.extend(ids)
        mask.extend([int(piece.answer)] * len(ids))
    return tokens, mask, images
