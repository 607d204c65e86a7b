"""Chat templates and assistant-only targets: equal to transformers' `apply_chat_template` (ids and
`assistant_masks`), every assistant turn with its end token, templates from the tokenizer folder."""

import json

import numpy as np
import pytest

from twinpipe.data.chat import DEEPSEEK_V3_TEMPLATE, ChatTemplate, prompt_ids, tokenize_record
from twinpipe.data.records import Record
from twinpipe.data.tokenizer import default_tokenizer, load_tokenizer

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3, in words?"},
        {"role": "assistant", "content": "six, of course"}]
# A ChatML template with no {% generation %} marks: its turns are found by rendering prefixes.
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHATML_MARKED = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
                 "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' + '\n' }}"
                 "{% endgeneration %}{% else %}{{ m['content'] + '<|im_end|>' + '\n' }}{% endif %}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer_cache):
    return default_tokenizer(512, tokenizer_cache, sample_bytes=300_000, chat=True)


def _hf_folder(tokenizer, template, path, extra_tokens=()):
    """Save `tokenizer` with `template` (and extra special tokens) as an HF tokenizer folder."""
    tokenizer.tokenizer.add_special_tokens(list(extra_tokens))
    tokenizer.chat_template = template
    tokenizer.save(path)
    tokenizer.chat_template = None
    return path


@pytest.mark.parametrize("template", ["deepseek", "chatml", "chatml_marked"])
def test_ids_and_targets_equal_transformers(chat_tokenizer, tmp_path, template):
    from transformers import AutoTokenizer

    source = {"deepseek": DEEPSEEK_V3_TEMPLATE, "chatml": CHATML, "chatml_marked": CHATML_MARKED}[template]
    tok = load_tokenizer(chat_tokenizer.save(tmp_path / "base").parent)
    folder = _hf_folder(tok, source, tmp_path / "hf", ["<|im_start|>", "<|im_end|>"])
    ours = load_tokenizer(folder)
    assert ours.chat_template == source
    ids, targets = tokenize_record(Record(messages=CHAT), ChatTemplate.for_tokenizer(ours), ours)
    hf = AutoTokenizer.from_pretrained(folder)
    assert ids.tolist() == hf.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    # transformers gives assistant masks only for marked templates; the unmarked ChatML must find the
    # same turns by rendering prefixes
    marked = CHATML_MARKED if template == "chatml" else source
    hf.chat_template = marked
    out = hf.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert out["input_ids"] == ids.tolist()
    assert targets.astype(int).tolist() == out["assistant_masks"]
    trained = ours.decode(ids[targets].tolist())
    end = ours.eos_token if template == "deepseek" else "<|im_end|>\n"
    assert trained == f"4{end}six, of course{end}"  # both turns, each with its end token
    assert prompt_ids(Record(messages=CHAT), ChatTemplate.for_tokenizer(ours), ours) == \
        hf.apply_chat_template(CHAT[:4], tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]


def test_train_on_prompt_text_and_prompt_completion(chat_tokenizer):
    template = ChatTemplate.for_tokenizer(chat_tokenizer)
    ids, targets = tokenize_record(Record(messages=CHAT), template, chat_tokenizer, train_on_prompt=True)
    assert targets.all() and len(ids) > 10
    assert tokenize_record(Record(messages=CHAT[:2]), template, chat_tokenizer) is None  # no assistant turn
    eos = chat_tokenizer.eos_token
    ids, targets = tokenize_record(Record(text=f"plain {eos} text"), template, chat_tokenizer)
    assert targets.all() and ids[-1] == chat_tokenizer.eos_id
    assert (ids == chat_tokenizer.eos_id).sum() == 1  # special-token text in raw text stays text
    ids, targets = tokenize_record(Record(prompt="Q: 7*6=", completion=" 42"), template, chat_tokenizer)
    assert chat_tokenizer.decode(ids.tolist()) == f"Q: 7*6= 42{eos}"
    assert chat_tokenizer.decode(ids[targets].tolist()) == f" 42{eos}"


def test_template_errors(chat_tokenizer, small_tokenizer):
    with pytest.raises(ValueError, match="lacks DeepSeek-V3's chat tokens.*<｜User｜>"):
        ChatTemplate.for_tokenizer(small_tokenizer)
    last_only = "{{ messages[-1]['content'] }}"  # renders no prefix of the conversation
    with pytest.raises(ValueError, match="generation"):
        tokenize_record(Record(messages=CHAT), ChatTemplate(last_only, chat_tokenizer), chat_tokenizer)


def test_template_from_folder_files(chat_tokenizer, tmp_path):
    folder = chat_tokenizer.save(tmp_path / "a").parent
    assert load_tokenizer(folder).chat_template is None
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": CHATML}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    chatml = load_tokenizer(folder)
    assert chatml.chat_template == CHATML
    (folder / "chat_template.jinja").write_text(CHATML_MARKED)  # transformers' newer file wins
    tok = load_tokenizer(folder)
    assert tok.chat_template == CHATML_MARKED
    assert tok.fingerprint() != chatml.fingerprint()  # token caches are keyed by the template too
    template = ChatTemplate.for_tokenizer(tok)
    assert template.marks_generation and np.asarray(template.render_with_spans(CHAT)[1]).shape == (2, 2)
