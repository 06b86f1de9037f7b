"""Upstream's Hugging Face tokenizer (`tokenizer.json` + `tokenizer_config.json`) behind our interface.

Where it sits: beside `tokenizer.py`, whose `load_tokenizer` builds one of these for a
tokenizer.json. The byte-level BPE itself is `bpe.py` (our own code, equal to `tokenizers`);
the chat templates are `templates.py` (our own rendering, equal to transformers' jinja). This
module joins them with upstream MiniMind-V's conventions: which ids are special, how an image is
written (a run of placeholder ids), and which ids a training sample learns.
"""
from __future__ import annotations

from pathlib import Path

from .bpe import ByteLevelBPE
from .templates import BOS, EOS, IMAGE_TOKEN, TEMPLATES, detect_template, render

UPSTREAM_IMAGE_RUNS = {          # image token -> patches per image, as upstream MiniMind-V's models
    "@": 196,                    # MiniMind2-V: '@' (id 34) x 196, one per ViT-B/16 patch
    "<|image_pad|>": 64,         # minimind-3v: <|image_pad|> (id 12) x 64
}


class BPETokenizer:
    """A Hugging Face byte-level BPE `tokenizer.json` with its `tokenizer_config.json`, behind the
    `Tokenizer` interface (what `data.py` and `chat.py` call), rendering upstream's template.

    Built by `load_tokenizer`. Special ids come from the config's `pad_token` / `bos_token` /
    `eos_token`; the image placeholder is the config's `image_token` when it has one
    (minimind-3v: `<|image_pad|>`), else upstream MiniMind2-V's '@'. Either way an `<image>` in a
    message becomes a run of `num_patches` copies of `image_pad_id`, written as ids directly (so
    the run never merges with the text around it).

    `encode_conversation` tokenizes the rendered template text in one go (as upstream does) and
    marks the targets by upstream's rule: everything after each `<|im_start|>assistant\\n` up to
    and including the next `<|im_end|>`, plus the `\\n` after it when `label_newline`.
    """

    def __init__(self, tokenizer_json, config: dict | None = None, config_file=None,
                 template: str | None = None, label_newline: bool = True, image_token: str | None = None):
        self.model_file = Path(tokenizer_json)
        self.config_file = Path(config_file) if config_file else None
        self.bpe = ByteLevelBPE.from_file(self.model_file)
        config = config or {}
        where = str(self.config_file or self.model_file)
        if template is None:
            template = detect_template(config.get("chat_template"), where)
        elif template not in TEMPLATES:
            raise ValueError(f"unknown chat template {template!r}; expected one of {', '.join(TEMPLATES)}")
        self.template = template
        self.label_newline = label_newline

        def token_id(key, default):
            value = config.get(key, default)
            if isinstance(value, dict):                    # {"content": "<|im_end|>", ...}
                value = value.get("content")
            i = self.bpe.token_to_id(value) if isinstance(value, str) else None
            if i is None:
                raise ValueError(f"{where}: {key} {value!r} is not a token of {self.model_file}")
            return i

        self.pad_id = token_id("pad_token", "<|endoftext|>")
        self.bos_id = token_id("bos_token", BOS)
        self.eos_id = token_id("eos_token", EOS)
        if image_token is not None:
            config = dict(config, image_token=image_token)
        self.image_pad_id = token_id("image_token", "@")   # MiniMind2-V's '@' when the config has none
        self.image_token = self.bpe.id_to_token[self.image_pad_id]
        self.num_patches = UPSTREAM_IMAGE_RUNS.get(self.image_token, 196)   # upstream's run length
        self.special_ids = dict(self.bpe.added_tokens)     # every added token string -> its id
        # the id patterns that open and close an assistant reply in the encoded template
        self._reply_start = [self.bos_id] + self.bpe.encode("assistant\n")   # <|im_start|>assistant\n
        self._newline = self.bpe.encode("\n")

    # ------------------------------------------------------------------ text <-> ids
    def __len__(self) -> int:
        return len(self.bpe)

    @property
    def vocab_size(self) -> int:
        return len(self)

    def encode(self, text: str) -> list[int]:
        """Text -> ids. Added-token strings in the text (e.g. '<|im_end|>') become their single ids."""
        return self.bpe.encode(text)

    def decode(self, ids) -> str:
        """Ids -> text (special tokens are written out as their strings)."""
        return self.bpe.decode(ids)

    def id_to_piece(self, i: int) -> str:
        """The vocabulary entry of an id, in the byte table's spelling ('Ġred' for ' red')."""
        return self.bpe.id_to_token[int(i)]

    def pieces(self, text: str) -> list[str]:
        return [self.id_to_piece(i) for i in self.encode(text)]

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, **options) -> str:
        """Messages -> the prompt text in upstream's template (`<image>` left as written)."""
        return render(self.template, messages, add_generation_prompt, **options)

    def encode_content(self, content: str, num_patches: int | None = None) -> list[int]:
        """Text -> ids, each `<image>` replaced by `num_patches` image-pad ids (upstream's run by default)."""
        n = self.num_patches if num_patches is None else num_patches
        ids: list[int] = []
        for i, text in enumerate(content.split(IMAGE_TOKEN)):
            if i:
                ids += [self.image_pad_id] * n
            ids += self.encode(text)
        return ids

    def encode_conversation(self, messages: list[dict], num_patches: int | None = None,
                            add_generation_prompt: bool = False, **options) -> tuple[list[int], list[bool]]:
        """Messages -> (ids, is_target), as upstream MiniMind-V builds a training sample.

        The whole template text is encoded at once (each `<image>` as its run of ids), then every
        reply is found in the ids: from after each `<|im_start|>assistant\\n` to the next
        `<|im_end|>` (inclusive, and the `\\n` after it when `label_newline`), or to the end of the
        ids when no end follows.
        """
        ids = self.encode_content(self.apply_chat_template(messages, add_generation_prompt, **options),
                                  num_patches)
        return ids, self.reply_mask(ids)

    def reply_mask(self, ids: list[int]) -> list[bool]:
        """Which ids are reply tokens: upstream's rule (see encode_conversation)."""
        start, end = self._reply_start, [self.eos_id] + (self._newline if self.label_newline else [])
        target = [False] * len(ids)
        i = 0
        while i < len(ids):
            if ids[i:i + len(start)] != start:
                i += 1
                continue
            j = i + len(start)
            while j < len(ids) and ids[j:j + len(end)] != end:
                j += 1
            stop = min(j + len(end), len(ids))      # the end marker is part of the reply
            target[i + len(start):stop] = [True] * (stop - i - len(start))
            i = stop
        return target
