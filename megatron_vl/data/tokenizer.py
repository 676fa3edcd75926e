"""Text tokenizers for preprocessing: sentencepiece ``.model`` files or HF tokenizer
directories, with the image delimiters ``[IMG]`` / ``[/IMG]`` added as special tokens."""

from __future__ import annotations

from typing import Dict, List

from ..errors import InputError

IMG, IMG_END = "[IMG]", "[/IMG]"


class TokenizerError(InputError, ValueError):
    pass


def add_image_tokens(hf_tokenizer):
    """Adds [IMG]/[/IMG] to a transformers tokenizer as special tokens; returns their ids."""
    hf_tokenizer.add_special_tokens({"additional_special_tokens": [IMG, IMG_END]})
    return hf_tokenizer.convert_tokens_to_ids([IMG, IMG_END])


class Tokenizer:
    def __init__(self, kind: str, model: str):
        if not model:
            raise TokenizerError("--tokenizer-model is required")
        self.kind, self.model = kind, model
        if kind == "sentencepiece":
            import sentencepiece as spm
            try:
                self._sp = spm.SentencePieceProcessor(model_file=model)
            except Exception as exc:
                raise TokenizerError(f"{model}: cannot load sentencepiece model: {exc}") from None
            base = self._sp.get_piece_size()
            unk = self._sp.unk_id()
            ids = [self._sp.piece_to_id(p) for p in (IMG, IMG_END)]
            # A model trained with the delimiters as user symbols keeps its ids; otherwise
            # they are appended after the vocabulary (the LM's embedding grows by two rows).
            if all(i != unk for i in ids):
                self.img_id, self.img_end_id, self.vocab_size = ids[0], ids[1], base
            else:
                self.img_id, self.img_end_id, self.vocab_size = base, base + 1, base + 2
            self.eod_id = self._sp.eos_id()
            self.bos_id = self._sp.bos_id()
            self._encode = self._sp.encode_as_ids   # a new list each call: returned as it is
            self._decode = lambda ids: self._sp.decode_ids([i for i in ids if i < base])
            # SentencePiece's encode is const and releases the GIL: threads may share it (lanes.py).
            self.thread_safe = True
        elif kind == "hf":
            from transformers import AutoTokenizer
            try:
                self._hf = AutoTokenizer.from_pretrained(model)
            except Exception as exc:
                raise TokenizerError(f"{model}: cannot load HF tokenizer: {exc}") from None
            self.img_id, self.img_end_id = add_image_tokens(self._hf)
            self.vocab_size = len(self._hf)
            self.eod_id = self._hf.eos_token_id
            self.bos_id = self._hf.bos_token_id
            self._encode = lambda text: self._hf(text, add_special_tokens=False)["input_ids"]
            self._decode = lambda ids: self._hf.decode(list(ids))
            # A call sets the backend's truncation and padding state: concurrent calls can fail
            # ("Already borrowed"), so one thread encodes.
            self.thread_safe = False
        else:
            raise TokenizerError(f"unknown --tokenizer-type {kind!r} (sentencepiece or hf)")
        if self.eod_id is None or self.eod_id < 0:
            raise TokenizerError(f"{model}: tokenizer has no end-of-document (eos) token")

    def encode(self, text: str) -> List[int]:
        """The ids of `text`, a list of the caller's own (both backends build a new one)."""
        return self._encode(text)

    def decode(self, ids) -> str:
        return self._decode([int(i) for i in ids])

    def meta(self) -> Dict:
        return {"type": self.kind, "model": self.model, "vocab_size": self.vocab_size, "eod_id": self.eod_id,
                "bos_id": self.bos_id if self.bos_id is not None and self.bos_id >= 0 else None,
                "image_token_ids": {IMG: self.img_id, IMG_END: self.img_end_id}}
