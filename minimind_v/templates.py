"""Chat templates: a conversation -> the one string the model reads, in plain Python (no jinja).

Where it sits: between a conversation (`[{'role', 'content'}, ...]`) and the tokenizer. A
Hugging Face `tokenizer_config.json` carries its chat template as a jinja program; upstream
MiniMind-V has two of them, one per generation. Rather than run jinja at run time, each known
template is written out below as a short Python function, and `detect_template` recognises the
template text of a `tokenizer_config.json` by its SHA-256. The tests check every function against
`transformers`' rendering of upstream's real file.

All three are ChatML: each turn is `<|im_start|>{role}\\n{content}<|im_end|>\\n`, and the
generation prompt is `<|im_start|>assistant\\n`. They differ in what surrounds that:

    chatml       this project's own template (sentencepiece tokenizers): just the turns.
    minimind2-v  upstream MiniMind2-V: a system turn always comes first; without one in the
                 conversation it is the default line `You are a helpful assistant`.
    minimind-3v  upstream minimind-3v: no default system turn; every assistant turn is written
                 with a reasoning block, `<think>\\n{reasoning}\\n</think>\\n\\n{answer}` (empty
                 reasoning when there is none), and the generation prompt ends with an empty
                 block `<think>\\n\\n</think>\\n\\n` (or an open `<think>\\n` with open_thinking=True).

What the upstream templates can also do and we do not render (tools, tool calls, `tool` turns,
non-string content) is a clear error, never a silently different prompt.
"""
from __future__ import annotations

import hashlib

# The chat format's special strings (the ids are each tokenizer's own).
PAD, BOS, EOS, IMAGE_PAD, UNK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IMAGE_PAD]   # ids 0, 1, 2, 3; <unk> is id 4
IMAGE_TOKEN = "<image>"                       # what a conversation writes where an image stands


BOS, EOS = "<|im_start|>", "<|im_end|>"
DEFAULT_SYSTEM = "You are a helpful assistant"          # MiniMind2-V's system line when none is given

# SHA-256 of the `chat_template` text in upstream's tokenizer_config.json of each generation
KNOWN_TEMPLATES = {
    "4f57494cd38c0e4e50e27f4632fb6907414a68cc48d0bbc48da5449c596c69fa": "minimind2-v",
    "97c6a9ef3f8d35044f435bb7773f1af160a7328ab6e8d2e9d67702941320a711": "minimind-3v",
}


def template_hash(template_text: str) -> str:
    return hashlib.sha256(template_text.encode("utf-8")).hexdigest()


def detect_template(template_text, source: str = "tokenizer_config.json") -> str:
    """The name of the template whose jinja text this is, or ValueError naming `source`."""
    if not isinstance(template_text, str) or not template_text:
        raise ValueError(f"{source}: no 'chat_template' string; expected upstream MiniMind-V's "
                         f"({', '.join(TEMPLATES)} are rendered here; pass template=NAME to choose one)")
    name = KNOWN_TEMPLATES.get(template_hash(template_text))
    if name is None:
        raise ValueError(f"{source}: unknown chat_template (sha256 {template_hash(template_text)[:12]}); "
                         f"only upstream MiniMind-V's are rendered here: "
                         f"{', '.join(f'{n} ({h[:12]})' for h, n in KNOWN_TEMPLATES.items())}; "
                         f"pass template=NAME to render one of {', '.join(TEMPLATES)} anyway")
    return name


