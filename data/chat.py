"""Chat template rendering and assistant-only targets: a `Record` -> token ids + a target mask.

The template is the tokenizer's own (`chat_template` of an HF tokenizer folder, kept by `load_tokenizer`),
else `DEEPSEEK_V3_TEMPLATE`, DeepSeek-V3's chat format written here with `{% generation %}` marks:

    <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{assistant}<｜end▁of▁sentence｜><｜User｜>...

Rendering is transformers' own (`render_jinja_template`: the same sandboxed Jinja environment, filters,
globals and special-token variables as `apply_chat_template`), and the rendered text is encoded whole,
special-token text included, as `apply_chat_template(tokenize=True)` does, so the ids are equal.

Targets: a token is a target when it overlaps an assistant turn's characters (transformers' rule for
`assistant_masks`). A template with `{% generation %}` marks says where the turns are; for one without,
turn i is what the template adds between `messages[:i]` rendered with the generation prompt and
`messages[:i+1]` (so each turn's end-of-sentence token is inside; a template whose renderings are not
prefixes of one another is refused). `train_on_prompt` makes every token a target. Raw `text` records
are encoded with special-token text as plain text (as pretraining does) plus eos, every token a target;
string prompt + completion pairs are the plain text `prompt + completion + eos` with the completion and
eos as targets (TRL's completion-only loss).
"""

from __future__ import annotations

import re
import numpy as np

from twinpipe.data.records import Record
from twinpipe.data.tokenizer import ASSISTANT_TOKEN, CHAT_TOKENS, USER_TOKEN, TextTokenizer

DEEPSEEK_V3_TEMPLATE = (
    "{%- set ns = namespace(system='', first=true) -%}"
    "{%- for m in messages if m['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + ('' if ns.first else '\\n\\n') + m['content'] -%}"
    "{%- set ns.first = false -%}"
    "{%- endfor -%}"
    "{{- bos_token -}}{{- ns.system -}}"
    "{%- for m in messages -%}"
    f"{{%- if m['role'] == 'user' -%}}{{{{- '{USER_TOKEN}' + m['content'] -}}}}"
    f"{{%- elif m['role'] == 'assistant' -%}}{{{{- '{ASSISTANT_TOKEN}' -}}}}"
    "{%- generation -%}{{- m['content'] + eos_token -}}{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    f"{{%- if add_generation_prompt -%}}{{{{- '{ASSISTANT_TOKEN}' -}}}}{{%- endif -%}}"
)
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ChatTemplate:
    """A Jinja chat template with the tokenizer's special-token variables."""

    def __init__(self, source: str, tokenizer: TextTokenizer):
        self.source = source
        self.variables = {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token}
        self.marks_generation = bool(_GENERATION_TAG.search(source))

    @classmethod
    def for_tokenizer(cls, tokenizer: TextTokenizer) -> "ChatTemplate":
        """The tokenizer's own template, else DeepSeek-V3's (whose tokens the vocabulary must hold)."""
        if tokenizer.chat_template is not None:
            return cls(tokenizer.chat_template, tokenizer)
        vocab = tokenizer.tokenizer.get_vocab(with_added_tokens=True)
        missing = [t for t in CHAT_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"the tokenizer has no chat_template and lacks DeepSeek-V3's chat tokens "
                             f"{missing}: use a tokenizer with a chat_template, or one with these tokens "
                             "(data.tokenizer=default adds them when training from scratch)")
        return cls(DEEPSEEK_V3_TEMPLATE, tokenizer)

    def _render(self, messages: list[dict], add_generation_prompt: bool,
                with_spans: bool) -> tuple[str, list[tuple[int, int]]]:
        from transformers.utils.chat_template_utils import render_jinja_template

        texts, spans = render_jinja_template(
            conversations=[messages], chat_template=self.source, add_generation_prompt=add_generation_prompt,
            return_assistant_tokens_mask=with_spans, **self.variables)
        return texts[0], (spans[0] if with_spans else [])

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self._render(messages, add_generation_prompt, with_spans=False)[0]

    def render_with_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered chat and the [start, end) character spans of its assistant turns."""
        if self.marks_generation:
            return self._render(messages, False, with_spans=True)
        text = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[:i + 1])
            if not (text.startswith(upto) and upto.startswith(before)):
                raise ValueError("the chat template does not render a conversation's prefixes as "
                                 "prefixes of it, so assistant turns cannot be located; mark them "
                                 "with {% generation %} ... {% endgeneration %} in the template")
            spans.append((len(before), len(upto)))
        return text, spans


def overlap_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    """[num_tokens] bool: token (start, end) overlaps some span [s, e) (both lists in order)."""
    mask = np.zeros(len(offsets), dtype=bool)
    k = 0
    for i, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        mask[i] = end > spans[k][0]
    return mask


def encode_with_spans(tokenizer: TextTokenizer, text: str,
                      spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of `text` (special-token text recognised) and which of them overlap `spans`."""
    encoding = tokenizer.tokenizer.encode(text, add_special_tokens=False)
    return np.asarray(encoding.ids, dtype=np.int64), overlap_mask(encoding.offsets, spans)


def tokenize_record(record: Record, template: ChatTemplate, tokenizer: TextTokenizer,
                    train_on_prompt: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
    """`(ids[n], targets[n] bool)` of one record, or None when it has no assistant turn."""
    if record.text is not None:
        ids = tokenizer.encode_batch([record.text], literal_specials=True)[0] + [tokenizer.eos_id]
        return np.asarray(ids, dtype=np.int64), np.ones(len(ids), dtype=bool)
    if record.messages is not None:
        if not any(m["role"] == "assistant" for m in record.messages):
            return None
        text, spans = template.render_with_spans(record.messages)
    else:
        text = record.prompt + record.completion + tokenizer.eos_token
        spans = [(len(record.prompt), len(text))]
    ids, targets = encode_with_spans(tokenizer, text, spans)
    if train_on_prompt:
        targets[:] = True
    return ids, targets


def prompt_ids(record: Record, template: ChatTemplate, tokenizer: TextTokenizer) -> list[int]:
    """The ids a model continues to answer `record`: the chat up to its last assistant turn with the
    generation prompt (or the string prompt)."""
    if record.messages is None:
        return tokenizer.tokenizer.encode(record.prompt or "", add_special_tokens=False).ids
    last = max((i for i, m in enumerate(record.messages) if m["role"] == "assistant"),
               default=len(record.messages))
    text = template.render(record.messages[:last], add_generation_prompt=True)
    return tokenizer.tokenizer.encode(text, add_special_tokens=False).ids

