"""RL prompt records: `messages` or `prompt`, plus any other fields (passed to the reward functions).

    {"messages": [{"role": "user", "content": "3 plus 4?"}], "answer": "7"}
    {"prompt": "3 plus 4 =", "answer": "7"}

A `messages` prompt (a chat, up to its last assistant turn if it has one) is rendered with the chat
template and the generation prompt (`data.chat.prompt_ids`); a string `prompt` is continued as plain
text, as TRL treats non-conversational data. Files are jsonl (also .gz/.bz2/.xz) or folders of them.
A record that is not a JSON object, has neither field, or whose prompt leaves no room for
`max_new_tokens` inside `seq_len` is refused as `data file <file> line <n>: <what>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from twinpipe.data.chat import ChatTemplate, prompt_ids
from twinpipe.data.records import BadRecord, Fields, _jsonl_lines, resolve_inputs, to_record
from twinpipe.data.tokenizer import TextTokenizer


@dataclass
class Prompt:
    """One prompt: its token ids, the raw prompt (string or messages, as reward functions get it), the
    record's other fields and where it came from (`data file F line N`)."""

    ids: list[int]
    raw: Any
    fields: dict[str, Any] = field(default_factory=dict)
    where: str = ""


def load_prompts(paths: str | Sequence[str], tokenizer: TextTokenizer, max_tokens: int,
                 fields: Fields = Fields()) -> list[Prompt]:
    """Every prompt record of `paths` in order; a prompt longer than `max_tokens` tokens is refused."""
    template = None
    out = []
    for path in resolve_inputs(paths):
        for number, raw in _jsonl_lines(path):
            where = f"data file {path} line {number}"
            if isinstance(raw, Exception):
                raise BadRecord(f"{where}: not valid JSON: {raw.msg} (column {raw.colno})")
            if not isinstance(raw, dict) or not ({fields.messages, fields.prompt} & set(raw)):
                got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
                raise BadRecord(f"{where}: a prompt record needs {fields.messages!r} or {fields.prompt!r} "
                                f"(record has {got})")
            key = fields.messages if fields.messages in raw else fields.prompt
            if isinstance(raw[key], str):
                ids = tokenizer.tokenizer.encode(raw[key], add_special_tokens=False).ids
            else:  # a chat (messages, or a prompt given as a message list)
                record = to_record({fields.messages: raw[key]}, "messages", fields, lambda: where)
                template = template or ChatTemplate.for_tokenizer(tokenizer)
                ids = prompt_ids(record, template, tokenizer)
            if not ids or len(ids) > max_tokens:
                raise BadRecord(f"{where}: the prompt has {len(ids)} tokens; allowed 1 to {max_tokens} "
                                "(train.seq_len - grpo.max_new_tokens)")
            out.append(Prompt(ids, raw[key], {k: v for k, v in raw.items() if k != key}, where))
    if not out:
        raise ValueError(f"data.paths={list(paths) if not isinstance(paths, str) else paths}: no prompt records")
    return out