# ---------------------------------------------------------------------- checking the input
def _check(messages: list[dict], name: str) -> None:
    """Reject what a template would render in a way we do not reproduce."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"chat template {name}: expected a non-empty list of {{'role', 'content'}} messages")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"chat template {name}: message {k} must be a dict with 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"chat template {name}: message {k} has role {m['role']!r}; only 'system', "
                             f"'user' and 'assistant' are rendered here (no 'tool' turns)")
        if not isinstance(m["content"], str):
            raise ValueError(f"chat template {name}: message {k} content must be a string, "
                             f"got {type(m['content']).__name__}")
        if m.get("tool_calls"):
            raise ValueError(f"chat template {name}: message {k} has tool_calls, which are not rendered here")


def _turn(role: str, content: str) -> str:
    return f"{BOS}{role}\n{content}{EOS}\n"


def _no_options(name: str, options: dict, allowed: tuple = ()) -> None:
    extra = sorted(set(options) - set(allowed))
    if extra:
        raise ValueError(f"chat template {name} does not take {', '.join(extra)} "
                         f"(it takes add_generation_prompt{''.join(', ' + a for a in allowed)})")


# ---------------------------------------------------------------------- the templates
def render_chatml(messages: list[dict], add_generation_prompt: bool = False, **options) -> str:
    """This project's template: one ChatML turn per message, nothing else."""
    _check(messages, "chatml")
    _no_options("chatml", options)
    text = "".join(_turn(m["role"], m["content"]) for m in messages)
    return text + (f"{BOS}assistant\n" if add_generation_prompt else "")


def render_minimind2v(messages: list[dict], add_generation_prompt: bool = False, **options) -> str:
    """Upstream MiniMind2-V's template: a system turn first (the default line if none is given).

    enable_thinking=False appends an empty `<think>\\n\\n</think>\\n\\n` after the generation prompt,
    as the upstream template does; left out (the default), nothing is appended.
    """
    _check(messages, "minimind2-v")
    _no_options("minimind2-v", options, ("enable_thinking",))
    first_is_system = messages[0]["role"] == "system"
    text = _turn("system", messages[0]["content"] if first_is_system else DEFAULT_SYSTEM)
    for k, m in enumerate(messages):
        if k == 0 and first_is_system:
            continue                                      # already written above
        text += _turn(m["role"], m["content"])
    if add_generation_prompt:
        text += f"{BOS}assistant\n"
        if options.get("enable_thinking", True) is False:
            text += "<think>\n\n</think>\n\n"
    return text


def split_reasoning(message: dict) -> tuple[str, str]:
    """An assistant message -> (reasoning, answer), as minimind-3v's template reads it.

    A `reasoning_content` string is the reasoning; otherwise, when the content holds `</think>`,
    the reasoning is what stands between `<think>` and the first `</think>` and the answer is what
    follows the last `</think>` (outer newlines dropped).
    """
    content = message["content"]
    if isinstance(message.get("reasoning_content"), str):
        return message["reasoning_content"], content
    if "</think>" in content:
        reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
        return reasoning, content.split("</think>")[-1].lstrip("\n")
    return "", content


def render_minimind3v(messages: list[dict], add_generation_prompt: bool = False, **options) -> str:
    """Upstream minimind-3v's template: no default system turn, a `<think>` block in every reply.

    open_thinking=True ends the generation prompt with an open `<think>\\n` (the model reasons
    first); otherwise with the empty block `<think>\\n\\n</think>\\n\\n` (it answers directly).
    """
    _check(messages, "minimind-3v")
    _no_options("minimind-3v", options, ("open_thinking",))
    text = ""
    for k, m in enumerate(messages):
        if m["role"] == "system" and k == 0:
            text += _turn("system", m["content"])
        elif m["role"] in ("user", "system"):
            text += _turn(m["role"], m["content"])
        else:
            reasoning, answer = split_reasoning(m)
            text += _turn("assistant", f"<think>\n{reasoning.strip(chr(10))}\n</think>\n\n{answer.lstrip(chr(10))}")
    if add_generation_prompt:
        text += f"{BOS}assistant\n"
        text += "<think>\n" if options.get("open_thinking") is True else "<think>\n\n</think>\n\n"
    return text


TEMPLATES = {"chatml": render_chatml, "minimind2-v": render_minimind2v, "minimind-3v": render_minimind3v}


def render(name: str, messages: list[dict], add_generation_prompt: bool = False, **options) -> str:
    """Render `messages` with the template called `name` (one of TEMPLATES)."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; expected one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name](messages, add_generation_prompt, **options)
